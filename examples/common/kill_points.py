"""Named kill points of a training run: a test hook for ``--resume``.

TEST HOOK ONLY; it does nothing unless one of these environment variables is set:

* ``EC2T_EXAMPLES_KILL_AT=<point>``: the process kills itself with ``SIGKILL``
  (no clean-up, no ``finally``, no ``atexit``: like a preempted machine or
  ``kill -9``) the moment it reaches ``<point>``;
* ``EC2T_EXAMPLES_KILL_POINTS=<file>``: every point reached is appended to
  ``<file>``, one name a line (how a test enumerates them).

A point is named ``<phase>/<step>/<write>``: right after phase ``<phase>``
finished writing ``<write>`` for its step ``<step>``, where ``<write>`` is
``record`` (the epoch's line of ``metrics.jsonl``), ``latest`` or ``best`` (the
orbax checkpoint, committed; the step-based GPT runner of :mod:`common.language`
has ``record`` and ``latest`` only). A kill between two points is equivalent to a kill at
the earlier one (only computation happens in between; a kill inside an orbax save
leaves a temporary folder that orbax ignores). So killing a run at every point it
reaches, and resuming each time, covers every instant of the run.

Example:
  >>> from common.kill_points import reached
  >>> reached("ec2t_phase1/4/latest")  # no-op unless the environment asks for it
"""

from __future__ import annotations

import os
import signal

KILL_AT = "EC2T_EXAMPLES_KILL_AT"
POINTS_FILE = "EC2T_EXAMPLES_KILL_POINTS"


def reached(point: str) -> None:
  """Marks ``point`` as reached: logs it and/or kills the process if the environment asks."""
  log = os.environ.get(POINTS_FILE)
  if log:
    with open(log, "a", encoding="utf-8") as f:
      f.write(point + "\n")
  if os.environ.get(KILL_AT) == point:
    _kill(point)


def _kill(point: str) -> None:  # tests running in-process replace it by a raise
  del point
  os.kill(os.getpid(), signal.SIGKILL)
