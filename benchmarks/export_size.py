"""Bytes and throughput of the packed export on the official EC2T ResNet-20 checkpoints.

For each checkpoint in ``../shared/data/ec2t-reference``: the packed size
(lossless default, float16 option, bitmask-only) against float32, the paper's
best-of-formats count (scoring params x 4 bytes) and, for the ternary layers,
``numel x H0`` (zeroth-order entropy). Then encode / decode throughput in MB of
float32 weights per second (median of ``--repeats`` runs), also on a synthetic
ResNet-18-sized ternary model.

Usage::

    python benchmarks/export_size.py [--repeats 5] [--large 11000000] [--markdown OUT.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from ec2t_jax import report
from ec2t_jax._src import packing

DATA = Path(__file__).resolve().parents[1].parent / "shared/data/ec2t-reference"
NAMES = ("fp", "ec2t_spars45", "ec2t_spars64", "ec2t_spars73")


def _median_seconds(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _float32_mb(tree) -> float:
  return sum(4 * np.asarray(a).size for a in tree.values()) / 1e6


def _sizes_table(repeats: int) -> tuple[list[str], list[str]]:
  sizes = ["| checkpoint | float32 B | packed B (lossless) | x smaller | packed, float16 option | "
           "packed, bitmask only | paper best-of-formats B | packed / paper |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  ternary = ["| checkpoint | ternary weights | packed (te) B | numel x H0 B | packed / H0 bound | "
             "two bitmasks B | paper best format B | packed / paper |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
  speed = ["| model | float32 MB | encode s | encode MB/s | decode s | decode MB/s |",
           "|---|---:|---:|---:|---:|---:|"]
  for name in NAMES:
    path = DATA / f"resnet20_{name}.npz"
    if not path.exists():
      print(f"skipping {path}: not found", file=sys.stderr)
      continue
    with np.load(path) as npz:
      tree = {k: npz[k] for k in npz.files}
    data = packing.pack(tree)
    assert all(a.tobytes() == tree[k].tobytes() for k, a in packing.unpack(data).items())
    half = len(packing.pack(tree, float16=True))
    bitmask = len(packing.pack(tree, entropy_coding=False))
    r = report.build_report(tree)
    f32 = r["bytes"]["float32"]
    paper = r["bytes"]["paper_rule"]
    sizes.append(f"| {name} | {f32:,} | {len(data):,} | {f32 / len(data):.1f} | {half:,} | "
                 f"{bitmask:,} | {paper:,.0f} | {len(data) / paper:.2f} |")
    t = r["bytes"]["ternary"]
    if r["sparsity_detail"]["ternary_weights"]:
      ternary.append(
          f"| {name} | {r['sparsity_detail']['ternary_weights']:,} | {t['payload']:,.0f} | "
          f"{t['entropy_bound']:,.0f} | {t['payload'] / t['entropy_bound']:.3f} | "
          f"{t['bitmask']:,.0f} | {t['paper_rule']:,.0f} | {t['payload'] / t['paper_rule']:.3f} |")
    enc = _median_seconds(lambda: packing.pack(tree), repeats)
    dec = _median_seconds(lambda: packing.unpack(data), repeats)
    mb = _float32_mb(tree)
    speed.append(f"| resnet20_{name} | {mb:.2f} | {enc:.4f} | {mb / enc:.1f} | {dec:.4f} | "
                 f"{mb / dec:.1f} |")
  return sizes + [""] + ternary, speed


_VARIANTS = (
    ("paper rules (default)", {}),
    ("no tree adder", {"tree_adder": False}),
    ("no CSR/CER/scheme 2", {"compressed_formats": False}),
    ("published script's ResNet-20 branch (ternary layers counted as sparse 16-bit)",
     {"ternary_rules": False, "tree_adder": False, "compressed_formats": False}),
    ("every residual add counted", {"skip_adds": "all"}),
    ("dead inputs only where a layer's own input slice is zero", {"dead_inputs": "own"}),
    ("no dead-channel removal", {"dead_channels": False}),
)


def _rules_table() -> list[str]:
  """Scoring params and FLOPs of each checkpoint under variants of the counting rules."""
  names = [n for n in NAMES[1:] if (DATA / f"resnet20_{n}.npz").exists()]
  lines = ["| rules | " + " | ".join(f"{n} params / MFLOPs" for n in names) + " |",
           "|---|" + "---:|" * len(names)]
  trees = {}
  for n in names:
    with np.load(DATA / f"resnet20_{n}.npz") as npz:
      trees[n] = {k: npz[k] for k in npz.files}
  for label, change in _VARIANTS:
    rules = dataclasses.replace(report.PAPER_RULES, **change)
    cells = []
    for n in names:
      r = report.build_report(trees[n], rules=rules)
      cells.append(f"{r['scoring_params']:,.1f} / {r['flops'] / 1e6:.3f}")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  sparsity = []
  for n in names:
    rep = report.build_report(trees[n])
    d = rep["sparsity_detail"]
    weights = rep["layers"]
    w_zeros = sum(round(l["sparsity"] * l["numel"]) for l in weights)
    w_total = sum(l["numel"] for l in weights)
    sparsity.append(f"| {n} | {100 * rep['sparsity']:.2f} | {100 * w_zeros / w_total:.2f} | "
                    f"{100 * d['ternary_zeros'] / d['ternary_weights']:.2f} |")
  lines += ["", "| checkpoint | sparsity % over all parameters (paper's rule) | over conv + dense "
            "weights | over ternary layers |", "|---|---:|---:|---:|", *sparsity]
  return lines


def _large_model(weights: int, seed: int = 0) -> dict:
  """Synthetic ternary model: 3x3x256x256 layers at 64% sparsity plus float leaves."""
  rng = np.random.default_rng(seed)
  per_layer = 3 * 3 * 256 * 256
  tree = {}
  for i in range(max(1, weights // per_layer)):
    a = rng.choice(np.array([-1, 0, 1], np.int8), size=(3, 3, 256, 256), p=[0.18, 0.64, 0.18])
    tree[f"layer{i}/kernel"] = np.where(a > 0, np.float32(0.05), np.where(
        a < 0, np.float32(-0.04), np.float32(0)))
    tree[f"layer{i}/bn_scale"] = rng.normal(size=256).astype(np.float32)
  return tree


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--large", type=int, default=11_000_000,
                      help="weights of the synthetic model (0: skip)")
  parser.add_argument("--markdown", help="also write the tables to this file")
  args = parser.parse_args(argv)
  sizes, speed = _sizes_table(args.repeats)
  rules = _rules_table()
  if args.large:
    tree = _large_model(args.large)
    data = packing.pack(tree)
    enc = _median_seconds(lambda: packing.pack(tree), max(1, args.repeats // 2))
    dec = _median_seconds(lambda: packing.unpack(data), max(1, args.repeats // 2))
    mb = _float32_mb(tree)
    speed.append(f"| synthetic {sum(v.size for v in tree.values()):,} weights (64% sparse "
                 f"ternary 3x3x256x256 layers) | {mb:.1f} | {enc:.3f} | {mb / enc:.1f} | "
                 f"{dec:.3f} | {mb / dec:.1f} |")
    speed.append(f"\n(synthetic model packed: {len(data):,} B, "
                 f"{8 * len(data) / sum(v.size for v in tree.values()):.3f} bits/weight)")
  machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
             f"Python {platform.python_version()}, numpy {np.__version__}")
  text = "\n".join(["## Sizes", "", *sizes, "", "## Accounting under rule variants", "",
                    *rules, "", f"## Throughput ({machine})", "", *speed, ""])
  print(text)
  if args.markdown:
    Path(args.markdown).write_text(text)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
