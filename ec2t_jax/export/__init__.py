"""Compressed export of EC2T models: the bytes really shrink, and the model comes back.

A ternary layer is stored as its assignment plus two values: either the
paper's two bitmasks (non-zero mask + sign mask) or range-coded with
``constriction`` under an order-0 or previous-weight context model, whichever
is smaller; ECP and other sparse leaves store their non-zero positions the same
way and their values as floats; everything else is stored as is (float16 on
request). The file is versioned, has a magic number and a SHA-256 checksum,
and restores the same tree with bitwise-identical arrays. The format is
specified in :mod:`ec2t_jax._src.packing`.

Python API::

    from ec2t_jax import export
    export.save("model.ec2t", params)            # Linen params, NNX state, npz dict
    params = export.load("model.ec2t")          # the same tree, numpy arrays
    export.export_file("ckpt_dir", "model.ec2t")  # orbax checkpoint / .npz -> packed
    export.decode_file("model.ec2t", "model.npz")

Command line::

    python -m ec2t_jax.export IN OUT [--float16] [--bitmask-only] [--keys params]
    python -m ec2t_jax.export --decode IN OUT.npz

For NNX, save ``nnx.state(model)`` (or its ``to_pure_dict()``) and put the
loaded dict back with ``nnx.replace_by_pure_dict(state, loaded)`` then
``nnx.update(model, state)``. For inference directly from the assignment see
:func:`load_ternary` and :mod:`ec2t_jax._src.inference`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np

from ec2t_jax._src import flat_tree
from ec2t_jax._src import inference
from ec2t_jax._src import packing
from ec2t_jax._src import sources
from ec2t_jax._src.packing import (CODECS, FORMAT_VERSION, MAGIC, ExportFormatError,
                                   LeafRecord, PackedInfo, pack, read_info, ternary_parts,
                                   unpack)
from ec2t_jax._src.inference import TernaryWeight
from ec2t_jax._src.sources import load_tree

__all__ = [
    "CODECS", "FORMAT_VERSION", "MAGIC", "ExportFormatError", "ExportResult", "LeafRecord",
    "PackedInfo", "TernaryWeight", "decode_file", "export_file", "load", "load_ternary",
    "load_tree", "main", "pack", "read_info", "save", "ternary_parts", "unpack",
]


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


def load(path):
  """Reads a packed file back into the tree that was saved (numpy arrays).

  Raises:
    ExportFormatError: wrong magic or version, truncated or corrupted file.
  """
  return unpack(Path(path).read_bytes())


def load_ternary(path):
  """Like :func:`load`, with every ternary leaf as a :class:`TernaryWeight`.

  The assignment (``int8``) and the two values are what the ternary
  inference path (:func:`ec2t_jax._src.inference.ternary_dense` /
  ``ternary_conv``) computes with.
  """
  info, arrays = packing.unpack_leaves(Path(path).read_bytes())
  leaves = []
  for array in arrays:
    weight = inference.as_ternary(array)
    leaves.append(array if weight is None else weight)
  return flat_tree.unflatten(leaves, info.structure)


def _sizes(tree) -> tuple[int, int]:
  leaves = flat_tree.flatten(tree)[0]
  return (sum(a.size * a.dtype.itemsize for _, a in leaves), sum(4 * a.size for _, a in leaves))


def export_file(source, out_path, *, keys: Sequence[str] = ("params",), float16: bool = False,
                entropy_coding: bool = True, metadata: Optional[dict] = None) -> ExportResult:
  """Compresses a training checkpoint, an ``.npz`` state dict or a packed file.

  Args:
    source: orbax checkpoint directory, ``.npz`` file or packed file.
    out_path: the packed file to write (atomically).
    keys: checkpoint entries to export (default its ``params``).
    float16, entropy_coding, metadata: as in :func:`save`.

  Returns:
    An :class:`ExportResult`.
  """
  loaded = load_tree(source, keys=keys)
  meta = {"source_kind": loaded.kind, **(metadata or {})}
  info = save(out_path, loaded.tree, float16=float16, entropy_coding=entropy_coding,
              metadata=meta)
  raw, f32 = _sizes(loaded.tree)
  return ExportResult(info, loaded.kind, loaded.path, raw, f32)


def decode_file(source, out_path) -> dict[str, np.ndarray]:
  """Restores a packed file (or any readable source) as an ``.npz`` under its original keys.

  Flat state dicts keep their keys; nested trees use ``/``-joined paths.

  Returns:
    The arrays written, by key.
  """
  loaded = load_tree(source)
  arrays = sources.flat_arrays(loaded.tree)
  for key, array in arrays.items():
    if array.dtype.kind == "V":
      raise ValueError(f"leaf {key!r} has dtype {array.dtype.name}, which .npz cannot hold; "
                       "use ec2t_jax.export.load() instead")
  sources.atomic_save_npz(out_path, arrays)
  return arrays


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m ec2t_jax.export",
      description="Compress an EC2T model (orbax checkpoint, .npz state dict) into the packed "
                  ".ec2t format, or restore one with --decode.")
  parser.add_argument("input", help="checkpoint directory, .npz or packed file")
  parser.add_argument("output", help="packed file to write (with --decode: the .npz to write)")
  parser.add_argument("--decode", action="store_true",
                      help="restore INPUT into an .npz under its original keys")
  parser.add_argument("--float16", action="store_true",
                      help="store non-ternary float leaves as float16 (lossy)")
  parser.add_argument("--bitmask-only", action="store_true",
                      help="no entropy coding: ternary leaves as the paper's two bitmasks")
  parser.add_argument("--keys", default="params",
                      help="comma-separated checkpoint entries to export (default: params)")
  parser.add_argument("--quiet", action="store_true", help="print nothing on success")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Command-line entry point; returns the exit status (2 on bad input)."""
  args = _parser().parse_args(argv)
  try:
    if args.decode:
      arrays = decode_file(args.input, args.output)
      if not args.quiet:
        print(f"{args.output}: {len(arrays)} arrays restored from {args.input}")
    else:
      keys = tuple(k for k in args.keys.split(",") if k)
      result = export_file(args.input, args.output, keys=keys, float16=args.float16,
                           entropy_coding=not args.bitmask_only)
      if not args.quiet:
        print(result.summary(args.output))
  except (ExportFormatError, ValueError, OSError) as e:
    print(f"ec2t_jax.export: error: {e}", file=sys.stderr)
    return 2
  return 0
