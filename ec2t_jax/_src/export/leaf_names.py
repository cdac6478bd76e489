"""The rule for leaf names, checked when a file is written and when it is read.

A leaf's name is its ``/``-joined path (:mod:`trees`); ``--decode`` writes it
as an ``.npz`` entry ``<name>.npy``, so a name must be a safe, distinct entry
name. A name is valid when it:

* encodes as UTF-8 (no lone surrogates) in at most :data:`MAX_NAME_BYTES`
  bytes (4,096: far below the zip format's 65,535-byte entry names);
* holds no NUL character (the zip writer cuts a name at its first NUL, which
  would merge leaves);
* is relative: it starts with neither ``/`` nor ``\\`` nor a drive letter
  (``C:``), and no component between ``/`` or ``\\`` is ``..``;

and all names of a file are distinct after the mapping a zip writer applies
(``\\`` becomes ``/`` where it is the path separator).

Example:
  >>> name_problem("layers/0/kernel") is None
  True
  >>> name_problem("../etc/x")
  "has a '..' component"
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

MAX_NAME_BYTES = 4096
_DRIVE = re.compile(r"[A-Za-z]:")
_SEPARATORS = re.compile(r"[/\\]")


def name_problem(name: str) -> Optional[str]:
  """What is wrong with one leaf name, or ``None`` if it is valid (module docstring)."""
  if not isinstance(name, str):
    return f"is a {type(name).__name__}, not a string"
  try:
    size = len(name.encode("utf-8"))
  except UnicodeEncodeError:
    return "is not valid UTF-8 (it holds a lone surrogate)"
  if size > MAX_NAME_BYTES:
    return f"is {size:,} bytes long in UTF-8 (at most {MAX_NAME_BYTES:,} allowed)"
  if "\x00" in name:
    return "holds a NUL character"
  if name.startswith(("/", "\\")) or _DRIVE.match(name):
    return "is an absolute path"
  if ".." in _SEPARATORS.split(name):
    return "has a '..' component"
  return None


def check_names(names: Sequence[str], error: type[Exception] = ValueError) -> None:
  """Raises ``error`` (one line) for the first invalid name or the first clash.

  Args:
    names: every leaf name of one file.
    error: the exception type (``ValueError`` when writing,
      ``ExportFormatError`` when reading).
  """
  seen = {}
  for name in names:
    problem = name_problem(name)
    if problem is not None:
      raise error(f"leaf name {name!r:.80} {problem}")
    entry = name.replace("\\", "/")
    if entry in seen:
      raise error(f"leaf names {seen[entry]!r:.80} and {name!r:.80} are the same .npz entry")
    seen[entry] = name
