"""What the command lines share: one-line errors for any failure, safe output, safe paths.

Every command line runs its work through :func:`run`: whatever goes wrong
(bad input, an unexpected exception, a closed pipe, text the terminal cannot
encode) is one line on stderr and exit status 2, never a traceback. Usage
errors are one line too (:class:`OneLineParser`).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from ec2t_jax._src.export.errors import ExportFormatError

# Errors that mean "this input cannot be used": reported as their message alone.
# Anything else is reported with its type name first (it is still one line).
BAD_INPUT = (ExportFormatError, ValueError, KeyError, OSError, EOFError, MemoryError,
             RecursionError, zipfile.BadZipFile)
_NAMED = (MemoryError, RecursionError, KeyError)  # messages that mean little alone

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def byte_size(text: str) -> int:
  """Parses ``4096``, ``512K``, ``64M``, ``4G`` or ``4GiB`` (binary units) into bytes.

  Example:
    >>> from ec2t_jax._src.cli.cli_support import byte_size  # internal
    >>> byte_size("4G")
    4294967296
  """
  match = re.fullmatch(r"\s*(\d{1,30})\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
  if not match:
    raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (examples: 4096, 512M, 4G)")
  return int(match.group(1)) * _UNITS[match.group(2).upper()]


def printable(text: str, stream) -> str:
  """``text`` with what ``stream``'s encoding cannot write (lone surrogates...) escaped."""
  encoding = getattr(stream, "encoding", None) or "utf-8"
  try:
    return text.encode(encoding, "backslashreplace").decode(encoding)
  except LookupError:  # an unknown encoding name
    return text.encode("ascii", "backslashreplace").decode("ascii")


def echo(text: str) -> None:
  """Prints ``text`` on stdout; characters stdout cannot encode are escaped, never an error."""
  print(printable(text, sys.stdout), file=sys.stdout)


def _message(error: BaseException) -> str:
  try:
    text = str(error)
  except Exception:  # pylint: disable=broad-except  # a broken __str__
    text = ""
  message = " ".join(text.split()) or type(error).__name__
  if isinstance(error, _NAMED) or not isinstance(error, BAD_INPUT):
    message = f"{type(error).__name__}: {message}"
  return message


def fail(program: str, error: BaseException) -> int:
  """Prints ``error`` as one line on stderr and returns exit status 2."""
  try:
    print(printable(f"{program}: error: {_message(error)}", sys.stderr), file=sys.stderr)
  except (OSError, ValueError):  # stderr closed: the status still says it
    pass
  return 2


class OneLineParser(argparse.ArgumentParser):
  """``argparse`` whose usage errors are one line on stderr (status 2)."""

  def error(self, message):
    try:
      print(printable(f"{self.prog}: error: {message} (see --help)", sys.stderr),
            file=sys.stderr)
    except (OSError, ValueError):
      pass
    raise SystemExit(2)


def _quiet_stdout() -> None:
  """After a broken pipe: send what is left of stdout to /dev/null (no second error at exit)."""
  try:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
  except (OSError, ValueError, AttributeError):
    pass


def run(program: str, parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
        body: Callable[[argparse.Namespace], int]) -> int:
  """Parses ``argv`` and runs ``body(args)``: any exception is one line on stderr and status 2.

  ``--help`` and usage errors exit through ``SystemExit`` as argparse does
  (status 0 and 2); ``KeyboardInterrupt`` is status 130.
  """
  try:
    args = parser.parse_args(argv)
    return body(args)
  except SystemExit:
    raise
  except KeyboardInterrupt:
    fail(program, RuntimeError("interrupted"))
    return 130
  except BrokenPipeError as e:
    _quiet_stdout()
    return fail(program, e)
  except Exception as e:  # pylint: disable=broad-except  # the point: never a traceback
    return fail(program, e)


def _overwrites(out: Path, source: Path) -> bool:
  """Whether writing ``out`` replaces ``source`` or a file inside the directory ``source``."""
  target, original = out.resolve(), source.resolve()
  if target == original:
    return True
  try:
    if os.path.samefile(out, source):  # hard links, bind mounts
      return True
  except OSError:
    pass
  return original.is_dir() and original in target.parents and target.exists()


def refuse_overwriting(outputs: Iterable, inputs: Iterable) -> None:
  """Raises ``ValueError`` if an output path names one of the inputs (after links).

  Also refused: an existing file inside an input directory (a checkpoint's own
  files).

  Args:
    outputs: paths the command will write (``None`` entries are skipped).
    inputs: paths it reads (``None`` entries are skipped).
  """
  inputs = [Path(p) for p in inputs if p is not None]
  for out in (Path(p) for p in outputs if p is not None):
    for source in inputs:
      if _overwrites(out, source):
        raise ValueError(f"the output {str(out)!r} is the input {str(source)!r}; "
                         "refusing to overwrite it (choose another output path)")
