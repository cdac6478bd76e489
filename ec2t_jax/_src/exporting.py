"""Files in the packed format: save / load, export a checkpoint, decode to ``.npz``.

The public names are re-exported by :mod:`ec2t_jax.export`; the format itself
is :mod:`ec2t_jax._src.packing`.

Example:
  >>> info = save("/tmp/doc.ec2t", {"w": np.array([0.5, 0.0, -0.5, 0.5], np.float32)})
  >>> load("/tmp/doc.ec2t")["w"]
  array([ 0.5,  0. , -0.5,  0.5], dtype=float32)
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np

from ec2t_jax._src import trees
from ec2t_jax._src import inference
from ec2t_jax._src import packing
from ec2t_jax._src import sources
from ec2t_jax._src.packing import (DEFAULT_MAX_BYTES, ExportFormatError, PackedInfo, pack,
                                   read_info, unpack)
from ec2t_jax._src.sources import load_tree


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
    ternary = sum(r.codec in packing.TERNARY_CODECS for r in records)
    coded = sum(r.codec in ("te", "se") for r in records)
    ratio = self.float32_bytes / max(self.info.total_bytes, 1)
    return (f"{out_path}: {self.info.total_bytes:,} bytes from {self.source_path} "
            f"({self.source_kind}, {len(records)} leaves, {self.float32_bytes:,} bytes as float32: "
            f"{ratio:.1f}x smaller); {ternary} ternary leaves, {coded} entropy-coded")


def save(path, tree, *, float16: bool = False, entropy_coding: bool = True,
         metadata: Optional[dict] = None) -> PackedInfo:
  """Packs ``tree`` and writes it to ``path`` atomically.

  Args:
    path: output file (conventionally ``*.ec2t``).
    tree: Linen params, ``nnx.State`` / ``to_pure_dict()``, an ``.npz`` dict...
    float16: store non-ternary float leaves as float16 (lossy).
    entropy_coding: allow range coding (else bitmasks for ternary leaves).
    metadata: JSON-able dict stored in the header.

  Returns:
    The written file's :class:`PackedInfo`.

  Example:
    >>> info = save("/tmp/model.ec2t", {"w": np.zeros(4, np.float32)})
    >>> info.records[0].codec
    'raw'
  """
  data = pack(tree, float16=float16, entropy_coding=entropy_coding, metadata=metadata)
  sources.atomic_write(path, data)
  return read_info(data)


def _read_packed(path, max_bytes: int) -> bytes:
  path = Path(path)
  size = path.stat().st_size
  if size > max_bytes:
    raise ExportFormatError(f"{path}: {size:,} bytes, more than max_bytes={max_bytes:,}")
  return path.read_bytes()


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
  return unpack(_read_packed(path, max_bytes), max_bytes=max_bytes)


def load_ternary(path, *, max_bytes: int = DEFAULT_MAX_BYTES):
  """Like :func:`load`, with every ternary leaf as a :class:`TernaryWeight`.

  The assignment (``int8``) and the two values are what the ternary
  inference path (:func:`ec2t_jax._src.inference.ternary_dense` /
  ``ternary_conv``) computes with.
  """
  info, arrays = packing.unpack_leaves(_read_packed(path, max_bytes), max_bytes=max_bytes)
  leaves = []
  for array in arrays:
    weight = inference.as_ternary(array)
    leaves.append(array if weight is None else weight)
  return trees.unflatten(leaves, info.structure)


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
  """
  loaded = load_tree(source, keys=keys, max_bytes=max_bytes)
  meta = {"source_kind": loaded.kind, **(metadata or {})}
  info = save(out_path, loaded.tree, float16=float16, entropy_coding=entropy_coding,
              metadata=meta)
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
  """
  loaded = load_tree(source, max_bytes=max_bytes)
  arrays = sources.flat_arrays(loaded.tree)
  for key, array in arrays.items():
    if array.dtype.kind == "V":
      raise ValueError(f"leaf {key!r} has dtype {array.dtype.name}, which .npz cannot hold; "
                       "use ec2t_jax.export.load() instead")
  sources.atomic_save_npz(out_path, arrays)
  return arrays


