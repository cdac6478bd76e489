"""What the two command lines share: byte sizes as arguments, bad input as one line."""

from __future__ import annotations

import argparse
import re
import sys
import zipfile

from ec2t_jax._src.export.packing import ExportFormatError

# Errors that mean "this input cannot be used": reported in one line, status 2.
BAD_INPUT = (ExportFormatError, ValueError, KeyError, OSError, EOFError, MemoryError,
             RecursionError, zipfile.BadZipFile)

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def byte_size(text: str) -> int:
  """Parses ``4096``, ``512K``, ``64M``, ``4G`` or ``4GiB`` (binary units) into bytes.

  Example:
    >>> byte_size("4G")
    4294967296
  """
  match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
  if not match:
    raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (examples: 4096, 512M, 4G)")
  return int(match.group(1)) * _UNITS[match.group(2).upper()]


def fail(program: str, error: BaseException) -> int:
  """Prints ``error`` as one line on stderr and returns exit status 2."""
  message = " ".join(str(error).split()) or type(error).__name__
  if isinstance(error, (MemoryError, RecursionError, KeyError)):
    message = f"{type(error).__name__}: {message}"
  print(f"{program}: error: {message}", file=sys.stderr)
  return 2
