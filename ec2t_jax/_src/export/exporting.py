"""Files in the packed format: save / load, export a checkpoint, decode to ``.npz``.

The public names are re-exported by :mod:`ec2t_jax.export`; the format itself
is :mod:`ec2t_jax._src.export.container`.

Example:
  >>> import numpy as np
  >>> from ec2t_jax.export import save, load
  >>> info = save("/tmp/doc.ec2t", {"w": np.array([0.5, 0.0, -0.5, 0.5], np.float32)})
  >>> load("/tmp/doc.ec2t")["w"]
  array([ 0.5,  0. , -0.5,  0.5], dtype=float32)
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np

from ec2t_jax._src.core import trees
from ec2t_jax._src.export import inference
from ec2t_jax._src.export import inference_export
from ec2t_jax._src.export import leaf_names
from ec2t_jax._src.export import container
from ec2t_jax._src.export import sources
from ec2t_jax._src.export import stacking
from ec2t_jax._src.export.container import DEFAULT_MAX_BYTES, PackedInfo, pack, read_info, unpack
from ec2t_jax._src.export.errors import ExportFormatError
from ec2t_jax._src.export.sources import load_tree


class ExportResult(NamedTuple):
  """What :func:`export_file` wrote.

  Attributes:
    info: the packed file's :class:`PackedInfo`.
    source_kind: ``"npz"``, ``"checkpoint"`` or ``"packed"``.
    source_path: what was read.
    raw_bytes: the leaves' size as stored in memory (numel x itemsize).
    float32_bytes: numel x 4 over all leaves (the float32 baseline).
  """
  info: PackedInfo
  source_kind: str
  source_path: str
  raw_bytes: int
  float32_bytes: int

  def summary(self, out_path) -> str:
    records = self.info.records
    ternary = sum(r.codec in container.TERNARY_CODECS for r in records)
    coded = sum(r.codec in container.RANGE_CODED for r in records)
    ratio = self.float32_bytes / max(self.info.total_bytes, 1)
    return (f"{out_path}: {self.info.total_bytes:,} bytes from {self.source_path} "
            f"({self.source_kind}, {len(records)} leaves, {self.float32_bytes:,} bytes as float32: "
            f"{ratio:.1f}x smaller); {ternary} ternary leaves, {coded} entropy-coded")


def save(path, tree, *, float16: bool = False, entropy_coding: bool = True,
         metadata: Optional[dict] = None, full_precision=()) -> PackedInfo:
  """Packs ``tree`` and writes it to ``path`` atomically.

  Args:
    path: output file (conventionally ``*.ec2t``).
    tree: Linen params, ``nnx.State`` / ``to_pure_dict()``, an ``.npz`` dict...
    float16: store non-ternary float leaves as float16 (lossy), except a
      leaf float16 would change beyond its rounding (a value overflows, or
      values underflow: :func:`container.float16_keeps`), kept in its dtype.
    entropy_coding: allow range coding (else bitmasks for ternary leaves).
    metadata: JSON-able dict stored in the header; the library's own keys
      (:data:`container.RESERVED_METADATA_KEYS`) are refused.
    full_precision: leaf paths kept in their dtype even with ``float16``.

  A leaf stacking ternary layers along its leading axis (``nn.scan`` blocks:
  a different ternary grid per slice) is stored as one record per slice,
  ``kernel[0]``, ``kernel[1]``, ... (see :mod:`ec2t_jax._src.export.stacking`);
  :func:`load` stacks them back bitwise.

  Returns:
    The written file's :class:`PackedInfo`.

  Raises:
    ValueError: an unsupported leaf, a reserved metadata key, or a leaf named
      like a slice of a stacked sibling (``kernel[3]`` beside a stacked
      ``kernel``), naming it.

  Example:
    >>> import numpy as np
    >>> from ec2t_jax.export import save
    >>> info = save("/tmp/model.ec2t", {"w": np.zeros(4, np.float32)})
    >>> info.records[0].codec
    'raw'
  """
  return _save(path, tree, float16=float16, entropy_coding=entropy_coding,
               metadata=container.check_metadata(metadata), full_precision=full_precision)


def encode(tree, *, float16: bool = False, entropy_coding: bool = True,
           metadata: Optional[dict] = None, full_precision=()) -> bytes:
  """The bytes :func:`save` writes, in memory (arguments as for :func:`save`).

  Unlike the record-level :func:`pack`, a leaf stacking ternary layers is
  split into one record per slice first, as :func:`save` does.

  Example:
    >>> import numpy as np
    >>> from ec2t_jax.export import decode, encode
    >>> stacked = np.stack([np.array([[0.33, -0.33], [0.0, 0.33]], np.float32),
    ...                     np.array([[0.0, 0.1], [-0.1, 0.0]], np.float32)])  # 2 ternary layers
    >>> bool((decode(encode({"k": stacked}, float16=True))["k"] == stacked).all())
    True
  """
  return _encode(tree, float16=float16, entropy_coding=entropy_coding,
                 metadata=container.check_metadata(metadata), full_precision=full_precision)


def _encode(tree, *, float16: bool, entropy_coding: bool, metadata: dict, full_precision=(),
            library_metadata: Optional[dict] = None) -> bytes:
  full_precision = set(full_precision)
  flat, structure = trees.flatten(tree)
  tree, split = stacking.split_stacked(trees.unflatten([a for _, a in flat], structure),
                                       keep=full_precision)
  library_metadata = dict(library_metadata or {})
  if split:
    library_metadata[stacking.METADATA_KEY] = split
  return pack(tree, float16=float16, entropy_coding=entropy_coding, metadata=metadata,
              full_precision=full_precision, library_metadata=library_metadata)


def _save(path, tree, **kwargs) -> PackedInfo:
  data = _encode(tree, **kwargs)
  sources.atomic_write(path, data)
  return read_info(data)


def _read_packed(path, max_bytes: int) -> bytes:
  return sources.read_bounded(path, max_bytes)


def load(path, *, max_bytes: int = DEFAULT_MAX_BYTES):
  """Reads a packed file back into the tree that was saved (numpy arrays).

  Args:
    path: the packed file.
    max_bytes: largest file and largest decoded size accepted (default
      4 GiB); checked before anything is allocated.

  Raises:
    ExportFormatError: wrong magic or version, truncated or corrupted file,
      or one declaring more than ``max_bytes``.
  """
  return decode(_read_packed(path, max_bytes), max_bytes=max_bytes)


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES):
  """The tree of bytes :func:`encode` made (what :func:`load` reads from a file).

  Raises:
    ExportFormatError: as :func:`load`.
  """
  return _restacked(unpack(data, max_bytes=max_bytes), read_info(data, max_bytes=max_bytes))


def _restacked(tree, info, **kwargs):
  return stacking.restack_file(tree, info.meta, **kwargs)


def _ternary_signature(piece):
  if isinstance(piece, inference.TernaryWeight):
    return np.asarray(piece.w_p).dtype, np.shape(piece.assignment)
  return stacking.array_signature(piece)


def load_ternary(path, *, max_bytes: int = DEFAULT_MAX_BYTES):
  """Like :func:`load`, with every ternary leaf as a :class:`TernaryWeight`.

  The assignment (``int8``) and the two values are what the ternary
  inference path (:func:`ec2t_jax._src.export.inference.ternary_dense` /
  ``ternary_conv``) computes with. A stacked leaf comes back as a list of its
  slices (one :class:`TernaryWeight` per layer).
  """
  info, arrays = container.unpack_leaves(_read_packed(path, max_bytes), max_bytes=max_bytes)
  leaves = []
  for array in arrays:
    weight = inference.as_ternary(array)
    leaves.append(array if weight is None else weight)
  return _restacked(trees.unflatten(leaves, info.structure), info, stack=list,
                    signature=_ternary_signature)


def _sizes(tree) -> tuple[int, int]:
  leaves = trees.flatten(tree)[0]
  return (sum(a.size * a.dtype.itemsize for _, a in leaves), sum(4 * a.size for _, a in leaves))


def export_file(source, out_path, *, keys: Sequence[str] = ("params",), float16: bool = False,
                entropy_coding: bool = True, metadata: Optional[dict] = None,
                max_bytes: int = DEFAULT_MAX_BYTES) -> ExportResult:
  """Compresses a training checkpoint, an ``.npz`` state dict or a packed file.

  Args:
    source: orbax checkpoint directory, ``.npz`` file or packed file.
    out_path: the packed file to write (atomically).
    keys: checkpoint entries to export (default its ``params``).
    float16, entropy_coding, metadata: as in :func:`save`.
    max_bytes: largest input accepted (see :func:`load`).

  Returns:
    An :class:`ExportResult`.

  Raises:
    ValueError: if ``out_path`` is ``source`` (after resolving links), before
      anything is written.
  """
  metadata = container.check_metadata(metadata)
  sources.refuse_overwriting_input(source, out_path)
  loaded = load_tree(source, keys=keys, max_bytes=max_bytes)
  info = _save(out_path, loaded.tree, float16=float16, entropy_coding=entropy_coding,
               metadata=metadata, library_metadata={"source_kind": loaded.kind})
  raw, f32 = _sizes(loaded.tree)
  return ExportResult(info, loaded.kind, loaded.path, raw, f32)


def decode_file(source, out_path, *, max_bytes: int = DEFAULT_MAX_BYTES
                ) -> dict[str, np.ndarray]:
  """Restores a packed file (or any readable source) as an ``.npz`` under its original keys.

  Flat state dicts keep their keys; nested trees use ``/``-joined paths.

  Args:
    source: packed file, ``.npz`` or checkpoint directory.
    out_path: the ``.npz`` to write (atomically).
    max_bytes: largest input accepted (see :func:`load`).

  Returns:
    The arrays written, by key.

  Raises:
    ExportFormatError: for a corrupt file or a leaf name that is not a safe
      ``.npz`` entry (:mod:`ec2t_jax._src.export.leaf_names`).
    ValueError: if ``out_path`` is ``source`` (after resolving links).
  """
  sources.refuse_overwriting_input(source, out_path)
  loaded = load_tree(source, max_bytes=max_bytes)
  arrays = sources.flat_arrays(loaded.tree)
  leaf_names.check_names(list(arrays), ExportFormatError)  # .npz and checkpoint sources too
  for key, array in arrays.items():
    if array.dtype.kind == "V":
      raise ValueError(f"leaf {key!r} has dtype {array.dtype.name}, which .npz cannot hold; "
                       "use ec2t_jax.export.load() instead")
  sources.atomic_save_npz(out_path, arrays)
  return arrays




def _batch_norm_paths(variables) -> list[str]:
  """Module paths of the Flax batch norms (those with a ``mean`` in ``batch_stats``)."""
  if not (isinstance(variables, dict) and "batch_stats" in variables):
    return []
  return sorted(p[:-len("/mean")] for p, _ in trees.flatten(variables["batch_stats"])[0]
                if p.endswith("/mean"))


def export_inference(source, out_path, *, keys: Sequence[str] = ("params", "batch_stats"),
                     eps: float = inference_export.EPS, metadata: Optional[dict] = None,
                     max_bytes: int = DEFAULT_MAX_BYTES) -> ExportResult:
  """Writes an inference file: batch norm folded, ternary leaves exact, the rest float16.

  Batch norms become a per-channel scale and shift
  (:func:`ec2t_jax._src.export.inference_export.fold_batch_norm`), kept in float32;
  every other non-ternary float leaf (the full-precision first and last
  layers, biases) is stored as float16, lossy for those leaves only; ternary
  leaves are stored bitwise. The scale and shift stay float32 because they
  multiply every activation: rounding them to float16 as well moved ResNet-20
  spars64's logits by up to 0.028 on N(0, 1) inputs, against 0.005 this way
  (``benchmarks/export_size.py``). Read it back with :func:`load_inference`
  (a model-ready tree) or :func:`load_ternary`.

  Args:
    source: ``.npz`` PyTorch state dict (e.g. the official checkpoints), an
      orbax checkpoint holding ``params`` and ``batch_stats``, or a packed file.
    out_path: the file to write (atomically).
    keys: checkpoint entries to read (default ``params`` and ``batch_stats``).
    eps: the batch norms' epsilon.
    metadata: JSON-able user metadata.
    max_bytes: largest input accepted (see :func:`load`).

  Returns:
    An :class:`ExportResult` (sizes are those of the folded tree).
  """
  metadata = container.check_metadata(metadata)
  sources.refuse_overwriting_input(source, out_path)
  loaded = load_tree(source, keys=keys, max_bytes=max_bytes)
  folded = inference_export.fold_batch_norm(loaded.tree, eps=eps)
  flax_paths = _batch_norm_paths(loaded.tree)
  library = {"source_kind": loaded.kind, "inference": {"eps": eps, "batch_norms": flax_paths}}
  affine = [p for p, _ in trees.flatten(folded)[0]
            if p.endswith((".scale", ".shift")) or any(p == f"params/{m}/{leaf}" for m in flax_paths
                                                        for leaf in ("scale", "bias"))]
  info = _save(out_path, folded, float16=True, entropy_coding=True, metadata=metadata,
               full_precision=set(affine), library_metadata=library)
  raw, f32 = _sizes(folded)
  return ExportResult(info, loaded.kind, loaded.path, raw, f32)


def load_inference(path, *, max_bytes: int = DEFAULT_MAX_BYTES):
  """Reads an inference file into a model-ready tree.

  The folded batch norms come back as batch norms computing exactly
  ``scale * x + shift`` (``mean = 0``, ``var = 1 - eps``): a PyTorch-style
  state dict for ``.npz`` sources (convert with
  :func:`ec2t_jax.models.torch_convert.convert_state_dict`), Flax variables
  ``{"params", "batch_stats"}`` for Flax sources.

  Raises:
    ExportFormatError: for a corrupt file, or one not written by
      :func:`export_inference`.
  """
  data = _read_packed(path, max_bytes)
  info, arrays = container.unpack_leaves(data, max_bytes=max_bytes)
  user = info.meta.get("user")
  settings = user.get("inference") if isinstance(user, dict) else None
  if not isinstance(settings, dict) or not isinstance(settings.get("eps"), float):
    raise ExportFormatError(f"{path}: not an inference file (written by export_inference)")
  eps, paths = settings["eps"], settings.get("batch_norms", [])
  if not (0.0 <= eps < 1.0 and isinstance(paths, list) and all(isinstance(p, str) for p in paths)):
    raise ExportFormatError(f"{path}: corrupt inference settings {settings!r:.120}")
  tree = trees.unflatten(arrays, info.structure)
  try:
    return inference_export.unfold_batch_norm(tree, eps=eps, batch_norm_paths=paths)
  except (KeyError, TypeError, AttributeError, IndexError) as e:
    raise ExportFormatError(f"{path}: inference settings do not match the tree "
                            f"({type(e).__name__}: {e})") from None
