"""Bytes of packed files before and after version 2's ``tf`` / ``cb`` records.

Each ``.ec2t`` file given is decoded and packed twice with its own user
metadata: once with every codec but ``tf`` and ``cb`` (what the writer did
before them) and once with all. Both must restore the file's tree bit for bit.
Prints one Markdown row per file: bytes before, after, the ratio, and the
codec of each leaf that changed.

Usage::

    python benchmarks/export_records.py FILE.ec2t [FILE.ec2t ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ec2t_jax._src import packing


def _same(a, b) -> bool:
  return all(x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
             for x, y in zip(a, b)) and len(a) == len(b)


def measure(path: Path) -> str:
  data = path.read_bytes()
  info, arrays = packing.unpack_leaves(data)
  tree = packing.unpack(data)
  meta = info.meta.get("user")
  before = packing.pack(tree, metadata=meta, codecs=set(packing.CODECS) - {"tf", "cb"})
  after = packing.pack(tree, metadata=meta)
  for packed in (before, after):
    assert _same(packing.unpack_leaves(packed)[1], arrays), path
  old = {r.path: r.codec for r in packing.read_info(before).records}
  changed = [f"{r.path.split('/')[-2] if '/' in r.path else r.path}:{old[r.path]}->{r.codec}"
             for r in packing.read_info(after).records if r.codec != old[r.path]]
  return (f"| {path.parent.name}/{path.name} | {len(data):,} | {len(before):,} | {len(after):,} | "
          f"{len(before) / len(after):.2f} | {', '.join(changed) or '-'} |")


def main(argv) -> None:
  print("| file | as stored | before (no tf/cb) | after | before/after | leaves that changed |")
  print("|---|---:|---:|---:|---:|---|")
  for name in argv:
    print(measure(Path(name)))


if __name__ == "__main__":
  main(sys.argv[1:])
