"""Per-epoch metrics to JSON lines and TensorBoard (tensorboardX).

Every record is one JSON object per line in ``<workdir>/metrics.jsonl`` (easy to
read back with :func:`read_jsonl`, e.g. by ``examples/plot_curves.py``) and the
numeric fields also go to TensorBoard event files in ``<workdir>/tensorboard``
under ``<phase>/<name>``. Only process 0 writes.

A run killed after writing an epoch's record but before checkpointing that
epoch writes the record again when it resumes: :meth:`MetricWriter.rewind`
first drops the records its checkpoint does not cover (and a line torn by the
kill), so the file of a resumed run equals that of an uninterrupted one.
TensorBoard event files are append-only: a replayed epoch appears twice there.

Example:
  >>> from common.metrics import MetricWriter
  >>> writer = MetricWriter("/tmp/run")
  >>> writer.write({"phase": "fp", "epoch": 1, "step": 469, "val_accuracy": 0.98})
  >>> writer.close()
"""

from __future__ import annotations

import json
import math
import numbers
import os
from typing import Any


class MetricWriter:
  """Appends records to ``metrics.jsonl`` and TensorBoard.

  Args:
    workdir: Output folder (created if missing).
    enabled: ``False`` on processes other than 0 (then every call is a no-op).
  """

  def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(os.fspath(workdir), "metrics.jsonl")
    self._tensorboard = None
    if enabled:
      os.makedirs(os.fspath(workdir), exist_ok=True)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tensorboard = SummaryWriter(os.path.join(os.fspath(workdir), "tensorboard"))

  def write(self, record: dict[str, Any]) -> None:
    """Writes one record; needs ``"step"`` and uses ``"phase"`` as TensorBoard prefix.

    Nested dicts (e.g. ``{"sparsity": {"conv2/kernel": 0.93}}``) are kept nested
    in JSON and flattened to ``sparsity/conv2/kernel`` in TensorBoard.
    """
    if not self.enabled:
      return
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(_jsonable(record), sort_keys=True) + "\n")
    prefix = record.get("phase", "train")
    step = int(record["step"])
    for name, value in _flatten(record):
      if name not in ("step", "epoch") and isinstance(value, numbers.Real) \
          and not isinstance(value, bool) and math.isfinite(value):
        self._tensorboard.add_scalar(f"{prefix}/{name}", float(value), step)
    self._tensorboard.flush()

  def rewind(self, phase: str, step: int | None) -> None:
    """Drops the records of ``phase`` after ``step`` (all of them if ``None``) and torn lines.

    Called when a phase resumes from its checkpoint at ``step`` (``None``: the
    phase restarts from scratch), before it writes again. The file is replaced
    atomically and only if something is dropped.

    Args:
      phase: The phase that resumes.
      step: Its checkpoint's step: records with a larger ``"step"`` are dropped.
    """
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path, encoding="utf-8") as f:
      lines = f.readlines()
    kept = [line for line in lines if _covered(line, phase, step)]
    if kept == lines:
      return
    temporary = f"{self.path}.tmp{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as f:
      f.writelines(kept)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, self.path)

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def _covered(line: str, phase: str, step: int | None) -> bool:
  """Whether ``line`` is a whole record that a resume of ``phase`` at ``step`` keeps."""
  if not line.endswith("\n"):
    return False  # torn by a kill while writing
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return False
  if not isinstance(record, dict) or record.get("phase") != phase:
    return True
  return step is not None and int(record.get("step", 0)) <= step


def _flatten(record: dict[str, Any], prefix: str = ""):
  for key, value in record.items():
    if isinstance(value, dict):
      yield from _flatten(value, f"{prefix}{key}/")
    else:
      yield f"{prefix}{key}", value


def _jsonable(value: Any) -> Any:
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if hasattr(value, "item") and getattr(value, "shape", None) == ():
    return value.item()
  return value


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads every record of a ``metrics.jsonl`` file (skipping a torn last line)."""
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records
