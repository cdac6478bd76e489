"""Bytes and throughput of the packed export on the official EC2T ResNet-20 checkpoints.

For each checkpoint in ``../shared/data/ec2t-reference``: file bytes of the
float32 ``.npz``, ``gzip -9`` of it, the packed file with the paper's bitmasks,
with order-0 coding (every range-coded leaf on layout 0), with context coding
(the default), the inference export (``--inference``) and the paper's count
(scoring params x 4 bytes); for the ternary layers against ``numel x H0``; the
inference file's logits against the float model (ternary path, 64 random
inputs). Then encode time and decode throughput in MB of float32 weights
restored per second (median of ``--repeats`` runs), also on a synthetic
ResNet-18-sized ternary model.

Usage::

    python benchmarks/export_size.py [--repeats 5] [--large 11000000] [--markdown OUT.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ec2t_jax import export
from ec2t_jax import report
from ec2t_jax._src.export import context_coding
from ec2t_jax._src.export import container

DATA = Path(__file__).resolve().parents[1].parent / "shared/data/ec2t-reference"
NAMES = ("fp", "ec2t_spars45", "ec2t_spars64", "ec2t_spars73")


def _median_seconds(fn, repeats, clock=time.perf_counter):
  times = []
  for _ in range(repeats):
    start = clock()
    fn()
    times.append(clock() - start)
  return statistics.median(times)


def _float32_mb(tree) -> float:
  return sum(4 * np.asarray(a).size for a in tree.values()) / 1e6


def _order0_pack(tree) -> bytes:
  """A valid version-2 file whose range-coded leaves all use layout 0 (adaptive order 0).

  Layout 0 is order 0 for every shape, so the normal reader decodes it: this
  measures what the contexts add, on a real file.
  """
  layouts = context_coding.layouts
  context_coding.layouts = lambda shape: layouts(shape)[:1]
  try:
    data = container.pack(tree)
  finally:
    context_coding.layouts = layouts
  return data


def _logit_error(source: Path, packed: Path, inputs: int = 64) -> tuple[float, float]:
  """Max |logit difference| of the inference file's ternary path vs the float model."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ec2t_jax._src.export import inference  # pylint: disable=g-import-not-at-top
  from ec2t_jax.models import resnet, torch_convert  # pylint: disable=g-import-not-at-top
  model = resnet.cifar_resnet(20)
  with np.load(source) as npz:
    params, stats = torch_convert.convert_state_dict({k: npz[k] for k in npz.files})
  params2, stats2 = torch_convert.convert_state_dict(export.load_inference(packed))
  variables = {"params": params2, "batch_stats": stats2}
  weights = inference.ternary_weights(params2)
  errors = []
  for x in (np.random.default_rng(0).normal(size=(inputs, 32, 32, 3)),
            np.random.default_rng(0).random(size=(inputs, 32, 32, 3))):
    x = jnp.asarray(x.astype(np.float32))
    expected = model.apply({"params": params, "batch_stats": stats}, x)
    got = inference.ternary_apply(model, variables, x, ternary=weights)
    errors.append(float(jnp.max(jnp.abs(got - expected))))
  return errors[0], errors[1]


def _sizes_table(repeats: int, logits: bool) -> tuple[list[str], list[str]]:
  sizes = ["| checkpoint | float32 B (numel x 4) | float32 `.npz` B | `gzip -9` of it B | bitmasks B | order-0 coding B | "
           "context coding B (default) | x smaller than `.npz` | inference export B | "
           "paper's count B |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  ternary = ["| checkpoint | ternary weights | numel x H0 B | context-coded B | / H0 | "
             "order-0 B | / H0 | two bitmasks B | paper best format B |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  inference_rows = ["| checkpoint | inference file B | paper's count B | file / paper | "
                    "max logit error, N(0,1) inputs | max logit error, U[0,1) inputs |",
                    "|---|---:|---:|---:|---:|---:|"]
  speed = ["| model | float32 MB | encode s | decode s (wall) | decode MB/s (wall) | "
           "decode s (CPU) | decode MB/s (CPU) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for name in NAMES:
    path = DATA / f"resnet20_{name}.npz"
    if not path.exists():
      print(f"skipping {path}: not found", file=sys.stderr)
      continue
    with np.load(path) as npz:
      tree = {k: npz[k] for k in npz.files}
    npz_bytes = path.stat().st_size
    gz = len(gzip.compress(path.read_bytes(), compresslevel=9))
    data = container.pack(tree)
    assert all(a.tobytes() == tree[k].tobytes() for k, a in container.unpack(data).items())
    order0 = _order0_pack(tree)
    assert all(a.tobytes() == tree[k].tobytes() for k, a in container.unpack(order0).items())
    bitmask = len(container.pack(tree, entropy_coding=False))
    with tempfile.TemporaryDirectory() as tmp:
      inference_file = Path(tmp) / "inference.ec2t"
      inference_bytes = export.export_inference(path, inference_file).info.total_bytes
      errors = _logit_error(path, inference_file) if logits else (float("nan"),) * 2
    r = report.build_report(tree)
    f32 = r["bytes"]["float32"]
    paper = r["bytes"]["paper_rule"]
    sizes.append(f"| {name} | {f32:,} | {npz_bytes:,} | {gz:,} | {bitmask:,} | {len(order0):,} | "
                 f"{len(data):,} | {npz_bytes / len(data):.1f} | {inference_bytes:,} | "
                 f"{paper:,.0f} |")
    inference_rows.append(f"| {name} | {inference_bytes:,} | {paper:,.0f} | "
                          f"{inference_bytes / paper:.3f} | {errors[0]:.4f} | {errors[1]:.4f} |")
    t = r["bytes"]["ternary"]
    if r["sparsity_detail"]["ternary_weights"]:
      o0 = sum(rec.nbytes for rec in container.read_info(order0).records
               if rec.codec in container.TERNARY_CODECS)
      ternary.append(
          f"| {name} | {r['sparsity_detail']['ternary_weights']:,} | {t['entropy_bound']:,.0f} | "
          f"{t['payload']:,.0f} | {t['payload'] / t['entropy_bound']:.3f} | {o0:,} | "
          f"{o0 / t['entropy_bound']:.3f} | {t['bitmask']:,.0f} | {t['paper_rule']:,.0f} |")
    enc = _median_seconds(lambda: container.pack(tree), repeats)
    dec = _median_seconds(lambda: container.unpack(data), repeats)
    cpu = _median_seconds(lambda: container.unpack(data), repeats, time.process_time)
    mb = _float32_mb(tree)
    speed.append(f"| resnet20_{name} | {mb:.2f} | {enc:.4f} | {dec:.4f} | {mb / dec:.1f} | "
                 f"{cpu:.4f} | {mb / cpu:.1f} |")
  return sizes + [""] + ternary + [""] + inference_rows, speed


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
  parser.add_argument("--no-logits", action="store_true",
                      help="skip the logit comparison (needs JAX; a few seconds per checkpoint)")
  args = parser.parse_args(argv)
  sizes, speed = _sizes_table(args.repeats, not args.no_logits)
  rules = _rules_table()
  if args.large:
    tree = _large_model(args.large)
    data = container.pack(tree)
    enc = _median_seconds(lambda: container.pack(tree), max(1, args.repeats // 2))
    dec = _median_seconds(lambda: container.unpack(data), max(1, args.repeats // 2))
    cpu = _median_seconds(lambda: container.unpack(data), max(1, args.repeats // 2),
                          time.process_time)
    mb = _float32_mb(tree)
    speed.append(f"| synthetic {sum(v.size for v in tree.values()):,} weights (64% sparse "
                 f"ternary 3x3x256x256 layers) | {mb:.1f} | {enc:.3f} | {dec:.3f} | "
                 f"{mb / dec:.1f} | {cpu:.3f} | {mb / cpu:.1f} |")
    speed.append(f"\n(synthetic model packed: {len(data):,} B, "
                 f"{8 * len(data) / sum(v.size for v in tree.values()):.3f} bits/weight)")
  machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
             f"load average {os.getloadavg()[0]:.1f} at the end, "
             f"Python {platform.python_version()}, numpy {np.__version__}")
  text = "\n".join(["## Sizes", "", *sizes, "", "## Accounting under rule variants", "",
                    *rules, "", f"## Throughput ({machine})", "", *speed, ""])
  print(text)
  if args.markdown:
    Path(args.markdown).write_text(text)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
