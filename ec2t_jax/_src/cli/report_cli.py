"""``python -m ec2t_jax.report``: the command line of :mod:`ec2t_jax.report`.

Bad input is one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Optional, Sequence

from ec2t_jax._src.cli import cli_support
from ec2t_jax._src.report.accounting import EXACT_RULES, PAPER_RULES
from ec2t_jax._src.export.packing import DEFAULT_MAX_BYTES
from ec2t_jax._src.report.reporting import build_report, format_report


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m ec2t_jax.report",
      description="Per-layer sparsity, entropy, bytes; totals vs float32 and the paper's "
                  "storage rule; op counts, MicroNet FLOPs and energy.")
  parser.add_argument("path", help="packed .ec2t file, orbax checkpoint directory or .npz")
  parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
  parser.add_argument("--geometry", default="auto",
                      help="'auto' (CIFAR ResNets), 'none', or a JSON file from save_geometry")
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument("--rules", choices=("paper", "exact"), default="paper",
                      help="paper: the reference's counting; exact: every residual add, "
                           "dead inputs only where a layer's own input slice is zero")
  parser.add_argument("--mul-bits", type=int, default=None,
                      help="bits per multiplication (paper 16; its full-precision 81.3M uses 32)")
  parser.add_argument("--keys", default="params", help="checkpoint entries to read")
  parser.add_argument("--max-bytes", type=cli_support.byte_size, default=DEFAULT_MAX_BYTES,
                      help="largest input (file and decoded arrays) accepted, e.g. 512M or 8G "
                           "(default: 4G)")
  parser.add_argument("--plots", metavar="DIR", help="also write PNG plots into DIR")
  parser.add_argument("--latent", metavar="NPZ",
                      help="latent / pretrained weights for the histogram plots")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Command-line entry point; returns the exit status (2 on bad input)."""
  args = _parser().parse_args(argv)
  rules = PAPER_RULES if args.rules == "paper" else EXACT_RULES
  if args.mul_bits:
    rules = dataclasses.replace(rules, mul_bits=args.mul_bits)
  try:
    report = build_report(args.path, geometry=args.geometry, rules=rules,
                          image_size=args.image_size,
                          keys=tuple(k for k in args.keys.split(",") if k),
                          max_bytes=args.max_bytes)
    if args.plots:
      from ec2t_jax import plots  # matplotlib only when asked for
      written = plots.write_report_plots(report, args.plots, source=args.path,
                                         latent=args.latent, keys=args.keys.split(","))
      report["plots"] = [str(p) for p in written]
  except cli_support.BAD_INPUT as e:
    return cli_support.fail("ec2t_jax.report", e)
  if args.json:
    print(json.dumps(report, indent=1))
  else:
    print(format_report(report))
    for p in report.get("plots", []):
      print(f"wrote {p}")
  return 0
