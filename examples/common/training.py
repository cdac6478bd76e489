"""Train state, sharded train/eval steps and the epoch loop of one training phase.

The same loop runs every phase (full-precision pretraining, EC2T phase 1, EC2T
phase 2): only the optimizer differs. EC2T lives entirely in the optimizer
(``ec2t.reference_optimizer`` or an ``optax.chain`` ending in
``ec2t.ternarize_transform``), so the step is an ordinary Flax/optax step.

The step is ``jax.jit`` with explicit ``in_shardings``/``out_shardings`` over a
``(data, fsdp)`` mesh (see :mod:`common.parallel`); the state is donated.

Example:
  >>> # state = runner.init_state(lambda: TrainState.create(params, {}, tx, seed=0))
  >>> # best_state, record = runner.run_phase("fp", tx, epochs=10, init_state=..., resume=False)
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import augment as augment_lib
from common import checkpoint as checkpoint_lib
from common import data as data_lib
from common import kill_points
from common import parallel
from common import progress as progress_lib
from common.cli import UserError
from common.metrics import MetricWriter


class TrainState(NamedTuple):
  """Everything that changes during training (a pytree of arrays, saved whole).

  Attributes:
    step: Steps taken in the current phase (int32); with the data order it
      fixes the data position (epoch, step in epoch).
    params: Model parameters (for EC2T phases: already ternary).
    batch_stats: Batch-norm running statistics (``{}`` without batch norm).
    opt_state: The optimizer state (for EC2T: latent weights, centroids,
      assignment, inner optimizer moments).
    rng: Raw ``uint32[2]`` PRNG key, split every step (augmentation).
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array

  @classmethod
  def create(cls, params: Any, batch_stats: Any, tx: optax.GradientTransformation,
             seed: int, prepare_params: Callable[[Any, Any], Any] | None = None,
             ) -> "TrainState":
    """A fresh state: ``opt_state = tx.init(params)``, step 0.

    Args:
      params: Initial parameters.
      batch_stats: Initial batch statistics (``{}`` if none).
      tx: The phase's optimizer.
      seed: Seed of the RNG key.
      prepare_params: Optional ``(params, opt_state) -> params`` applied after
        ``init`` (``ec2t.quantized_params`` so the first forward pass is ternary).
    """
    opt_state = tx.init(params)
    if prepare_params is not None:
      params = prepare_params(params, opt_state)
    return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
               opt_state=opt_state, rng=jax.random.key_data(jax.random.key(seed)))


def _variables(params: Any, batch_stats: Any) -> dict[str, Any]:
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    spec: data_lib.DatasetSpec, augment: bool,
                    regularizer: Callable[[Any], jax.Array] | None = None) -> Callable:
  """``(state, batch) -> (state, metrics)``: one optimizer step on a global batch.

  Args:
    model: Flax module called as ``model.apply(variables, images, train=True)``.
    tx: The optimizer (EC2T or plain).
    spec: Dataset normalisation constants.
    augment: Random shifts (pad + crop; flips too where ``spec.flip``).
    regularizer: ``params -> scalar`` added to the loss (e.g.
      ``ec2t.sparsity_regularizer``), or None.

  Returns:
    The (unjitted) step function. Metrics: mean ``loss`` (cross-entropy, without the
    regularizer) and ``accuracy``.
  """
  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    rng, step_key = jax.random.split(jax.random.wrap_key_data(state.rng))
    images = augment_lib.prepare_images(batch["image"], spec.mean, spec.std,
                                        step_key if augment else None, flip=spec.flip,
                                        padding=spec.crop_padding)
    labels = batch["label"]

    def loss_fn(params):
      variables = _variables(params, state.batch_stats)
      if state.batch_stats:
        logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        new_stats = updates["batch_stats"]
      else:
        logits, new_stats = model.apply(variables, images, train=True), state.batch_stats
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      total = loss if regularizer is None else loss + regularizer(params)
      return total, (loss, logits, new_stats)

    (_, (loss, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
    new_state = TrainState(state.step + 1, params, batch_stats, opt_state,
                           jax.random.key_data(rng))
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module, spec: data_lib.DatasetSpec) -> Callable:
  """``(params, batch_stats, batch) -> sums``: masked sums of correct predictions and loss."""
  def eval_step(params, batch_stats, batch):
    images = augment_lib.prepare_images(batch["image"], spec.mean, spec.std)
    logits = model.apply(_variables(params, batch_stats), images, train=False)
    mask = batch["mask"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return {"correct": jnp.sum(mask * (jnp.argmax(logits, -1) == batch["label"])),
            "loss": jnp.sum(mask * losses), "count": jnp.sum(mask)}
  return eval_step


class StopRequested(Exception):
  """Raised after ``stop_after_steps`` steps, once the latest checkpoint is saved."""


@dataclasses.dataclass
class EvalData:
  """Evaluation shards of this process and the per-shard batch size."""
  shards: list[data_lib.Shard]
  per_shard_batch: int
  num_batches: int


@dataclasses.dataclass
class Runner:
  """Runs phases of training on a mesh, with checkpoints, metrics and progress bars.

  Attributes:
    model: The Flax module.
    spec: Dataset description (normalisation, classes).
    mesh: Device mesh from :func:`common.parallel.make_mesh`.
    train: Training batches of this process.
    val: Validation data (picks the best checkpoint).
    workdir: Output folder: ``checkpoints/<phase>/``, ``metrics.jsonl``, ``tensorboard/``.
    fingerprint: Facts checked when restoring checkpoints.
    method_fingerprint: Those of the method's phases (every phase but ``fp``), if
      they hold more (the method and its knobs).
    writer: Metric writer (disabled on processes other than 0).
    augment: Flip + crop augmentation during training.
    progress: Show tqdm progress bars (process 0 only).
    checkpoint_every_steps: Also save the latest checkpoint every this many
      steps inside an epoch (0: only at the end of epochs).
    stop_after_steps: Stop (after saving) once this many steps ran in this
      invocation (0: never); for tests and preemptible machines.
    epoch_metrics: Optional ``state -> dict`` of extra per-epoch metrics (EC2T
      sparsity per layer).
  """

  model: nn.Module
  spec: data_lib.DatasetSpec
  mesh: jax.sharding.Mesh
  train: data_lib.TrainBatches
  val: EvalData
  workdir: str
  fingerprint: dict[str, Any]
  writer: MetricWriter
  method_fingerprint: dict[str, Any] | None = None
  augment: bool = False
  progress: bool = True
  checkpoint_every_steps: int = 0
  stop_after_steps: int = 0
  steps_run: int = 0
  _eval_fns: dict = dataclasses.field(default_factory=dict)
  _step_fns: dict = dataclasses.field(default_factory=dict)

  # ------------------------------------------------------------------ state
  def shardings(self, abstract_state: Any) -> Any:
    return parallel.state_shardings(abstract_state, self.mesh)

  def abstract(self, make_state: Callable[..., TrainState], *args: Any) -> Any:
    """Shape/dtype/sharding tree of ``make_state(*args)`` (nothing is computed)."""
    shapes = jax.eval_shape(make_state, *args)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, self.shardings(shapes))

  def init_state(self, make_state: Callable[..., TrainState], *args: Any) -> TrainState:
    """Runs ``make_state(*args)`` jitted, writing the state directly into its shardings.

    ``args`` (e.g. the previous phase's params) are passed as arguments, not
    closed over, so large or multi-host arrays are never baked into the program.
    """
    shardings = self.shardings(jax.eval_shape(make_state, *args))
    replicated = parallel.replicated(self.mesh)
    args = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jax.device_put(x, replicated),
                        args)
    return jax.jit(make_state, out_shardings=shardings)(*args)

  # ------------------------------------------------------------------ eval
  def evaluate(self, state: TrainState, data: EvalData | None = None) -> dict[str, float]:
    """Accuracy and mean loss of ``state`` on ``data`` (default: validation)."""
    data = data or self.val
    key = jax.tree.structure((state.params, state.batch_stats))
    if key not in self._eval_fns:
      shardings = parallel.state_shardings((state.params, state.batch_stats), self.mesh)
      batch_sharding = parallel.batch_sharding(self.mesh)
      self._eval_fns[key] = jax.jit(
          make_eval_step(self.model, self.spec),
          in_shardings=(*shardings, batch_sharding), out_shardings=parallel.replicated(self.mesh))
    eval_fn = self._eval_fns[key]
    totals = None
    for local in data_lib.eval_batches(data.shards, data.per_shard_batch, data.num_batches):
      sums = eval_fn(state.params, state.batch_stats,
                     parallel.global_batch(local, parallel.batch_sharding(self.mesh)))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = parallel.to_host(totals)
    count = max(float(totals["count"]), 1.0)
    return {"accuracy": float(totals["correct"]) / count, "loss": float(totals["loss"]) / count,
            "examples": int(totals["count"])}

  # ------------------------------------------------------------------ phases
  def run_phase(self, phase: str, tx: optax.GradientTransformation, epochs: int,
                make_state: Callable[..., TrainState], make_state_args: tuple = (), *,
                resume: bool,
                evaluate_start: bool = False,
                epoch_metrics: Callable[[TrainState], dict] | None = None,
                regularizer: Callable[[Any], jax.Array] | None = None,
                keep: str = "best",
                ) -> tuple[TrainState, dict[str, Any]]:
    """Trains one phase and returns its best state (by validation accuracy) or its last.

    Resumes from the phase's latest checkpoint when ``resume`` is set; a phase
    already finished is not re-run (its best checkpoint is returned).

    Write order, so that a kill at any instant resumes to the same result as an
    uninterrupted run: at the end of an epoch the metrics record, then
    ``latest`` (whose meta names the best step and carries, mid-epoch, the
    epoch's running sums of the training metrics), then ``best`` if the epoch
    improved; on resume ``best`` is repaired from ``latest``
    (:meth:`~common.checkpoint.PhaseCheckpoints.repair`) and ``metrics.jsonl``
    rewound to the checkpoint (:meth:`~common.metrics.MetricWriter.rewind`).
    The named points after each write are test hooks
    (:mod:`common.kill_points`).

    Args:
      phase: Name, also the checkpoint folder (``fp``, ``ec2t_phase1``...).
      tx: The optimizer of this phase.
      epochs: Number of epochs.
      make_state: ``make_state(*make_state_args)`` builds the initial state
        (run only if the phase starts from scratch; traced for its shapes).
      make_state_args: Arrays it needs (e.g. the previous phase's best state).
      resume: Continue from checkpoints in ``workdir`` if present.
      evaluate_start: Evaluate (and keep as best candidate) the initial state.
      epoch_metrics: Extra metrics per epoch, e.g. EC2T sparsity.
      regularizer: Loss term of this phase (see :func:`make_train_step`).
      keep: ``"best"`` (by validation) or ``"last"`` (the state after the last
        step, e.g. a staged method's phase whose earlier epochs are half quantized).

    Returns:
      ``(best_state, info)`` (the last state with ``keep="last"``) with ``info`` = best validation accuracy, seconds
      per epoch, etc.

    Raises:
      StopRequested: after ``stop_after_steps`` steps (the latest checkpoint is saved).
    """
    facts = self.fingerprint if phase == "fp" else (self.method_fingerprint or self.fingerprint)
    ckpts = checkpoint_lib.PhaseCheckpoints(os.path.join(self.workdir, "checkpoints", phase),
                                            {**facts, "phase": phase})
    if keep not in ("best", "last"):
      raise ValueError(f"keep must be 'best' or 'last', got {keep!r}")
    try:
      return self._run_phase(phase, tx, epochs, make_state, make_state_args, ckpts,
                             resume=resume, evaluate_start=evaluate_start,
                             epoch_metrics=epoch_metrics, regularizer=regularizer, keep=keep)
    finally:
      ckpts.close()

  def _run_phase(self, phase, tx, epochs, make_state, make_state_args, ckpts, *, resume,
                 evaluate_start, epoch_metrics, regularizer=None, keep="best"):
    if epochs < 1:
      raise ValueError(f"[{phase}] needs at least one epoch")
    abstract = self.abstract(make_state, *make_state_args)
    meta = ckpts.meta("latest")
    if meta is not None and not resume:
      raise UserError(f"{ckpts.directory} already holds checkpoints: pass --resume to continue "
                      "that run, or choose a new --workdir")
    self._recover(phase, ckpts, abstract, meta, resume)
    total_steps = epochs * self.train.steps_per_epoch
    if meta is not None and meta.get("done"):
      return self._finished(phase, ckpts, meta, abstract, keep)
    if meta is not None:
      state, best, best_step, info, epoch_sums = self._resume(phase, ckpts, abstract, total_steps)
    else:
      state = self.init_state(make_state, *make_state_args)
      best, best_step, info = -1.0, None, {"epoch_seconds": [], "first_step_seconds": None}
      epoch_sums = None
      if evaluate_start:
        start = self.evaluate(state)
        best, best_step = start["accuracy"], 0
        self._record(phase, state, 0, {"val_accuracy": start["accuracy"],
                                       "val_loss": start["loss"]}, epoch_metrics)
        self._save_pair(phase, ckpts, 0, state,
                        self._meta(0, total_steps, best, best_step, info, done=False),
                        improved=True)

    step_fn = self._compile_step(tx, abstract, regularizer)
    step = int(parallel.to_host(state.step))
    while step < total_steps:
      epoch, in_epoch = self.train.position(step)
      state, step, epoch_train = self._run_epoch(phase, step_fn, state, step, epoch, in_epoch,
                                                 total_steps, info, ckpts, best, best_step,
                                                 epoch_sums)
      epoch_sums = None
      if epoch_train is None:  # interrupted inside the epoch after a checkpoint
        raise StopRequested(f"stopped after {self.steps_run} steps as asked")
      val = self.evaluate(state)
      done = step >= total_steps
      improved = val["accuracy"] > best
      if improved:
        best, best_step = val["accuracy"], step
      info["best_val_accuracy"] = best
      self._record(phase, state, epoch + 1, {**epoch_train, "val_accuracy": val["accuracy"],
                                             "val_loss": val["loss"]}, epoch_metrics)
      self._save_pair(phase, ckpts, step, state,
                      self._meta(step, total_steps, best, best_step, info, done=done),
                      improved=improved)
      if self.stop_after_steps and self.steps_run >= self.stop_after_steps and not done:
        raise StopRequested(f"stopped after {self.steps_run} steps as asked")
    info["best_val_accuracy"] = best
    if keep == "last":
      return state, info
    best_state, _ = ckpts.restore("best", abstract)
    return best_state, info

  def _recover(self, phase, ckpts, abstract, meta, resume):
    """Repairs a pair of checkpoints half written by a kill; rewinds the metrics to ``meta``."""
    repaired = ckpts.repair(abstract)
    if repaired is not None:  # the save of best/<repaired> that the kill interrupted is done
      kill_points.reached(f"{phase}/{repaired}/best")
    if resume:
      self.writer.rewind(phase, None if meta is None else meta["step"])

  def _finished(self, phase, ckpts, meta, abstract, keep):
    """A phase that its checkpoint says is done: its best (or last) state, not re-run."""
    if keep == "last":
      state, _ = ckpts.restore("latest", abstract)
      self._log(f"[{phase}] already finished; keeping its last state (step {meta['step']})")
      return state, {**meta["info"], "best_val_accuracy": meta["best_val_accuracy"]}
    state, best_meta = ckpts.restore("best", abstract)
    self._log(f"[{phase}] already finished; best validation accuracy "
              f"{best_meta['best_val_accuracy']:.4f} (step {best_meta['step']})")
    return state, {**meta["info"], "best_val_accuracy": best_meta["best_val_accuracy"]}

  def _resume(self, phase, ckpts, abstract, total_steps):
    """``(state, best, best_step, info, epoch_sums)`` from the latest checkpoint."""
    state, meta = ckpts.restore("latest", abstract)
    if meta["total_steps"] != total_steps:
      raise UserError(f"[{phase}] checkpoint was written for {meta['total_steps']} steps, this "
                      f"run asks for {total_steps} (epochs or batch flags changed)")
    self._log(f"[{phase}] resuming at step {int(meta['step'])} "
              f"(epoch {meta['epoch']}, step {meta['step_in_epoch']} of the epoch)")
    return (state, meta["best_val_accuracy"], meta.get("best_step"), meta["info"],
            _sums_from_json(meta.get("epoch_sums")))

  def _save_pair(self, phase, ckpts, step, state, meta, improved):
    """Saves ``latest`` (which names the best step), then ``best`` if ``improved``."""
    self._save(phase, ckpts, "latest", step, state, meta)
    if improved:
      self._save(phase, ckpts, "best", step, state, meta)

  @staticmethod
  def _save(phase, ckpts, which, step, state, meta):
    ckpts.save(which, step, state, meta)
    kill_points.reached(f"{phase}/{step}/{which}")

  def _compile_step(self, tx: optax.GradientTransformation, abstract: Any,
                    regularizer: Callable[[Any], jax.Array] | None = None) -> Callable:
    """The jitted step for ``tx`` (reused across phases that share the optimizer)."""
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    key = (id(tx), id(regularizer), jax.tree.structure(shardings))
    if key not in self._step_fns:
      self._step_fns[key] = jax.jit(
          make_train_step(self.model, tx, self.spec, self.augment, regularizer),
          in_shardings=(shardings, parallel.batch_sharding(self.mesh)),
          out_shardings=(shardings, parallel.replicated(self.mesh)),
          donate_argnums=0)
    return self._step_fns[key]

  def _run_epoch(self, phase, step_fn, state, step, epoch, in_epoch, total_steps, info, ckpts,
                 best, best_step, epoch_sums=None):
    """Runs the rest of epoch ``epoch`` from ``step``; its metrics are averaged over the whole
    epoch: ``epoch_sums`` carries the sums of its steps before ``step`` (from a checkpoint)."""
    steps_per_epoch = self.train.steps_per_epoch
    end = min((epoch + 1) * steps_per_epoch, total_steps)
    bar = _progress(self.progress and parallel.is_main_process(), end - step,
                    f"{phase} epoch {epoch + 1}", initial=in_epoch, total=steps_per_epoch)
    sums = epoch_sums
    started = time.perf_counter()
    batch_sharding = parallel.batch_sharding(self.mesh)
    while step < end:
      t0 = time.perf_counter()
      batch = parallel.global_batch(self.train.batch(step), batch_sharding)
      state, metrics = step_fn(state, batch)
      if info.get("first_step_seconds") is None:
        jax.block_until_ready(metrics)
        info["first_step_seconds"] = time.perf_counter() - t0
      sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
      step += 1
      self.steps_run += 1
      _show_step(bar, step, metrics)
      stopping = self.stop_after_steps and self.steps_run >= self.stop_after_steps
      if step < end and (stopping or self._periodic(step)):
        meta = self._meta(step, total_steps, best, best_step, info, done=False)
        self._save(phase, ckpts, "latest", step, state,
                   {**meta, "epoch_sums": _sums_to_json(parallel.to_host(sums))})
        if stopping:
          bar.close()
          return state, step, None
    jax.block_until_ready(state)
    seconds = time.perf_counter() - started
    bar.close()
    ran = step - (epoch * steps_per_epoch + in_epoch)
    if in_epoch == 0 and ran == steps_per_epoch:
      info["epoch_seconds"].append(seconds)
    # Checkpoints of older versions carry no sums: then only this invocation's steps count.
    counted = ran if epoch_sums is None else step - epoch * steps_per_epoch
    sums = parallel.to_host(sums)
    return state, step, {"train_loss": float(sums["loss"]) / max(counted, 1),
                         "train_accuracy": float(sums["accuracy"]) / max(counted, 1),
                         "epoch_seconds": seconds}

  def _periodic(self, step: int) -> bool:
    """A mid-epoch checkpoint is due (``checkpoint_every_steps``)."""
    return bool(self.checkpoint_every_steps) and step % self.checkpoint_every_steps == 0

  # ------------------------------------------------------------------ bookkeeping
  def _meta(self, step, total_steps, best, best_step, info, done):
    epoch, in_epoch = self.train.position(step)
    return {"epoch": epoch, "step_in_epoch": in_epoch, "total_steps": total_steps,
            "steps_per_epoch": self.train.steps_per_epoch, "best_val_accuracy": best,
            "best_step": best_step, "info": info, "done": done}

  def _record(self, phase, state, epoch, values, epoch_metrics):
    record = {"phase": phase, "epoch": epoch, "step": int(parallel.to_host(state.step)), **values}
    if epoch_metrics is not None:
      record.update(epoch_metrics(state))
    self.writer.write(record)
    kill_points.reached(f"{phase}/{record['step']}/record")
    if parallel.is_main_process():
      shown = {k: v for k, v in values.items() if isinstance(v, float)}
      extra = {k: v for k, v in record.items() if k in ("sparsity", "bits_per_weight")}
      text = "  ".join(f"{k} {v:.4f}" for k, v in {**shown, **extra}.items()
                       if isinstance(v, float))
      self._log(f"[{phase}] epoch {epoch}: {text}")

  @staticmethod
  def _log(message: str) -> None:
    if parallel.is_main_process():
      print(message, flush=True)


def _show_step(bar, step: int, metrics) -> None:
  """One step on the progress bar; the loss every 50 steps (a host copy, so not every step)."""
  bar.update(1)
  if bar.enabled and step % 50 == 0:
    bar.set_postfix(loss=f"{float(parallel.to_host(metrics['loss'])):.4f}")


def _sums_to_json(sums: dict[str, np.ndarray]) -> dict[str, list]:
  """``{name: [value, dtype]}``: exact (a float32 or float64 is exactly a JSON double)."""
  return {name: [float(value), np.asarray(value).dtype.name] for name, value in sums.items()}


def _sums_from_json(saved: dict[str, list] | None) -> dict[str, np.ndarray] | None:
  if saved is None:
    return None
  return {name: np.asarray(value, dtype=dtype) for name, (value, dtype) in saved.items()}


def _progress(enabled: bool, steps: int, description: str, initial: int, total: int):
  # A bar on a terminal; in a log (CI, nohup, notebook) nothing: the epoch line is the progress.
  if steps <= 0:
    return progress_lib.NoBar()
  return progress_lib.progress(enabled, total, description, initial=initial)


def steps_per_epoch(shard_sizes_min: int, per_shard_batch: int, limit: int = 0) -> int:
  """Full batches per epoch given the smallest shard, optionally capped by ``limit``."""
  steps = shard_sizes_min // per_shard_batch
  if steps < 1:
    raise UserError(f"shards of {shard_sizes_min} examples are smaller than one batch part "
                    f"({per_shard_batch}); lower --batch_size or --data_shards")
  return min(steps, limit) if limit else steps


def eval_data(shards: list[data_lib.Shard], global_batch: int, num_shards: int) -> EvalData:
  """Evaluation batching that covers every example of every shard exactly once."""
  per_shard = data_lib.per_shard_batch_size(global_batch, num_shards)
  largest = parallel.global_max(max((len(s) for s in shards), default=0))
  return EvalData(shards, per_shard, math.ceil(largest / per_shard))


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree of arrays."""
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))
