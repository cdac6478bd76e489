"""User-facing errors: a clear one-line message instead of a traceback.

Example:
  >>> from absl import app
  >>> # app.run(report_user_errors(main))
"""

from __future__ import annotations

import functools
import sys
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
    :class:`UserError`; other exceptions propagate unchanged (they are bugs).
  """
  @functools.wraps(main)
  def wrapped(argv: list[str]) -> None:
    try:
      main(argv)
    except UserError as error:
      print(f"error: {error}", file=sys.stderr, flush=True)
      sys.exit(2)
  return wrapped


def script_main(run: Callable[..., object]) -> Callable[[list[str]], None]:
  """The absl ``main`` of an example script, around its ``run(flag_values)``.

  It rejects stray arguments, keeps orbax's per-save INFO logs quiet unless
  ``--verbosity`` is given, starts ``jax.distributed`` when asked or detected,
  turns a requested stop into a hint to ``--resume``, and prints
  :class:`UserError` as one line (exit status 2).

  Example:
    >>> # app.run(script_main(run))
  """
  def main(argv: list[str]) -> None:
    # Imported here so that the error helpers above load without JAX.
    from absl import flags, logging  # pylint: disable=g-import-not-at-top
    from common import parallel  # pylint: disable=g-import-not-at-top
    from common.training import StopRequested  # pylint: disable=g-import-not-at-top
    if len(argv) > 1:
      raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    fv = flags.FLAGS
    if not fv["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    parallel.initialize_distributed(fv.distributed, fv.coordinator_address,
                                    fv.num_processes, fv.process_id)
    try:
      run(fv)
    except StopRequested as stop:
      print(f"{stop}; continue with --resume", file=sys.stderr)
  return report_user_errors(main)
