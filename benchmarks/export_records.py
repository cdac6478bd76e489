"""Bytes of packed files before and after version 2's ``tf`` / ``cb`` records.

Each ``.ec2t`` file given is decoded and packed twice with its own user
metadata: once with every codec but ``tf`` and ``cb`` (what the writer did
before them) and once with all. Both must restore the file's tree bit for bit.
Prints one Markdown row per file: bytes before, after, the ratio, and the
codecs that changed (how many leaves).

With ``--resnet20 CHECKPOINT.npz`` (the official float ResNet-20), the
representative trees are built instead: every conv kernel but the first,
turned to Flax's HWIO layout, replaced by TWN ``threshold="filter"``, STTN
(``sttn_init`` then per-filter ``sttn_ternarize``), INQ 5 bits or MCQ
``K = 1`` (per layer) values; the other leaves stay float32.

Usage::

    python benchmarks/export_records.py FILE.ec2t [FILE.ec2t ...]
    python benchmarks/export_records.py --resnet20 ../shared/data/ec2t-reference/resnet20_fp.npz
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import numpy as np

from ec2t_jax._src.export import container


def _same(a, b) -> bool:
  return all(x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
             for x, y in zip(a, b)) and len(a) == len(b)


def _resnet20_trees(path: Path) -> dict:
  import jax
  import ec2t_jax as ec2t

  def twn(w):
    a, alpha = ec2t.twn_ternarize(w, threshold="filter")
    return alpha * a

  def sttn(w):
    a, alpha = ec2t.sttn_ternarize(*ec2t.sttn_init(w), per_filter=True)
    return 2 * alpha * a

  def mcq(w):
    q, scale = ec2t.mcq_quantize(w, 1, jax.random.key(0))
    return q * scale

  methods = {"twn_filter": twn, "sttn": sttn, "inq_5bit": lambda w: ec2t.inq_quantize(w, bits=5),
             "mcq_k1": mcq}
  with np.load(path) as npz:
    fp = {k: npz[k] for k in npz.files}
  out = {}
  for name, method in methods.items():
    tree = {}
    for key, value in fp.items():
      if value.ndim == 4 and key != "conv1.weight":
        value = np.asarray(method(value.transpose(2, 3, 1, 0)), np.float32)
      tree[key] = value
    out[name] = tree
  return out


def measure(path: Path, tree=None, meta=None) -> str:
  if tree is None:
    data = path.read_bytes()
    info, arrays = container.unpack_leaves(data)
    tree = container.unpack(data)
    meta = info.meta.get("user")
  else:
    data = container.pack(tree)
    info, arrays = container.unpack_leaves(data)
  before = container.pack(tree, metadata=meta, codecs=set(container.CODECS) - {"tf", "cb"})
  after = container.pack(tree, metadata=meta)
  for packed in (before, after):
    assert _same(container.unpack_leaves(packed)[1], arrays), path
  old = {r.path: r.codec for r in container.read_info(before).records}
  changed = collections.Counter(f"{old[r.path]} -> {r.codec}"
                                for r in container.read_info(after).records if r.codec != old[r.path])
  changed = ", ".join(f"{n} x {change}" for change, n in sorted(changed.items())) or "-"
  stored = f"{len(data):,}" if path.exists() else "-"
  return (f"| {path.parent.name}/{path.name} | {stored} | {len(before):,} | {len(after):,} | "
          f"{len(before) / len(after):.2f} | {changed} |")


def main(argv) -> None:
  print("| file | as stored | before (no tf/cb) | after | before/after | leaves that changed |")
  print("|---|---:|---:|---:|---:|---|")
  if argv[:1] == ["--resnet20"]:
    for name, tree in _resnet20_trees(Path(argv[1])).items():
      print(measure(Path("resnet20") / name, tree))
    return
  for name in argv:
    print(measure(Path(name)))


if __name__ == "__main__":
  main(sys.argv[1:])
