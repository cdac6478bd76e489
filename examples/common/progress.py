"""Progress display that reads well both on a terminal and in a log file.

On a terminal (``stderr`` is a TTY) a tqdm bar is redrawn in place. Anywhere
else (CI, ``nohup ... > log``, a notebook capture) a redrawn bar would leave one
line per redraw, so there is either nothing between the per-epoch lines the
loops print themselves (``lines=False``), or one line per tenth of the run
(``lines=True``, for step-based loops without epochs).

Example:
  >>> from common.progress import progress
  >>> import io
  >>> log = io.StringIO()
  >>> bar = progress(True, 20, "fp", stream=log, lines=True)
  >>> for _ in range(20):
  ...   bar.update(1)
  >>> print(log.getvalue().splitlines()[0])
  [fp] 10% (2/20 steps)
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class NoBar:
  """Shows nothing."""
  enabled = False

  def update(self, n: int = 1) -> None:
    del n

  def set_postfix(self, **values: Any) -> None:
    del values

  def close(self) -> None:
    pass


class LineProgress:
  """One printed line each time another tenth of ``total`` steps is done.

  Args:
    total: steps of the whole run shown (the line says ``done/total``).
    description: the prefix, in brackets.
    initial: steps already done (resumed runs start there).
    stream: where the lines go.
    fractions: how many lines over the whole run (10: every 10%).
  """
  enabled = True

  def __init__(self, total: int, description: str, initial: int = 0,
               stream: TextIO | None = None, fractions: int = 10):
    self.total, self.description, self.count = max(int(total), 1), description, int(initial)
    self.stream = stream if stream is not None else sys.stdout
    self.fractions = fractions
    self._shown = self._tenths(self.count)
    self._postfix: dict[str, Any] = {}
    self._started, self._start_count = time.perf_counter(), self.count

  def _tenths(self, count: int) -> int:
    return count * self.fractions // self.total

  def update(self, n: int = 1) -> None:
    self.count += n
    reached = self._tenths(self.count)
    if reached > self._shown:
      self._shown = reached
      self._print()

  def set_postfix(self, **values: Any) -> None:
    self._postfix = values

  def _print(self) -> None:
    elapsed = time.perf_counter() - self._started
    rate = (self.count - self._start_count) / elapsed if elapsed > 0 else 0.0
    percent = 100 * self.count // self.total
    extra = "".join(f"  {k} {v}" for k, v in self._postfix.items())
    speed = f"  {rate:.2f} steps/s" if self.count > self._start_count and elapsed > 1 else ""
    print(f"[{self.description}] {percent}% ({self.count}/{self.total} steps){speed}{extra}",
          file=self.stream, flush=True)

  def close(self) -> None:
    pass


def is_terminal(stream: TextIO | None = None) -> bool:
  """Whether ``stream`` (default ``sys.stderr``, where tqdm draws) is a terminal."""
  stream = stream if stream is not None else sys.stderr
  isatty = getattr(stream, "isatty", None)
  try:
    return bool(isatty and isatty())
  except ValueError:  # a closed stream
    return False


def progress(enabled: bool, total: int, description: str, *, initial: int = 0,
             stream: TextIO | None = None, lines: bool = False):
  """A tqdm bar on a terminal; elsewhere lines every 10% (``lines``) or nothing.

  Args:
    enabled: show anything at all (``--progress`` and process 0).
    total: steps of the whole bar.
    description: its label.
    initial: steps already done.
    stream: the terminal to test and draw on (default ``sys.stderr``; the
      lines go to it too when given, else to ``sys.stdout`` with the log).
    lines: outside a terminal, print one line per 10% (else nothing).

  Returns:
    An object with ``enabled``, ``update(n)``, ``set_postfix(**values)`` and
    ``close()``.
  """
  if not enabled or total - initial <= 0:
    return NoBar()
  if is_terminal(stream):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=total, initial=initial, desc=description, leave=False,
               dynamic_ncols=True, file=stream)
    bar.enabled = True
    return bar
  if lines:
    return LineProgress(total, description, initial, stream)
  return NoBar()
