"""Character-level language modelling: tiny Shakespeare, sharded steps, a step-based phase loop.

What the GPT example (``examples/shakespeare_gpt.py``) and its benchmark share:

* :func:`load_tiny_shakespeare`: the tfds ``tiny_shakespeare`` text as integer
  ids; ``train`` is nanoGPT's first 90%, ``validation`` + ``test`` its last 10%;
* :func:`train_batch`: the batch of step ``s`` is a pure function of
  ``(seed, s)`` (random windows, as nanoGPT samples them), so a resumed run
  sees exactly the batches it would have seen, on any number of processes
  (each process takes its rows of the global batch);
* :class:`LMRunner`: jitted steps over the ``(data, fsdp)`` mesh of
  :mod:`common.parallel`, orbax checkpoints of :mod:`common.checkpoint` every
  ``eval_every`` steps (the latest, for ``--resume``), metrics of
  :mod:`common.metrics`, validation loss on every window of the validation
  text, a line per 10% in logs (:mod:`common.progress`);
* :func:`sample_text`: text sampled from a model.

Example:
  >>> import numpy as np
  >>> from common.language import train_batch
  >>> batch = train_batch(np.arange(100), step=3, batch_size=4, block_size=8, seed=0)
  >>> batch["x"].shape, bool((batch["y"][:, :-1] == batch["x"][:, 1:]).all())
  ((4, 8), True)
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import checkpoint as checkpoint_lib
from common import kill_points
from common import parallel
from common import progress as progress_lib
from common.cli import UserError
from common.metrics import MetricWriter
from common.training import StopRequested
from common.training import TrainState

VAL_SPLITS = ("validation", "test")


@dataclasses.dataclass(frozen=True)
class CharData:
  """Text as ids: ``vocab[i]`` is the character of id ``i``."""
  vocab: str
  train: np.ndarray
  val: np.ndarray

  def decode(self, ids) -> str:
    return "".join(self.vocab[int(i)] for i in ids)

  def encode(self, text: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(self.vocab)}
    missing = sorted(set(text) - set(index))
    if missing:
      raise UserError(f"characters {missing!r} are not in the vocabulary")
    return np.asarray([index[c] for c in text], np.int32)


def load_tiny_shakespeare(data_dir: str | None = None) -> CharData:
  """The tfds ``tiny_shakespeare`` splits as ids (the vocabulary: every character, sorted).

  Args:
    data_dir: tfds data folder (default ``$TFDS_DATA_DIR`` or tfds' own).

  Raises:
    UserError: the dataset is not prepared there.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  texts = {}
  try:
    for split in ("train", *VAL_SPLITS):
      dataset = tfds.load("tiny_shakespeare", split=split, data_dir=data_dir, download=False)
      texts[split] = b"".join(ex["text"] for ex in tfds.as_numpy(dataset)).decode("utf-8")
  except (AssertionError, OSError, ValueError) as error:  # tfds: not prepared
    where = data_dir or os.environ.get("TFDS_DATA_DIR") or "tfds' default folder"
    raise UserError(f"tiny_shakespeare is not prepared in {where} ({str(error)[:200]}); "
                    "set --data_dir or TFDS_DATA_DIR") from None
  vocab = "".join(sorted(set("".join(texts.values()))))
  data = CharData(vocab, np.zeros(0, np.int32), np.zeros(0, np.int32))
  return dataclasses.replace(data, train=data.encode(texts["train"]),
                             val=data.encode("".join(texts[s] for s in VAL_SPLITS)))


def train_batch(ids: np.ndarray, step: int, batch_size: int, block_size: int, seed: int,
                process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
  """This process's rows of the global batch of ``step``: random windows of ``ids``.

  ``x = ids[s : s + block_size]``, ``y = ids[s + 1 : s + 1 + block_size]`` with
  offsets ``s`` drawn from ``numpy.random.default_rng([seed, step])``.
  """
  if len(ids) <= block_size:
    raise UserError(f"the training text ({len(ids)} characters) is shorter than one window")
  starts = np.random.default_rng([seed, step]).integers(0, len(ids) - block_size,
                                                         size=batch_size)
  per_process = batch_size // process_count
  starts = starts[process_index * per_process:(process_index + 1) * per_process]
  window = np.arange(block_size + 1)
  tokens = ids[starts[:, None] + window[None, :]]
  return {"x": tokens[:, :-1].astype(np.int32), "y": tokens[:, 1:].astype(np.int32)}


def eval_windows(ids: np.ndarray, block_size: int) -> dict[str, np.ndarray]:
  """Every non-overlapping window of ``ids`` (each position predicted once)."""
  count = (len(ids) - 1) // block_size
  x = ids[:count * block_size].reshape(count, block_size)
  y = ids[1:count * block_size + 1].reshape(count, block_size)
  return {"x": x.astype(np.int32), "y": y.astype(np.int32)}


def make_train_step(apply_fn: Callable, tx: optax.GradientTransformation,
                    regularizer: Callable[[Any], jax.Array] | None = None) -> Callable:
  """``(state, batch) -> (state, {"loss"})``: one optimizer step on the mean token loss.

  ``regularizer``: ``params -> scalar`` added to the loss (not to the reported loss).
  """
  def train_step(state: TrainState, batch):
    def loss_fn(params):
      logits = apply_fn(params, batch["x"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
      return (loss if regularizer is None else loss + regularizer(params)), loss
    (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state._replace(step=state.step + 1, params=params, opt_state=opt_state), {"loss": loss}
  return train_step


def make_eval_step(apply_fn: Callable) -> Callable:
  """``(params, batch) -> {"loss", "count"}``: summed token losses of the unmasked rows."""
  def eval_step(params, batch):
    losses = optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, batch["x"]),
                                                            batch["y"])
    mask = batch["mask"][:, None]
    return {"loss": jnp.sum(losses * mask), "count": jnp.sum(mask) * losses.shape[1]}
  return eval_step


def sample_text(apply_fn: Callable, params: Any, data: CharData, block_size: int,
                length: int = 200, prompt: str = "\n", temperature: float = 0.8,
                seed: int = 0) -> str:
  """``length`` characters sampled after ``prompt`` (softmax of logits / temperature)."""
  @jax.jit
  def next_token(params, window, last, key):
    logits = apply_fn(params, window[None])[0, last] / temperature
    return jax.random.categorical(key, logits)

  params = parallel.to_host(params)
  tokens = list(data.encode(prompt))
  key = jax.random.key(seed)
  for _ in range(length):
    context = tokens[-block_size:]
    window = np.zeros(block_size, np.int32)
    window[:len(context)] = context  # causal: the padding after `last` is never seen
    key, sub = jax.random.split(key)
    tokens.append(int(next_token(params, window, len(context) - 1, sub)))
  return data.decode(tokens[len(prompt):])


@dataclasses.dataclass
class LMRunner:
  """Runs step-based phases of language-model training on a mesh.

  Attributes:
    apply_fn: ``(params, tokens) -> logits``.
    data: the text.
    mesh: from :func:`common.parallel.make_mesh`.
    batch_size, block_size: global batch and window.
    workdir: ``checkpoints/<phase>/``, ``metrics.jsonl``, ``tensorboard/``.
    fingerprint: facts checked when restoring checkpoints.
    writer: metric writer (disabled on processes other than 0).
    seed: seed of the data order.
    eval_every: evaluate, record and checkpoint every this many steps (and at the end).
    eval_batch_size: global batch of the validation windows.
    progress: a bar on a terminal, a line per 10% in a log (process 0).
    stop_after_steps: stop (after a checkpoint) once this many steps ran in this
      invocation (0: never).
  """
  apply_fn: Callable
  data: CharData
  mesh: jax.sharding.Mesh
  batch_size: int
  block_size: int
  workdir: str
  fingerprint: dict[str, Any]
  writer: MetricWriter
  seed: int = 0
  eval_every: int = 250
  eval_batch_size: int = 256
  progress: bool = True
  stop_after_steps: int = 0
  steps_run: int = 0
  _compiled: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    devices = self.mesh.devices.size
    if self.batch_size % devices or self.eval_batch_size % devices:
      raise UserError(f"--batch_size ({self.batch_size}) and --eval_batch_size "
                      f"({self.eval_batch_size}) must be multiples of the {devices} devices")
    if self.eval_every < 1:
      raise UserError(f"--eval_every must be >= 1, got {self.eval_every}")

  # ------------------------------------------------------------------ state
  def abstract(self, make_state: Callable[..., TrainState], *args: Any) -> Any:
    shapes = jax.eval_shape(make_state, *args)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, parallel.state_shardings(shapes, self.mesh))

  def init_state(self, make_state: Callable[..., TrainState], *args: Any) -> TrainState:
    """``make_state(*args)`` jitted straight into its shardings."""
    shardings = parallel.state_shardings(jax.eval_shape(make_state, *args), self.mesh)
    replicated = parallel.replicated(self.mesh)
    args = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jax.device_put(x, replicated),
                        args)
    return jax.jit(make_state, out_shardings=shardings)(*args)

  # ------------------------------------------------------------------ eval
  def evaluate(self, params: Any) -> float:
    """Mean next-character loss (nats) over every validation window."""
    key = ("eval", jax.tree.structure(params))
    if key not in self._compiled:
      self._compiled[key] = jax.jit(
          make_eval_step(self.apply_fn),
          in_shardings=(parallel.state_shardings(params, self.mesh),
                        parallel.batch_sharding(self.mesh)),
          out_shardings=parallel.replicated(self.mesh))
    windows = eval_windows(self.data.val, self.block_size)
    count, per_process = len(windows["x"]), self.eval_batch_size // jax.process_count()
    first = jax.process_index() * per_process
    totals = None
    for start in range(0, count, self.eval_batch_size):
      rows = np.arange(start + first, start + first + per_process)
      valid = rows < count
      rows = np.minimum(rows, count - 1)
      local = {"x": windows["x"][rows], "y": windows["y"][rows],
               "mask": valid.astype(np.float32)}
      sums = self._compiled[key](params, parallel.global_batch(
          local, parallel.batch_sharding(self.mesh)))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = parallel.to_host(totals)
    return float(totals["loss"]) / max(float(totals["count"]), 1.0)

  # ------------------------------------------------------------------ phases
  def run_phase(self, phase: str, tx: optax.GradientTransformation, steps: int,
                make_state: Callable[..., TrainState], make_state_args: tuple = (), *,
                resume: bool, epoch_metrics: Callable[[TrainState], dict] | None = None,
                regularizer: Callable[[Any], jax.Array] | None = None,
                ) -> tuple[TrainState, dict[str, Any]]:
    """Trains ``steps`` steps; returns the last state and ``{"val_loss", "seconds", ...}``.

    Resumes from the phase's latest checkpoint when ``resume`` is set; a
    finished phase is restored, not re-run.

    Raises:
      StopRequested: after ``stop_after_steps`` steps (the latest checkpoint is saved).
    """
    if steps < 1:
      raise UserError(f"[{phase}] needs at least one step")
    ckpts = checkpoint_lib.PhaseCheckpoints(os.path.join(self.workdir, "checkpoints", phase),
                                            {**self.fingerprint, "phase": phase})
    try:
      return self._run_phase(phase, tx, steps, make_state, make_state_args, ckpts,
                             resume, epoch_metrics, regularizer)
    finally:
      ckpts.close()

  def _start(self, phase, steps, abstract, make_state, make_state_args, ckpts, resume):
    """``(state, info, done, loss_sums)``: restored from the latest checkpoint, or fresh.

    ``loss_sums`` are the ``(sum, count)`` of the training losses since the last
    record, carried by the checkpoint so that a resumed run records the same
    means. Records written after the checkpoint (a kill between the record and
    the checkpoint) are dropped from ``metrics.jsonl`` first.
    """
    meta = ckpts.meta("latest")
    if meta is not None and not resume:
      raise UserError(f"{ckpts.directory} already holds checkpoints: pass --resume to continue "
                      "that run, or choose a new --workdir")
    if resume:
      self.writer.rewind(phase, None if meta is None else meta["step"])
    if meta is None:
      return self.init_state(make_state, *make_state_args), {"seconds": 0.0}, False, (0.0, 0)
    state, meta = ckpts.restore("latest", abstract)
    if meta["total_steps"] != steps:
      raise UserError(f"[{phase}] checkpoint was written for {meta['total_steps']} steps, this "
                      f"run asks for {steps}")
    if meta.get("done"):
      self._log(f"[{phase}] already finished: validation loss {meta['info']['val_loss']:.4f}")
    else:
      self._log(f"[{phase}] resuming at step {meta['step']}")
    return state, meta["info"], bool(meta.get("done")), tuple(meta.get("loss_sums", (0.0, 0)))

  def _record(self, phase, state, step, train_loss, info, epoch_metrics):
    info["val_loss"] = self.evaluate(state.params)
    record = {"phase": phase, "step": step, "val_loss": info["val_loss"],
              "train_loss": train_loss}
    if epoch_metrics is not None:
      record.update(epoch_metrics(state))
    self.writer.write(record)
    kill_points.reached(f"{phase}/{step}/record")
    extra = f"  sparsity {record['sparsity']:.4f}" if "sparsity" in record else ""
    self._log(f"[{phase}] step {step}: train loss {train_loss:.4f}  "
              f"val loss {info['val_loss']:.4f}{extra}")

  def _run_phase(self, phase, tx, steps, make_state, make_state_args, ckpts, resume,
                 epoch_metrics, regularizer):
    abstract = self.abstract(make_state, *make_state_args)
    state, info, done, (loss_sum, loss_count) = self._start(
        phase, steps, abstract, make_state, make_state_args, ckpts, resume)
    if done:
      return state, info
    step_fn = self._step_fn(tx, abstract, regularizer)
    step = int(parallel.to_host(state.step))
    bar = progress_lib.progress(self.progress and parallel.is_main_process(), steps, phase,
                                initial=step, lines=True)
    batch_sharding = parallel.batch_sharding(self.mesh)
    started = time.perf_counter()
    while step < steps:
      local = train_batch(self.data.train, step, self.batch_size, self.block_size,
                          self.seed + zlib.crc32(phase.encode()), jax.process_index(),
                          jax.process_count())
      state, metrics = step_fn(state, parallel.global_batch(local, batch_sharding))
      step += 1
      self.steps_run += 1
      loss_sum, loss_count = loss_sum + metrics["loss"], loss_count + 1  # on device, no sync
      bar.update(1)
      if bar.enabled and step % 10 == 0:
        bar.set_postfix(loss=f"{float(parallel.to_host(metrics['loss'])):.4f}")
      stopping = self.stop_after_steps and self.steps_run >= self.stop_after_steps
      if step % self.eval_every == 0 or step == steps or stopping:
        jax.block_until_ready(state)
        info["seconds"] += time.perf_counter() - started
        done = step >= steps
        if step % self.eval_every == 0 or done:
          self._record(phase, state, step, float(parallel.to_host(loss_sum)) / loss_count, info,
                       epoch_metrics)
          loss_sum, loss_count = 0.0, 0
        pending = float(parallel.to_host(loss_sum))  # JSON; exact: the float32 sum
        ckpts.save("latest", step, state, {"total_steps": steps, "info": info, "done": done,
                                           "loss_sums": [pending, loss_count]})
        kill_points.reached(f"{phase}/{step}/latest")
        started = time.perf_counter()
        if stopping and not done:
          bar.close()
          raise StopRequested(f"stopped after {self.steps_run} steps as asked")
    bar.close()
    return state, info

  def _step_fn(self, tx, abstract, regularizer=None) -> Callable:
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    key = (id(tx), id(regularizer), jax.tree.structure(shardings))
    if key not in self._compiled:
      self._compiled[key] = jax.jit(
          make_train_step(self.apply_fn, tx, regularizer),
          in_shardings=(shardings, parallel.batch_sharding(self.mesh)),
          out_shardings=(shardings, parallel.replicated(self.mesh)), donate_argnums=0)
    return self._compiled[key]

  @staticmethod
  def _log(message: str) -> None:
    if parallel.is_main_process():
      print(message, flush=True)


def count_params(tree: Any) -> int:
  return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(tree)))
