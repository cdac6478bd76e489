"""Orbax checkpoints of a training phase: the latest (for ``--resume``) and the best.

Each phase writes ``<dir>/latest/<step>/`` and ``<dir>/best/<step>/`` holding

* ``state``: the whole train state (params, batch statistics, the full optimizer
  state -- for EC2T the latent weights, centroids, assignment and the inner
  optimizers' moments -- the step and the RNG key), saved with shardings so
  every process writes its own pieces;
* ``meta``: JSON with the data position (epoch, step in epoch), the phase, the
  best validation accuracy so far and a fingerprint of the run (model,
  dataset, ...), checked on restore.

Orbax writes a checkpoint into a temporary folder and renames it only once it
is complete, and older checkpoints are deleted only after that. A crash during
a save therefore leaves the previous checkpoint usable; the incomplete
temporary folder is ignored (and cleaned up by the next run).

The pair is written ``latest`` first: a new best state is first saved as
``latest/<step>`` with ``best_step = <step>`` in its meta, then copied to
``best/<step>``. ``latest``'s meta is therefore the truth about the pair, and a
kill between the two saves leaves a pair that :meth:`PhaseCheckpoints.repair`
completes (it saves ``latest/<best_step>`` as ``best/<best_step>``, the very
state the interrupted save was writing). It also deletes a ``best`` that no
``latest`` refers to (left by versions that wrote ``best`` first; such a step
made every later save of it fail with orbax's ``StepAlreadyExistsError``).

Example:
  >>> from common.checkpoint import PhaseCheckpoints
  >>> ckpts = PhaseCheckpoints("/tmp/run/checkpoints/ec2t_phase1", {"model": "lenet5"})
  >>> # ckpts.save_latest(step, state, meta); state, meta = ckpts.restore("latest", abstract)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp

from common.cli import UserError


def _manager(directory: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=False,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


class PhaseCheckpoints:
  """The ``latest`` and ``best`` checkpoints of one training phase.

  Args:
    directory: Folder of this phase (created if missing).
    fingerprint: JSON-serialisable facts that must match on restore
      (model name, dataset, ...); a mismatch is a :class:`UserError`.
    keep_latest: How many recent checkpoints to keep.
  """

  def __init__(self, directory: str | os.PathLike, fingerprint: dict[str, Any],
               keep_latest: int = 2):
    self.directory = os.path.abspath(os.fspath(directory))  # orbax needs absolute paths
    self.fingerprint = dict(fingerprint)
    try:
      self._managers = {"latest": _manager(os.path.join(self.directory, "latest"), keep_latest),
                        "best": _manager(os.path.join(self.directory, "best"), 1)}
    except (OSError, ValueError) as error:
      raise UserError(f"cannot use checkpoint folder {self.directory}: {error}") from None

  def step(self, which: str = "latest") -> int | None:
    """Step of the newest complete ``which`` checkpoint, or ``None``."""
    return self._managers[which].latest_step()

  def save(self, which: str, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Saves ``state`` and ``meta`` (+ fingerprint) as checkpoint ``step`` of ``which``.

    Blocks until the checkpoint is committed (complete on disk).
    """
    manager = self._managers[which]
    meta = {**meta, "fingerprint": self.fingerprint, "step": int(step)}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()

  def meta(self, which: str = "latest") -> dict[str, Any] | None:
    """The JSON metadata of the newest ``which`` checkpoint (``None`` if there is none)."""
    step = self.step(which)
    if step is None:
      return None
    try:
      restored = self._managers[which].restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as error:  # orbax raises many types for unreadable files
      raise UserError(f"checkpoint {self._path(which, step)} is unreadable "
                      f"(corrupt or incomplete?): {_first_line(error)}") from None
    return dict(restored["meta"])

  def restore(self, which: str, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores the newest ``which`` checkpoint into the structure of ``abstract_state``.

    Args:
      which: ``"latest"`` or ``"best"``.
      abstract_state: ``jax.ShapeDtypeStruct`` tree with shardings (the state
        is restored directly into those shardings).

    Returns:
      ``(state, meta)``.

    Raises:
      UserError: no checkpoint, a different fingerprint (another model or
        dataset), a structure/shape mismatch, or unreadable files.
    """
    meta = self.meta(which)
    if meta is None:
      raise UserError(f"no {which} checkpoint in {self.directory}")
    step = meta["step"]
    self.check_compatible(which)
    try:
      restored = self._managers[which].restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                        meta=ocp.args.JsonRestore()))
    except Exception as error:  # orbax raises many types for mismatching or damaged files
      raise UserError(f"cannot restore checkpoint {self._path(which, step)} "
                      f"(does not match this model/optimizer, or is corrupt): "
                      f"{_first_line(error)}") from None
    return restored["state"], dict(restored["meta"])

  def check_compatible(self, which: str = "latest") -> None:
    """Raises :class:`UserError` if the newest ``which`` checkpoint has another fingerprint."""
    meta = self.meta(which)
    if meta is None:
      return
    saved = meta.get("fingerprint", {})
    differences = {k: (saved.get(k), v) for k, v in self.fingerprint.items() if saved.get(k) != v}
    if differences:
      listed = ", ".join(f"{k}: checkpoint {a!r} vs this run {b!r}"
                         for k, (a, b) in sorted(differences.items()))
      raise UserError(f"checkpoint {self._path(which, meta['step'])} is incompatible with this "
                      f"run ({listed}); use another --workdir or matching flags")

  def repair(self, abstract_state: Any) -> int | None:
    """Makes ``best`` agree with ``latest`` after a kill between their two saves.

    ``latest``'s meta names the best step (``best_step``; ``None`` before the
    first evaluation). If ``best`` lacks that step, the state of
    ``latest/<best_step>`` (kept: it is the newest ``latest``) is saved there;
    every other ``best`` step is deleted. Without any ``latest``, every ``best``
    step is an orphan and is deleted. A ``latest`` meta without ``best_step``
    (older versions, which saved ``best`` first) only loses the ``best`` steps
    newer than itself: the resumed run writes them again.

    Args:
      abstract_state: As for :meth:`restore` (needed to copy a state).

    Returns:
      The step saved to ``best`` from ``latest``, or ``None`` if none was needed.

    Raises:
      UserError: if the ``best`` step to restore is no longer in ``latest``.
    """
    best_manager = self._managers["best"]
    meta = self.meta("latest")
    copied = None
    if meta is None:
      keep = None
    elif "best_step" not in meta:  # written best-first: a newer best is an orphan
      keep = best_manager.latest_step()
      keep = keep if keep is not None and keep <= meta["step"] else None
    else:
      keep = meta["best_step"]
      if keep is not None and keep not in best_manager.all_steps():
        self._copy_latest_to_best(keep, abstract_state)
        copied = keep
    for step in best_manager.all_steps():
      if step != keep:
        best_manager.delete(step)
    return copied

  def _copy_latest_to_best(self, step: int, abstract_state: Any) -> None:
    if step not in self._managers["latest"].all_steps():
      raise UserError(f"cannot repair {self.directory}: its best step {step} is neither in "
                      "best/ nor in latest/")
    try:
      restored = self._managers["latest"].restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                        meta=ocp.args.JsonRestore()))
    except Exception as error:  # orbax raises many types for mismatching or damaged files
      raise UserError(f"cannot restore checkpoint {self._path('latest', step)} to repair "
                      f"best/: {_first_line(error)}") from None
    self.save("best", step, restored["state"], dict(restored["meta"]))

  def close(self) -> None:
    for manager in self._managers.values():
      manager.close()

  def _path(self, which: str, step: int) -> str:
    return os.path.join(self.directory, which, str(step))


def check_workdir(workdir: str | os.PathLike, fingerprint: dict[str, Any], resume: bool,
                  phases: tuple[str, ...], method_fingerprint: dict[str, Any] | None = None
                  ) -> None:
  """Fails fast, before any data is loaded, if ``workdir`` cannot be used as asked.

  Args:
    workdir: The run's output folder.
    fingerprint: Facts every phase checkpoint must match (model, dataset...).
    resume: Whether the run continues from existing checkpoints.
    phases: Names of the phase folders under ``workdir/checkpoints``.
    method_fingerprint: The facts of every phase but ``fp`` (default ``fingerprint``).

  Raises:
    UserError: checkpoints exist but ``resume`` is off, or they belong to
      another model/dataset.
  """
  root = os.path.join(os.fspath(workdir), "checkpoints")
  for phase in phases:
    if not os.path.isdir(os.path.join(root, phase)):
      continue
    facts = fingerprint if phase == "fp" else (method_fingerprint or fingerprint)
    ckpts = PhaseCheckpoints(os.path.join(root, phase), {**facts, "phase": phase})
    try:
      if ckpts.step("latest") is None:
        continue
      if not resume:
        raise UserError(f"{ckpts.directory} already holds checkpoints: pass --resume to continue "
                        "that run, or choose a new --workdir")
      ckpts.check_compatible("latest")
    finally:
      ckpts.close()


LOCK_FILE = ".lock"
# What a run killed mid-write leaves: MetricWriter.rewind's copy, ec2t.export's atomic write
# (``.<name>.<random>.tmp``), orbax's folders of an unfinished save.
_TEMPORARY_FILE = re.compile(r"metrics\.jsonl\.tmp\d+|\..+\.tmp")
_TEMPORARY_FOLDER = "orbax-checkpoint-tmp"
_HELD: set[str] = set()  # the lock files this process holds


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike, enabled: bool = True) -> Iterator[None]:
  """Holds ``<workdir>/.lock`` for a run: a second run on the workdir is refused.

  The lock is an ``flock`` on the file, which holds the holder's pid: the
  kernel drops it when its process ends, however it ends, so a lock file left
  by a dead process (a stale lock) is simply taken over. With the lock held,
  the temporary files of a killed run are deleted (:func:`remove_temporaries`).
  Re-entrant within a process (the script's ``main`` and the pipeline both take it).

  Args:
    workdir: The run's output folder (created if missing).
    enabled: False on the processes other than 0 of a multi-host run.

  Raises:
    UserError: another live process holds the lock (its pid is named).
  """
  path = os.path.abspath(os.path.join(os.fspath(workdir), LOCK_FILE))
  if not enabled or path in _HELD:  # held by this process: the script's main holds it
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  handle = open(path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
  try:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or "unknown"
      raise UserError(f"{os.fspath(workdir)} is in use by process {holder} (lock {path}); wait "
                      "for that run to end or choose another --workdir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    remove_temporaries(workdir)
    _HELD.add(path)
    try:
      yield
    finally:
      _HELD.discard(path)
  finally:
    handle.close()  # releases the flock


def remove_temporaries(workdir: str | os.PathLike) -> list[str]:
  """Deletes the half-written files a killed run left in ``workdir``; returns their paths.

  Only call it while holding :func:`workdir_lock` (a live run's temporaries are its own).
  """
  removed = []
  for root, folders, files in os.walk(os.fspath(workdir)):
    for name in folders[:]:
      if _TEMPORARY_FOLDER in name:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        folders.remove(name)
        removed.append(os.path.join(root, name))
    for name in files:
      if _TEMPORARY_FILE.fullmatch(name):
        os.remove(os.path.join(root, name))
        removed.append(os.path.join(root, name))
  return sorted(removed)


def _step_folder(path: str) -> str:
  """Resolves a phase folder (its ``best``), a ``best``/``latest`` folder or a step folder."""
  for candidate in (os.path.join(path, "best"), path):
    if os.path.isdir(candidate) and not os.path.exists(os.path.join(candidate, "state")):
      steps = sorted((int(d) for d in os.listdir(candidate) if d.isdigit()), reverse=True)
      if steps:
        return os.path.join(candidate, str(steps[0]))
  return path


def read_state(directory: str | os.PathLike) -> dict[str, Any]:
  """Reads a whole saved train state as nested dicts/lists of arrays on one local device.

  No model or optimizer is needed: the structure comes from the checkpoint's
  metadata (named tuples come back as dicts). Used by ``--init_from`` and to
  compare runs in tests.

  Args:
    directory: A phase folder (reads its newest ``best``), a ``best``/``latest``
      folder (newest step) or one step folder.

  Returns:
    ``{"params": ..., "batch_stats": ..., "opt_state": ..., "step": ..., "rng": ...}``.

  Raises:
    UserError: if the folder is not a readable checkpoint of these examples.
  """
  path = _step_folder(os.path.abspath(os.fspath(directory)))
  state_dir = os.path.join(path, "state")
  if not os.path.isdir(state_dir):
    raise UserError(f"{directory} is not a checkpoint of these examples (no state/ folder)")
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      metadata = checkpointer.metadata(state_dir)
      tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata
      return checkpointer.restore(state_dir, jax.tree.map(_abstract_on_cpu, tree))
  except Exception as error:  # orbax raises many types for damaged files
    raise UserError(f"cannot read checkpoint {path}: {_first_line(error)}") from None


def restore_variables(directory: str | os.PathLike) -> tuple[dict, dict]:
  """``params`` and ``batch_stats`` of a checkpoint of these examples (see :func:`read_state`).

  Used by ``--init_from`` to start EC2T from a full-precision run.
  """
  state = read_state(directory)
  return state["params"], state.get("batch_stats") or {}


def _abstract_on_cpu(meta: Any) -> jax.ShapeDtypeStruct:
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype, sharding=sharding)


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0][:300] if text else type(error).__name__
