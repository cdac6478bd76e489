"""The ``.ec2t`` container: a parameter tree in as few bytes as it really takes.

Format, version 3
=================

A file is one byte string, all integers little-endian::

    offset  size  field
    0       8     magic  b"\\x89EC2T\\r\\n\\x1a"   (PNG-style: catches text-mode mangling)
    8       2     u16 format version (3, or 2 when no record is ``fc``; 1 and 2 are read)
    10      2     u16 flags (0; anything else is rejected)
    12      4     u32 H: length of the header
    16      8     u64 P: length of the payload
    24      H     header: zlib-compressed UTF-8 JSON (below)
    24+H    P     payload: the leaf streams, one after another, in leaf order
    24+H+P  32    SHA-256 of bytes [0, 24+H+P)

The file size must be exactly ``24 + H + P + 32``. A reader checks, in order:
magic, version, flags, size, checksum, then the header and every stream; any
failure raises :class:`ExportFormatError` naming what is wrong, never a
partly decoded tree.

Header JSON: ``{"tree": structure, "leaves": [record, ...], "meta": {...}}``
where ``structure`` is :mod:`trees`'s (dict key order and key types, lists,
tuples, ``None``) and one record per leaf, in order::

    {"c": codec, "d": dtype name, "s": shape, "n": stream length in bytes,
     "v": storage dtype of float values (only when it differs, e.g. "float16"),
     "k": CRC-32 of the decoded leaf (range-coded leaves)}

Streams start where the previous one ended; their lengths must add up to P.
``meta`` holds the writer, the entropy coder's version and user metadata.

Record codecs (the smallest candidate wins, per leaf; ties go to the codec
registered first). Version 3 writes ``raw``, ``zs``, ``tb``, ``tc``, ``sb``,
``sc``, ``tf``, ``cb``, ``fc``; version 2 is the same without ``fc`` (the
writer writes the oldest of versions 2 and 3 that holds the chosen codecs,
:func:`file_version`, so a file without ``fc`` stays readable by version-2
readers); version 1 had ``te`` and ``se`` in place of ``tc`` and
``sc`` and neither ``tf`` nor ``cb``, and its decoders are kept. Each codec's
stream is specified in its module (:mod:`record_codecs`):

==========  ==========================================================  =====================
codec       stream                                                      module
==========  ==========================================================  =====================
``raw``     the values' bytes (C order, little-endian), or their        ``dense``
            float16 copy when ``"v": "float16"``
``zs``      the same bytes byte-shuffled and zlib-compressed            ``dense``
``tb``      ternary: three values, non-zero mask, sign mask             ``ternary``
``te``      (v1) ternary: three values, semi-static range-coded         ``ternary``
``tc``      (v2) ternary: two values, zero sign, context-coded          ``ternary``
``sb``      sparse: non-zero mask, non-zero values                      ``sparse``
``se``      (v1) sparse: semi-static coded mask, non-zero values        ``sparse``
``sc``      (v2) sparse: context-coded mask, non-zero values            ``sparse``
``tf``      (v2) per-filter ternary: axis, scales, context-coded        ``filter_ternary``
``cb``      (v2) codebook: K values, adaptive order-0 coded indices     ``codebook``
``fc``      (v3) per-channel codebooks (last axis): sizes, values,      ``channel_codebook``
            adaptive order-0 coded indices
==========  ==========================================================  =====================

Under the ``float16`` option a float32 / float64 leaf is stored as float16
(``"v": "float16"``) unless float16 would change it beyond its rounding
(:func:`float16_keeps`: a value overflows, or values underflow so that the
leaf's error exceeds float16's unit roundoff in norm); it is then stored in
its own dtype. ``tb`` / ``te`` / ``tc`` / ``tf`` / ``cb`` / ``fc`` store the leaf's own dtype even
under the ``float16`` option; the ternary ones and ``tf`` need a float dtype.
A reader refuses a record that breaks these rules, a codec its version does
not hold, and any stream whose symbol count differs from what the shape
declares (:mod:`symbol_coding`), whether or not the record carries ``"k"``.
A ``bool`` leaf must decode to 0 / 1 bytes only (and a writer refuses one holding other bytes).

Leaf names
==========

A leaf's name is its ``/``-joined path (dict keys as ``str(key)``, list and
tuple positions as their index); ``--decode`` writes it as the ``.npz`` entry
``<name>.npy``. Writer and reader both refuse (:mod:`leaf_names`) a name that
does not encode as UTF-8 (a lone surrogate), is longer than 4,096 bytes in
UTF-8, holds a NUL, starts with ``/``, ``\\`` or a drive letter, or has a
``..`` component (split at ``/`` and ``\\``), and two names that are the same
``.npz`` entry once ``\\`` is read as ``/``. A header integer key of more
than 4,300 digits (Python's limit) is a corrupt header.

Bounded decoding
================

A file is untrusted input (its SHA-256 is unkeyed: anyone can recompute it), so
a reader commits no memory that the file's own length and ``max_bytes`` do not
justify. Before anything is allocated it checks:

* the decompressed header against :data:`MAX_HEADER_BYTES` (and ``max_bytes``)
  through ``zlib.decompressobj(...).decompress(data, max_length)``, its JSON
  nesting against :data:`MAX_JSON_DEPTH`, the number of leaves against
  :data:`MAX_LEAVES` and every shape against :data:`MAX_NDIM`;
* the decoded size of the whole tree, ``sum(numel x itemsize)``, against
  ``max_bytes`` (default :data:`DEFAULT_MAX_BYTES`, 4 GiB);
* every record's element count against what its stream can hold: exactly
  ``numel x itemsize`` bytes for ``raw``; at most 1032 bytes per zlib byte
  (deflate's largest expansion) for ``zs``; one mask bit per element for
  ``tb`` / ``sb``; and for the range-coded streams a probability floor: a
  symbol's probability is at most ``1 - (K - 1) f``, so each symbol costs at
  least ``c = -log2(1 - (K - 1) f)`` bits and a stream of ``B`` bytes holds at
  most ``(8 B + 64) / c`` symbols. Version 2's ``tc`` / ``sc`` / ``tf`` use
  ``f = 2^-10`` (:func:`context_coding.capacity`: about 2,800 symbols per
  byte), ``cb`` uses ``f = 2^-8 / K`` (:func:`codebook_coding.capacity`,
  checked with ``K = 2``, its largest, before the stream's ``K`` is read, then
  with its ``K``; ``fc`` likewise, with the smallest head ``C`` channels take); ``tf``'s ``S x F`` scales, ``cb``'s ``K`` values and ``fc``'s ``C`` sizes and
  ``sum k_c`` values are checked against the stream's length before they are read; version 1's ``te`` / ``se`` only have constriction's ``2^-24``
  (:func:`entropy_coding.max_symbols`), so for them ``max_bytes`` is the
  real bound.

zlib streams are inflated with a maximum output size and range-coded streams
are decoded in chunks of :data:`entropy_coding.DECODE_CHUNK` symbols into one
preallocated ``int8`` array, each batch encoded again with the probabilities
it was decoded with, to check that the stream is exactly their encoding
(:mod:`symbol_coding`; about +25% decoding CPU time); a reader's peak memory
is about the decoded tree (at most ``max_bytes``) plus one leaf's ``int8``
assignment, plus the file. ``max_bytes`` is enforced by one function,
:func:`enforce_max_bytes`, for every size a reader
is asked to accept (the file, an ``.npz``'s entries, the decoded arrays).

A leaf is *ternary* when it is floating point, finite and holds exactly three
distinct bit patterns: one negative value ``-w_n``, one zero and one positive
value ``w_p``. Storage in the ternary codecs is exact, so the default round trip
is bitwise (arrays come back native-endian with identical bits).

Example:
  >>> import numpy as np
  >>> from ec2t_jax.export import pack, unpack
  >>> tree = {"w": np.array([[0.5, 0.0], [-0.25, 0.5]], np.float32)}
  >>> data = pack(tree)
  >>> assert (unpack(data)["w"] == tree["w"]).all()
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import zlib
from typing import Any, NamedTuple, Optional

import constriction
import numpy as np

from ec2t_jax._src import container_layout
from ec2t_jax._src.core import trees
from ec2t_jax._src.export import leaf_names
from ec2t_jax._src.export import record_codecs
from ec2t_jax._src.export import stacking
from ec2t_jax._src.export.errors import ExportFormatError
from ec2t_jax._src.export.leaf_bytes import (DTYPES, FLOAT_NAMES, contiguous, crc32_le, inflate,
                                             uint_view)
from ec2t_jax._src.export.record_codecs import Leaf, LeafRecord, RecordCodec

MAGIC = b"\x89EC2T\r\n\x1a"
FORMAT_VERSION = 3  # the newest; a file is written as the oldest of WRITTEN_VERSIONS holding its codecs
SUPPORTED_VERSIONS = (1, 2, 3)
WRITTEN_VERSIONS = (2, 3)
_FIXED = struct.Struct(container_layout.FIXED_HEADER_FORMAT)  # magic, version, flags, H, P
_DIGEST = container_layout.DIGEST_BYTES
_MIN_SIZE = _FIXED.size + _DIGEST

DEFAULT_MAX_BYTES = 4 * 2**30  # decoded arrays a reader accepts by default
MAX_HEADER_BYTES = 16 * 2**20  # decompressed header JSON
MAX_JSON_DEPTH = 128  # nesting of the header JSON (about 40 levels of tree)
MAX_LEAVES = 2**20
MAX_NDIM = 32
MAX_DIM = 2**40  # largest length of one axis (numpy refuses shapes whose product of
                 # non-zero axes overflows, even for empty arrays)
# Keys of ``meta["user"]`` the library writes and reads back itself: the
# stacked leaves split per slice, the inference file's settings, the source of
# an exported checkpoint. User metadata may not use them.
RESERVED_METADATA_KEYS = (stacking.METADATA_KEY, "inference", "source_kind")


class PackedInfo(NamedTuple):
  """What a packed file holds, without decoding its leaves.

  Attributes:
    version: format version.
    records: one :class:`LeafRecord` per leaf, in order.
    structure: the tree structure (see :mod:`trees`).
    meta: writer metadata.
    header_bytes: ``H`` (compressed header length).
    payload_bytes: ``P``.
    total_bytes: size of the file.
  """
  version: int
  records: list[LeafRecord]
  structure: Any
  meta: dict
  header_bytes: int
  payload_bytes: int
  total_bytes: int


# ------------------------------------------------------------------------ max_bytes


def enforce_max_bytes(nbytes: int, max_bytes, *, prefix: str = "", suffix: str = "") -> int:
  """The one check of ``max_bytes``: validates it and refuses ``nbytes`` above it.

  Args:
    nbytes: the size asked for (a file, declared entries, decoded arrays).
    max_bytes: the caller's limit, a non-negative integer.
    prefix, suffix: words around ``"{nbytes:,} bytes"`` in the message.

  Returns:
    ``max_bytes`` as an ``int``.

  Raises:
    ValueError: if ``max_bytes`` is not a non-negative integer.
    ExportFormatError: if ``nbytes > max_bytes``.

  Example:
    >>> from ec2t_jax._src.export.container import enforce_max_bytes  # internal
    >>> enforce_max_bytes(10, 100)
    100
  """
  if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes < 0:
    raise ValueError(f"max_bytes must be a non-negative integer, got {max_bytes!r}")
  if nbytes > max_bytes:
    raise ExportFormatError(f"{prefix}{nbytes:,} bytes{suffix}, more than "
                            f"max_bytes={int(max_bytes):,}")
  return int(max_bytes)


# --------------------------------------------------------------------------- writing


def float16_keeps(array: np.ndarray) -> bool:
  r"""Whether float16 changes a float leaf by no more than float16's own rounding.

  False when a finite value overflows (becomes infinite) or when the leaf's
  rounding error exceeds float16's unit roundoff :math:`u = 2^{-11}` in norm,

  .. math:: \lVert \mathrm{fl}_{16}(x) - x \rVert_2 > u \lVert x \rVert_2

  (over the finite values): values underflowing to float16's subnormals or to
  zero (a leaf of ~1e-9 values would become zeros). A leaf whose values are
  all in float16's normal range meets the bound value by value, so only
  underflow (or overflow) keeps a leaf in its dtype; a few tiny values among
  normal ones do not.

  Example:
    >>> import numpy as np
    >>> from ec2t_jax._src.export.container import float16_keeps  # internal
    >>> float16_keeps(np.array([0.1, -2.5, 1e-7], np.float32))
    True
    >>> float16_keeps(np.full(4, 1e-9, np.float32)), float16_keeps(np.array([1e5], np.float32))
    (False, False)
  """
  with np.errstate(over="ignore", invalid="ignore"):
    half = array.astype(np.float16)
  finite = np.isfinite(array)
  if not (np.isfinite(half) == finite).all():
    return False
  x = np.where(finite, array, 0)
  error = np.where(finite, half.astype(array.dtype), 0) - x
  norm = np.sum(np.square(x), dtype=np.float64)
  return bool(np.sum(np.square(error), dtype=np.float64) <= FLOAT16_ROUNDING**2 * norm * _SLACK)


FLOAT16_ROUNDING = 2.0**-11  # float16's unit roundoff (normal range)
_SLACK = 1 + 2.0**-20  # the float64 sums' own rounding


def _storage(array: np.ndarray, float16: bool, ternary: bool) -> np.dtype:
  """float16 for non-ternary float32/64 leaves under the option, unless it changes a leaf
  beyond its rounding (:func:`float16_keeps`: overflow or underflow)."""
  if float16 and not ternary and array.dtype.name in ("float32", "float64"):
    if float16_keeps(array):
      return np.dtype(np.float16)
  return array.dtype


def _candidates(leaf: Leaf, codecs) -> dict[RecordCodec, bytes]:
  """The stream of every codec of this version that applies (and is allowed)."""
  out = {}
  for codec in record_codecs.codecs_for_version(FORMAT_VERSION):
    if codecs is None or codec.name in codecs:
      stream = codec.encode(leaf)
      if stream is not None:
        out[codec] = stream
  return out


def file_version(codec_names) -> int:
  """The oldest of :data:`WRITTEN_VERSIONS` whose files may hold every codec of ``codec_names``.

  Example:
    >>> from ec2t_jax._src.export.container import file_version  # internal
    >>> file_version(["tc", "zs"]), file_version(["tc", "fc"])
    (2, 3)
  """
  needed = {record_codecs.get(name) for name in codec_names}
  return min(v for v in WRITTEN_VERSIONS if all(v in c.versions for c in needed))


def _encode_leaf(path: str, array: np.ndarray, *, float16: bool, entropy: bool,
                 codecs) -> tuple[dict, bytes]:
  """The header record (a JSON-able dict) and the stream of one leaf."""
  if array.dtype.name not in DTYPES:
    raise ValueError(f"leaf {path!r}: dtype {array.dtype} is not supported "
                     f"(supported: {', '.join(DTYPES)})")
  if array.dtype == np.bool_ and (uint_view(contiguous(array)) > 1).any():
    raise ValueError(f"bool leaf {path!r} holds bytes other than 0 and 1 (a view of another "
                     f"dtype?), which no reader accepts; store array.astype(bool) instead")
  leaf = Leaf(array, array.dtype, entropy)
  leaf.storage = _storage(leaf.array, float16, leaf.ternary is not None)  # before any stream
  streams = _candidates(leaf, codecs)
  if not streams:
    applicable = sorted(c.name for c in _candidates(leaf, None))
    raise ValueError(f"leaf {path!r}: none of the codecs {sorted(codecs)} applies "
                     f"(applicable: {applicable})")
  codec = min(streams, key=lambda c: len(streams[c]))  # dicts keep the registry order on ties
  storage = array.dtype if codec.own_dtype else leaf.storage
  record = {"c": codec.name, "d": array.dtype.name, "s": list(array.shape),
            "n": len(streams[codec])}
  if storage != array.dtype:
    record["v"] = storage.name
  if codec.range_coded:  # CRC of what decoding must give back
    decoded = leaf.array if storage == array.dtype else leaf.stored.astype(array.dtype)
    record["k"] = crc32_le(decoded)
  return record, streams[codec]


def check_metadata(metadata) -> dict:
  """User metadata as a dict, refusing the library's own keys.

  Raises:
    TypeError: ``metadata`` is not a dict (or ``None``).
    ValueError: it holds a key of :data:`RESERVED_METADATA_KEYS`.

  Example:
    >>> from ec2t_jax._src.export.container import check_metadata  # internal
    >>> check_metadata({"run": 3})
    {'run': 3}
  """
  if metadata is None:
    return {}
  if not isinstance(metadata, dict):
    raise TypeError(f"metadata must be a JSON-able dict, got a {type(metadata).__name__}")
  reserved = [k for k in RESERVED_METADATA_KEYS if k in metadata]
  if reserved:
    raise ValueError(f"metadata key {reserved[0]!r} is reserved for the library's own records "
                     f"(reserved: {', '.join(RESERVED_METADATA_KEYS)}); use another name")
  return metadata


def pack(tree, *, float16: bool = False, entropy_coding: bool = True,
         codecs=None, metadata: Optional[dict] = None, full_precision=(),
         library_metadata: Optional[dict] = None) -> bytes:
  """Encodes a parameter tree into the packed format.

  Args:
    tree: nested dicts / lists / tuples of arrays (Linen params, an NNX
      ``nnx.State`` or its ``to_pure_dict()``, an ``.npz`` state dict).
    float16: store non-ternary float32/float64 leaves as float16 (lossy; they
      come back in their original dtype). Ternary leaves stay exact.
    entropy_coding: allow the range-coded codecs (``tc``, ``sc``, ``tf``,
      ``cb``); with False ternary leaves use the paper's bitmasks.
    codecs: optional set restricting the codecs (``raw`` always needed as a
      fallback for leaves no other codec applies to).
    metadata: JSON-able dict stored in the header under ``meta["user"]``
      (not holding a key of :data:`RESERVED_METADATA_KEYS`).
    full_precision: leaf paths kept in their own dtype even with ``float16``.
    library_metadata: the library's own keys (:data:`RESERVED_METADATA_KEYS`),
      stored beside ``metadata``; for the library's writers only.

  Returns:
    The file's bytes.

  Raises:
    ValueError: for unsupported leaves (non-numeric, complex, ...) or a
      reserved key in ``metadata``.
  """
  library_metadata = dict(library_metadata or {})
  if set(library_metadata) - set(RESERVED_METADATA_KEYS):
    raise ValueError(f"library_metadata holds keys that are not reserved: "
                     f"{sorted(set(library_metadata) - set(RESERVED_METADATA_KEYS))}")
  metadata = {**library_metadata, **check_metadata(metadata)}
  leaves, structure = trees.flatten(tree)
  leaf_names.check_names([path for path, _ in leaves])
  allowed = None if codecs is None else set(codecs)
  records, streams = [], []
  for path, array in leaves:
    record, stream = _encode_leaf(path, array, float16=float16 and path not in full_precision,
                                  entropy=entropy_coding, codecs=allowed)
    records.append(record)
    streams.append(stream)
  meta = {"writer": "ec2t_jax", "coder": f"constriction {constriction_version()}"}
  if metadata:
    meta["user"] = metadata
  header = json.dumps({"tree": structure, "leaves": records, "meta": meta},
                      separators=(",", ":"), allow_nan=False).encode("utf-8")
  header = zlib.compress(header, 9)
  payload = b"".join(streams)
  version = file_version(r["c"] for r in records)
  body = _FIXED.pack(MAGIC, version, 0, len(header), len(payload)) + header + payload
  return body + hashlib.sha256(body).digest()


def constriction_version() -> str:
  """The installed ``constriction``'s version (written to ``meta["coder"]``)."""
  try:
    from importlib.metadata import version  # pylint: disable=g-import-not-at-top
    return version("constriction")
  except Exception:  # pragma: no cover - metadata missing in odd installs
    return getattr(constriction, "__version__", "unknown")


# ------------------------------------------------------------------ reading: container


def _check_magic(data: bytes) -> None:
  if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
    if MAGIC.startswith(data[:len(MAGIC)]) and len(data) < len(MAGIC):
      raise ExportFormatError(f"truncated file: {len(data)} bytes, not even a full magic number")
    raise ExportFormatError("not an ec2t packed file: bad magic number")
  if len(data) < _MIN_SIZE:
    raise ExportFormatError(f"truncated file: {len(data)} bytes, the fixed header and "
                            f"checksum alone take {_MIN_SIZE}")


def _check_size(data: bytes, version: int, header_len: int, payload_len: int) -> None:
  expected = _FIXED.size + header_len + payload_len + _DIGEST
  if len(data) < expected:
    raise ExportFormatError(f"truncated file: {len(data)} bytes, its header announces {expected}")
  if len(data) > expected:
    raise ExportFormatError(f"{len(data) - expected} unexpected trailing bytes after the checksum "
                            f"(file has {len(data)} bytes, its header announces {expected})")


def _check_container(data: bytes) -> tuple[int, int, int]:
  """Validates magic, version, flags, size and checksum; returns (version, H, P)."""
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise TypeError(f"expected bytes, got {type(data).__name__}")
  data = bytes(data)
  _check_magic(data)
  _, version, flags, header_len, payload_len = _FIXED.unpack_from(data)
  if version not in SUPPORTED_VERSIONS:
    raise ExportFormatError(f"unsupported format version {version} (this reader supports "
                            f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
  if flags:
    raise ExportFormatError(f"unsupported flags 0x{flags:04x} in a version-{version} file")
  _check_size(data, version, header_len, payload_len)
  if hashlib.sha256(data[:-_DIGEST]).digest() != data[-_DIGEST:]:
    raise ExportFormatError("checksum mismatch: the file is corrupted")
  return version, header_len, payload_len


# --------------------------------------------------------------------- reading: header


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_JSON_STEP = np.zeros(256, np.int64)
_JSON_STEP[[ord("["), ord("{")]] = 1
_JSON_STEP[[ord("]"), ord("}")]] = -1


def _json_depth(text: bytes) -> int:
  """Largest nesting depth of ``[`` / ``{`` outside strings (no recursion)."""
  codes = np.frombuffer(_JSON_STRING.sub(b'""', text), np.uint8)
  return int(np.cumsum(_JSON_STEP[codes]).max(initial=0))


def _load_header_json(data: bytes, max_bytes: int):
  limit = min(MAX_HEADER_BYTES, max_bytes)
  text = inflate(data, limit, "corrupt header")
  depth = _json_depth(text)
  if depth > MAX_JSON_DEPTH:
    raise ExportFormatError(f"corrupt header: JSON nested {depth} deep "
                            f"(at most {MAX_JSON_DEPTH} allowed)")
  try:
    return json.loads(text.decode("utf-8"))
  except (ValueError, RecursionError) as e:  # also an integer of more than 4300 digits
    raise ExportFormatError(f"corrupt header: {e}") from None


def _is_count(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_shape(shape) -> bool:
  return (isinstance(shape, list) and len(shape) <= MAX_NDIM
          and all(_is_count(n) and n <= MAX_DIM for n in shape)
          and math.prod(n for n in shape if n) <= MAX_DIM)


def _record_fields(path: str, r) -> LeafRecord:
  """One raw header record as a :class:`LeafRecord`, its fields' types checked."""
  try:
    codec, dtype, shape, nbytes = r["c"], r["d"], r["s"], r["n"]
    storage, crc = r.get("v", dtype), r.get("k")
  except (TypeError, KeyError, AttributeError) as e:
    raise ExportFormatError(f"corrupt record for leaf {path!r}: {e}") from None
  ok = (_is_shape(shape) and _is_count(nbytes) and (crc is None or _is_count(crc))
        and all(isinstance(x, str) for x in (codec, dtype, storage)))
  if not ok:
    raise ExportFormatError(f"corrupt record for leaf {path!r}: {r!r:.120}")
  return LeafRecord(path, codec, dtype, tuple(shape), nbytes, storage, crc)


def _codec_allows(codec: Optional[RecordCodec], record: LeafRecord) -> bool:
  """The codec's dtype rules (see the module docstring) and the float16 storage rule."""
  if codec is None or record.dtype not in DTYPES or record.storage not in DTYPES:
    return False
  if codec.float_only and record.dtype not in FLOAT_NAMES:
    return False
  if record.storage == record.dtype:
    return True
  return (not codec.own_dtype and record.storage == "float16"
          and record.dtype in ("float32", "float64"))


def _record(path: str, r, version: int) -> LeafRecord:
  """Validates one raw header record (types, codec and dtypes; not yet sizes)."""
  record = _record_fields(path, r)
  codec = (record_codecs.get(record.codec)
           if record.codec in record_codecs.names(version) else None)
  if not _codec_allows(codec, record):
    raise ExportFormatError(f"corrupt record for leaf {path!r}: {r!r:.120}")
  return record


def _check_capacity(record: LeafRecord) -> None:
  """Rejects a record whose element count its stream cannot hold (see "Bounded decoding")."""
  if not record_codecs.get(record.codec).fits(record):
    raise ExportFormatError(
        f"leaf {record.path!r}: a {record.nbytes:,}-byte {record.codec!r} stream cannot hold "
        f"{record.numel:,} elements of shape {record.shape}")


def _leaf_paths(header) -> list[str]:
  """The leaves' names from the header's tree structure (validated)."""
  if not isinstance(header, dict) or not {"tree", "leaves", "meta"} <= set(header):
    raise ExportFormatError("corrupt header: missing 'tree', 'leaves' or 'meta'")
  raw_records = header["leaves"]
  if not isinstance(raw_records, list):
    raise ExportFormatError("corrupt header: 'leaves' is not a list")
  if len(raw_records) > MAX_LEAVES:
    raise ExportFormatError(f"corrupt header: {len(raw_records):,} leaves "
                            f"(at most {MAX_LEAVES:,} allowed)")
  try:
    paths = trees.leaf_paths(header["tree"])
    trees.unflatten(list(range(len(paths))), header["tree"])  # validates the structure
  except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
    raise ExportFormatError(f"corrupt header: malformed tree structure ({e})") from None
  if len(paths) != len(raw_records):
    raise ExportFormatError(f"corrupt header: {len(raw_records)} leaf records for "
                            f"{len(paths)} tree leaves")
  leaf_names.check_names(paths, ExportFormatError)
  return paths


def _parse_header(data: bytes, version: int, header_len: int, payload_len: int,
                  max_bytes: int) -> PackedInfo:
  start = _FIXED.size
  header = _load_header_json(data[start:start + header_len], max_bytes)
  paths = _leaf_paths(header)
  records = [_record(path, r, version) for path, r in zip(paths, header["leaves"])]
  if sum(r.nbytes for r in records) != payload_len:
    raise ExportFormatError("corrupt header: leaf stream lengths do not add up to the payload")
  enforce_max_bytes(sum(r.numel * DTYPES[r.dtype].itemsize for r in records), max_bytes,
                    prefix="the file declares ", suffix=" of arrays")
  for record in records:
    _check_capacity(record)
  meta = header["meta"] if isinstance(header["meta"], dict) else {}
  return PackedInfo(version, records, header["tree"], meta, header_len, payload_len,
                    _FIXED.size + header_len + payload_len + _DIGEST)


def read_info(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> PackedInfo:
  """Validates a packed file and returns its header, without decoding leaves.

  Args:
    data: the file's bytes.
    max_bytes: largest decoded size (all arrays) accepted.

  Raises:
    ExportFormatError: wrong magic or version, truncated, corrupted, or
      declaring more than ``max_bytes`` or more than its streams can hold.
  """
  max_bytes = enforce_max_bytes(0, max_bytes)
  version, header_len, payload_len = _check_container(data)
  return _parse_header(bytes(data), version, header_len, payload_len, max_bytes)


# ---------------------------------------------------------------------- reading: leaves


def decode_record(record: LeafRecord, stream: bytes, written_with: str = "?") -> np.ndarray:
  """Decodes one leaf's stream into its array (the codec's decoder, then the container's checks).

  Raises:
    ExportFormatError: naming the leaf, for anything wrong in the stream, a
      ``bool`` leaf holding bytes other than 0 / 1, or a CRC mismatch.
  """
  try:
    flat = record_codecs.get(record.codec).decode(record, stream)
  except ExportFormatError as e:
    raise ExportFormatError(f"leaf {record.path!r}: {e}") from None
  if record.storage != record.dtype:
    flat = flat.astype(record.dtype_)
  if record.dtype == "bool" and (uint_view(flat) > 1).any():
    raise ExportFormatError(f"bool leaf {record.path!r} holds bytes other than 0 and 1")
  array = flat.reshape(record.shape)
  if record.crc is not None and crc32_le(array) != record.crc:
    raise ExportFormatError(
        f"leaf {record.path!r} decodes to different content than was written (CRC mismatch); "
        f"written with {written_with}, read with constriction {constriction_version()}")
  return array


def unpack_leaves(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES
                  ) -> tuple[PackedInfo, list[np.ndarray]]:
  """Decodes every leaf of a packed file.

  Args:
    data: the file's bytes.
    max_bytes: largest decoded size (all arrays) accepted, checked from the
      header before anything is decoded.

  Returns:
    ``(info, arrays)`` with the arrays in leaf order.

  Raises:
    ExportFormatError: if anything about the file is wrong.
  """
  data = bytes(data)
  info = read_info(data, max_bytes=max_bytes)
  offset = _FIXED.size + info.header_bytes
  arrays = []
  for record in info.records:
    stream = data[offset:offset + record.nbytes]
    arrays.append(decode_record(record, stream, str(info.meta.get("coder", "?"))))
    offset += record.nbytes
  return info, arrays


def unpack(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES):
  """Decodes a packed file into the tree that was packed.

  Args:
    data: the file's bytes.
    max_bytes: largest decoded size (all arrays) accepted (see "Bounded
      decoding" in the module docstring).

  Returns:
    The tree (nested dicts / lists / tuples of numpy arrays).

  Raises:
    ExportFormatError: if anything about the file is wrong.
  """
  info, arrays = unpack_leaves(data, max_bytes=max_bytes)
  try:
    return trees.unflatten(arrays, info.structure)
  except ValueError as e:
    raise ExportFormatError(f"corrupt header: {e}") from None


# Codec names by property, derived from the codec registry (a new codec appears
# here by its registration alone).
CODECS = record_codecs.names(FORMAT_VERSION)  # what this version writes
CODECS_BY_VERSION = {v: record_codecs.names(v) for v in SUPPORTED_VERSIONS}
TERNARY_CODECS = record_codecs.all_names(ternary=True)
RANGE_CODED = record_codecs.all_names(range_coded=True)
EXACT_CODECS = record_codecs.all_names(own_dtype=True, ternary=False)  # own dtype under float16
