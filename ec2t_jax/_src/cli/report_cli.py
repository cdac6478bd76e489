"""``python -m ec2t_jax.report``: the command line of :mod:`ec2t_jax.report`.

Bad input, and any other failure (text the terminal cannot show included), is
one line on stderr and exit status 2, never a traceback. ``--plots`` never
overwrites the report's inputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

from ec2t_jax._src.cli import cli_support
from ec2t_jax._src.report.accounting import EXACT_RULES, PAPER_RULES
from ec2t_jax._src.export.container import DEFAULT_MAX_BYTES
from ec2t_jax._src.report.reporting import build_report, format_report

PROGRAM = "ec2t_jax.report"


def _parser() -> argparse.ArgumentParser:
  parser = cli_support.OneLineParser(
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
  parser.add_argument("--activation-bits", type=int, choices=(8,), default=None,
                      help="the model's quantized layers take int8 inputs (W1.58A8, e.g. "
                           "models.GPT(..., activation_bits=8)): ops read 'ternary x int8'")
  parser.add_argument("--keys", default="params", help="checkpoint entries to read")
  parser.add_argument("--max-bytes", type=cli_support.byte_size, default=DEFAULT_MAX_BYTES,
                      help="largest input (file and decoded arrays) accepted, e.g. 512M or 8G "
                           "(default: 4G)")
  parser.add_argument("--plots", metavar="DIR", help="also write PNG plots into DIR")
  parser.add_argument("--latent", metavar="NPZ",
                      help="latent / pretrained weights for the histogram plots")
  return parser


def _plot_paths(args) -> list:
  """The files ``--plots`` may write (checked against the inputs before anything runs)."""
  if not args.plots:
    return []
  return [Path(args.plots) / name for name in ("layer_bars.png", "histograms.png")]


def _report(args) -> int:
  cli_support.refuse_overwriting(_plot_paths(args), [args.path, args.latent])
  rules = PAPER_RULES if args.rules == "paper" else EXACT_RULES
  if args.mul_bits:
    rules = dataclasses.replace(rules, mul_bits=args.mul_bits)
  if args.activation_bits:
    rules = dataclasses.replace(rules, activation_bits=args.activation_bits)
  report = build_report(args.path, geometry=args.geometry, rules=rules,
                        image_size=args.image_size,
                        keys=tuple(k for k in args.keys.split(",") if k),
                        max_bytes=args.max_bytes)
  if args.plots:
    from ec2t_jax import plots  # pylint: disable=g-import-not-at-top  # matplotlib only when asked
    written = plots.write_report_plots(report, args.plots, source=args.path,
                                       latent=args.latent, keys=args.keys.split(","))
    report["plots"] = [str(p) for p in written]
  if args.json:
    text = json.dumps(report, indent=1)
  else:
    text = "\n".join([format_report(report)] + [f"wrote {p}" for p in report.get("plots", [])])
  cli_support.echo(text)
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Command-line entry point; returns the exit status (2 on bad input)."""
  return cli_support.run(PROGRAM, _parser(), argv, _report)
