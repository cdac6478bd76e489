"""The ``main`` of an example script: flags, ``jax.distributed``, clean errors.

Kept apart from :mod:`common.cli` (which loads without JAX and which the other
modules import for :class:`~common.cli.UserError`), so that no module of
``common`` imports one that imports it back.

Example:
  >>> # app.run(script_main(run))
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import flags
from absl import logging

from common import checkpoint
from common import parallel
from common.cli import report_user_errors
from common.cli import UserError
from common.training import StopRequested


def script_main(run: Callable[..., object]) -> Callable[[list[str]], None]:
  """The absl ``main`` of an example script, around its ``run(flag_values)``.

  It rejects stray arguments, keeps orbax's per-save INFO logs quiet unless
  ``--verbosity`` is given, starts ``jax.distributed`` when asked or detected,
  holds the workdir's lock (``common.checkpoint.workdir_lock``: a second run on it is
  refused, a killed run's temporaries removed), turns a requested stop into a hint to
  ``--resume``, and prints
  :class:`UserError` as one line (exit status 2).

  Example:
    >>> # app.run(script_main(run))
  """
  def main(argv: list[str]) -> None:
    if len(argv) > 1:
      raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    fv = flags.FLAGS
    if not fv["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    parallel.initialize_distributed(fv.distributed, fv.coordinator_address,
                                    fv.num_processes, fv.process_id)
    try:
      with checkpoint.workdir_lock(fv.workdir, enabled=parallel.is_main_process()):
        run(fv)
    except StopRequested as stop:
      print(f"{stop}; continue with --resume", file=sys.stderr)
  return report_user_errors(main)
