"""``python -m ec2t_jax.export``: the command line of :mod:`ec2t_jax.export`.

Bad input (a missing, corrupt, hostile or too large file, an output path that
is the input) and any other failure is one line on stderr and exit status 2,
never a traceback.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ec2t_jax._src.cli import cli_support
from ec2t_jax._src.export.exporting import decode_file, export_file, export_inference
from ec2t_jax._src.export.container import DEFAULT_MAX_BYTES
from ec2t_jax._src.export.packed_model import format_summary, load_packed

PROGRAM = "ec2t_jax.export"


def _parser() -> argparse.ArgumentParser:
  parser = cli_support.OneLineParser(
      prog="python -m ec2t_jax.export",
      description="Compress an EC2T model (orbax checkpoint, .npz state dict) into the packed "
                  ".ec2t format, or restore one with --decode.")
  parser.add_argument("input", help="checkpoint directory, .npz or packed file")
  parser.add_argument("output", nargs="?", default=None,
                      help="packed file to write (with --decode: the .npz to write; none with "
                           "--packed)")
  parser.add_argument("--decode", action="store_true",
                      help="restore INPUT into an .npz under its original keys")
  parser.add_argument("--inference", action="store_true",
                      help="inference file: batch norm folded into scale/shift, non-ternary "
                           "leaves as float16 (lossy for those leaves only, ternary ones bitwise); "
                           "reads params and batch_stats from checkpoints")
  parser.add_argument("--packed", action="store_true",
                      help="load INPUT (a packed file) as a packed inference model (ternary "
                           "kernels packed in memory) and print its layers and resident bytes")
  parser.add_argument("--route", choices=("xla", "pallas", "dense"), default="xla",
                      help="with --packed: int4 codes for XLA, 2-bit codes for the Pallas "
                           "kernel, or dense bf16 kernels (default: xla)")
  parser.add_argument("--float16", action="store_true",
                      help="store non-ternary float leaves as float16 (lossy)")
  parser.add_argument("--bitmask-only", action="store_true",
                      help="no entropy coding: ternary leaves as the paper's two bitmasks")
  parser.add_argument("--keys", default=None,
                      help="comma-separated checkpoint entries to export (default: params; "
                           "params,batch_stats with --inference)")
  parser.add_argument("--max-bytes", type=cli_support.byte_size, default=DEFAULT_MAX_BYTES,
                      help="largest input (file and decoded arrays) accepted, e.g. 512M or 8G "
                           "(default: 4G)")
  parser.add_argument("--quiet", action="store_true", help="print nothing on success")
  return parser


def _export(args) -> int:
  if args.packed:
    if args.output is not None:
      raise ValueError(f"--packed reads INPUT only; got an OUTPUT too ({args.output!r})")
    tree = load_packed(args.input, route=args.route, max_bytes=args.max_bytes)
    cli_support.echo(format_summary(tree, args.route))
    return 0
  if args.output is None:
    raise ValueError("OUTPUT is required (except with --packed)")
  cli_support.refuse_overwriting([args.output], [args.input])
  if args.decode:
    arrays = decode_file(args.input, args.output, max_bytes=args.max_bytes)
    summary = f"{args.output}: {len(arrays)} arrays restored from {args.input}"
  elif args.inference:
    keys = tuple(k for k in (args.keys or "params,batch_stats").split(",") if k)
    result = export_inference(args.input, args.output, keys=keys, max_bytes=args.max_bytes)
    summary = result.summary(args.output) + " (inference: batch norm folded, float16 leaves)"
  else:
    keys = tuple(k for k in (args.keys or "params").split(",") if k)
    result = export_file(args.input, args.output, keys=keys, float16=args.float16,
                         entropy_coding=not args.bitmask_only, max_bytes=args.max_bytes)
    summary = result.summary(args.output)
  if not args.quiet:
    cli_support.echo(summary)
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Command-line entry point; returns the exit status (2 on bad input)."""
  return cli_support.run(PROGRAM, _parser(), argv, _export)
