"""User-facing errors: a clear one-line message instead of a traceback.

Example:
  >>> from absl import app
  >>> # app.run(report_user_errors(main))
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Callable


class UserError(Exception):
  """A problem the user can fix (bad flag, missing data, incompatible checkpoint).

  Its message is printed as ``error: <message>`` and the program exits with
  status 2, without a traceback.
  """


def report_user_errors(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """Wraps an absl ``main`` so that :class:`UserError` ends the program cleanly.

  Args:
    main: The ``main(argv)`` passed to ``absl.app.run``.

  Returns:
    A ``main`` that prints ``error: ...`` to stderr and exits with status 2 on
    :class:`UserError` (at once when other threads are left, so that nothing follows
    the line); other exceptions propagate unchanged (they are bugs).
  """
  @functools.wraps(main)
  def wrapped(argv: list[str]) -> None:
    try:
      main(argv)
    except UserError as error:
      print(f"error: {error}", file=sys.stderr, flush=True)
      _exit(2)
  return wrapped


def _exit(status: int) -> None:
  """Exits with ``status``; at once if other threads are alive (orbax's, after a refused
  restore), so that none of them prints tracebacks ("Event loop is closed") at shutdown."""
  if any(t is not threading.main_thread() for t in threading.enumerate()):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # pylint: disable=protected-access
  sys.exit(status)
