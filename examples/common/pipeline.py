"""The end-to-end EC2T job shared by the examples.

1. data: per-process tfds shards (train / validation / test);
2. full precision: pretrain (``fp_epochs``) or load (``init_from``: a PyTorch
   state dict ``.npz``/``.pt`` or a checkpoint of these examples);
3. phase 1 of the method (``--method``, default EC2T with the paper's
   optimizers; see ``common/methods.py``), best epoch by validation;
4. phase 2: the same optimizer after ``ec2t.set_phase(opt_state, 1)`` (EC2T:
   assignment frozen, i.e. ``ec2t.freeze_assignment``), best epoch by validation;
5. test accuracy of both models, ``ec2t.summary``, the exported model
   (``<workdir>/model.ec2t``) and a one-screen report, also written to
   ``<workdir>/report.json``.

With ``phase1_epochs=0`` it stops after the full-precision model (pretraining only).
A post-training method (``--method=mcq|prune``) replaces steps 3 and 4 by one call
on the full-precision model; a staged one (``inq``, ``slq``, ``mlq``) keeps phase
1's last state (not its best, a half-quantized model) and starts phase 2 at its
last stage.

Example:
  >>> # results = run(PipelineConfig(workdir="runs/x", dataset="mnist", model_name="lenet5", ...))
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import ec2t_jax as ec2t
from common import checkpoint as checkpoint_lib
from common import data as data_lib
from common import methods as methods_lib
from common import parallel
from common import posttrain
from common import report as report_lib
from common import training
from common.cli import UserError
from common.metrics import MetricWriter
from ec2t_jax.models import torch_convert


PHASES = ("fp", "ec2t_phase1", "ec2t_phase2")


@dataclasses.dataclass
class PipelineConfig:
  """Settings of :func:`run` (the examples' flags map onto these one to one).

  ``fp_optimizer`` maps the number of pretraining steps to the pretraining
  optimizer (so it can hold a schedule); default ``optax.adam(1e-3)``.
  """

  workdir: str
  dataset: str
  model_name: str
  model: nn.Module
  # data
  data_dir: str | None = None
  download: bool = True
  mock_examples: int = 0
  train_split: str = "train"
  val_split: str = "test"
  test_split: str = "test"
  batch_size: int = 128
  eval_batch_size: int = 1000
  data_shards: int = 0
  steps_per_epoch: int = 0
  augment: bool = False
  seed: int = 0
  # devices
  fsdp: int = 1
  num_devices: int = 0
  # full precision
  fp_epochs: int = 0
  fp_optimizer: Callable[[int], optax.GradientTransformation] | None = None
  init_from: str | None = None
  # Maps the ``init_from`` variables (any architecture) to ``model``'s, e.g. a
  # function-preserving super-network transfer; None: they must fit ``model``.
  init_transform: Callable[[dict, dict], tuple[dict, dict]] | None = None
  # EC2T
  ec2t_mode: str = "reference"
  method: str = "ec2t"
  method_options: str = ""
  gamma: float = 0.2
  # Size budget of EC2T's chain form (at most one non-zero; methods.size_budget).
  bits_per_weight: float = 0.0
  target_bytes: float = 0.0
  target_sparsity: float = 0.0
  budget_ramp: float = 0.3
  # Steps of the budget's ramp (set by run() from budget_ramp x phase-1 steps).
  budget_ramp_steps: int = 0
  # F of a --target_bytes budget (set by run(): ec2t.export.fixed_bytes of the FP params).
  budget_fixed_bytes: float = 0.0
  init_scale: float = 0.3
  sustain: float = 0.05
  learning_rate: float = 1e-4
  weight_decay: float = 5e-6
  latent_learning_rate: float = 1e-4
  centroid_learning_rate: float = 1e-5
  phase1_epochs: int = 20
  phase2_epochs: int = 15
  # Steps of phases 1 + 2 (set by run()): EC2T's chain form decays Adam's
  # learning rate to 0 by a cosine over them; 0 keeps it constant.
  ec2t_steps: int = 0
  # run control
  resume: bool = False
  checkpoint_every_steps: int = 0
  stop_after_steps: int = 0
  progress: bool = True


def ec2t_epoch_metrics(state: training.TrainState) -> dict[str, Any]:
  """Sparsity and entropy of the ternarized layers, total and per layer (and the budget's
  multiplier when there is one)."""
  summary = ec2t.summary(parallel.to_host(state.opt_state))
  totals = summary.totals
  metrics = {"sparsity": totals["sparsity"], "bits_per_weight": totals["entropy"],
             "layer_sparsity": {layer.path: layer.sparsity for layer in summary.layers}}
  if summary.budget:
    metrics.update(budget_reached=summary.budget["reached"],
                   budget_multiplier=summary.budget["multiplier"])
  return metrics


def _mesh(config: PipelineConfig) -> jax.sharding.Mesh:
  """All devices (or the first ``num_devices`` in a single-process run) as a (data, fsdp) mesh."""
  if not config.num_devices or config.num_devices == jax.device_count():
    return parallel.make_mesh(config.fsdp)
  if jax.process_count() > 1:
    raise UserError("--num_devices is for single-process runs")
  if config.num_devices > jax.device_count():
    raise UserError(f"--num_devices={config.num_devices} but only {jax.device_count()} devices "
                    "exist")
  if config.num_devices % config.fsdp:
    raise UserError(f"--fsdp={config.fsdp} must divide --num_devices={config.num_devices}")
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((config.num_devices // config.fsdp, config.fsdp), ("data", "fsdp"),
                       axis_types=(auto, auto), devices=jax.devices()[:config.num_devices])


def _load_split(config, split, shard_ids, num_shards):
  return data_lib.load_shards(config.dataset, split, shard_ids, num_shards,
                              data_dir=config.data_dir, download=config.download,
                              mock_examples=config.mock_examples)


def _pretrained_variables(config: PipelineConfig, abstract_variables: dict) -> tuple[dict, dict]:
  path = config.init_from
  if not os.path.exists(path):
    raise UserError(f"--init_from {path} does not exist")
  if config.init_transform is not None:
    params, batch_stats = read_variables(path)
    try:
      params, batch_stats = config.init_transform(params, batch_stats)
      torch_convert._check_against(  # pylint: disable=protected-access
          {"params": params, "batch_stats": batch_stats}, abstract_variables)
    except ValueError as error:  # includes CheckpointMismatchError
      raise UserError(f"--init_from {path}: {error}") from None
    return params, batch_stats
  if os.path.isdir(path):
    params, batch_stats = checkpoint_lib.restore_variables(path)
    loaded = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    try:
      torch_convert._check_against(loaded, abstract_variables)  # pylint: disable=protected-access
    except torch_convert.CheckpointMismatchError as error:
      raise UserError(f"--init_from {path}: {error}") from None
    return params, batch_stats
  try:
    return torch_convert.load_torch_checkpoint(path, target=abstract_variables)
  except torch_convert.CheckpointMismatchError as error:
    raise UserError(f"--init_from {path}: {error}") from None
  except (OSError, ValueError, KeyError) as error:
    raise UserError(f"--init_from {path} cannot be read as a state dict: {error}") from None


def read_variables(path: str) -> tuple[dict, dict]:
  """``(params, batch_stats)`` of a checkpoint folder of these examples or a state-dict file."""
  try:
    if os.path.isdir(path):
      return checkpoint_lib.restore_variables(path)
    return torch_convert.load_torch_checkpoint(path)
  except (OSError, ValueError, KeyError) as error:
    raise UserError(f"--init_from {path} cannot be read: {error}") from None


def fingerprints(config: PipelineConfig, num_classes: int) -> tuple[dict, dict]:
  """What every checkpoint of the run must match: ``(every phase, the method's phases)``.

  The first holds the model, data and full-precision knobs; the second adds the method
  and every knob that changes its result (its options as ``method_options.<knob>``, the
  paper's flags by their names, learning rates, budget, epochs), so ``--resume`` with another
  ``--gamma`` or ``--method`` is refused, naming it. Values are as JSON stores them (tuples
  as lists).
  """
  run = {"model": config.model_name, "dataset": config.dataset, "num_classes": num_classes,
         **{k: getattr(config, k) for k in ("seed", "batch_size", "steps_per_epoch", "augment",
                                            "data_shards", "fp_epochs", "init_from")}}
  method = {k: getattr(config, k) for k in (
      "method", "ec2t_mode", "learning_rate", "weight_decay", "latent_learning_rate",
      "centroid_learning_rate", "bits_per_weight", "target_bytes", "target_sparsity",
      "budget_ramp", "phase1_epochs", "phase2_epochs")}
  for knob, value in methods_lib.method_options(config).items():  # named as the user sets it
    flag = config.method == methods_lib.PAPER and knob in methods_lib.PAPER_FLAGS
    method[knob if flag else f"method_options.{knob}"] = value
  return run, json.loads(json.dumps({**run, **method}, default=float))


def _check_config(config: PipelineConfig, devices: int) -> None:
  if config.batch_size % devices or config.eval_batch_size % devices:
    raise UserError(f"--batch_size ({config.batch_size}) and --eval_batch_size "
                    f"({config.eval_batch_size}) must be multiples of the {devices} devices")
  if not config.init_from and config.fp_epochs <= 0:
    raise UserError("full-precision model needed: set --fp_epochs > 0 or --init_from")
  if config.phase1_epochs < 0 or config.phase2_epochs < 0:
    raise UserError("--phase1_epochs and --phase2_epochs must be >= 0")
  methods_lib.build(config)  # bad --method / --method_options fail before any data is loaded


def run(config: PipelineConfig) -> dict[str, Any]:
  """Runs the whole job; returns the results (also in ``<workdir>/report.json``).

  The workdir is locked for the run (a second run on it is refused) and cleaned of the
  temporary files a killed run left.

  Raises:
    UserError: for problems the user can fix (data, flags, checkpoints).
    training.StopRequested: when ``stop_after_steps`` interrupted the run.
  """
  spec = data_lib.dataset_spec(config.dataset)
  mesh = _mesh(config)
  _check_config(config, mesh.devices.size)
  with checkpoint_lib.workdir_lock(config.workdir, enabled=parallel.is_main_process()):
    return _run(config, spec, mesh)


class _Data(NamedTuple):
  train_shards: list
  train: Any
  val: Any
  test: Any


def _load_data(config: PipelineConfig, mesh, log) -> _Data:
  """This process's shards of the train, validation and test splits."""
  num_shards = config.data_shards or jax.process_count()
  shard_ids = data_lib.shards_of_process(num_shards, jax.process_index(), jax.process_count())
  per_shard = data_lib.per_shard_batch_size(config.batch_size, num_shards)
  train_shards = _load_split(config, config.train_split, shard_ids, num_shards)
  smallest = parallel.global_min(min(len(s) for s in train_shards))
  train = data_lib.TrainBatches(train_shards, per_shard,
                                training.steps_per_epoch(smallest, per_shard, config.steps_per_epoch),
                                config.seed)
  val = training.eval_data(_load_split(config, config.val_split, shard_ids, num_shards),
                           config.eval_batch_size, num_shards)
  test = (val if config.test_split == config.val_split else
          training.eval_data(_load_split(config, config.test_split, shard_ids, num_shards),
                             config.eval_batch_size, num_shards))
  log(f"{config.dataset}: train {config.train_split!r} ({data_lib.describe(train_shards)} on "
      f"process {jax.process_index()}), {train.steps_per_epoch} steps/epoch of {config.batch_size}; "
      f"{jax.process_count()} process(es), mesh {dict(mesh.shape)}")
  return _Data(train_shards, train, val, test)


def _full_precision(config, runner, train, pretrained, results, log):
  """The full-precision state: loaded (``init_from``) or pretrained."""
  fp_steps = max(config.fp_epochs, 1) * train.steps_per_epoch
  fp_tx = config.fp_optimizer(fp_steps) if config.fp_optimizer else optax.adam(1e-3)
  if pretrained is not None:
    params, batch_stats = pretrained
    log(f"[fp] loaded {config.init_from}")
    return runner.init_state(
        lambda p, b: training.TrainState.create(p, b, fp_tx, config.seed), params, batch_stats)
  fp_state, fp_info = runner.run_phase(
      "fp", fp_tx, config.fp_epochs,
      lambda: training.TrainState.create(*_init_variables(config), fp_tx, config.seed),
      resume=config.resume)
  results["fp_seconds_per_epoch"] = _typical(fp_info["epoch_seconds"])
  return fp_state


def _init_variables(config):
  dummy = jnp.zeros((1, *data_lib.dataset_spec(config.dataset).image_shape), jnp.float32)
  variables = config.model.init(jax.random.key(config.seed), dummy, train=False)
  return variables["params"], variables.get("batch_stats", {})


def _run(config: PipelineConfig, spec, mesh) -> dict[str, Any]:
  main = parallel.is_main_process()
  log = (lambda *a: print(*a, flush=True)) if main else (lambda *a: None)
  fingerprint, method_fingerprint = fingerprints(config, spec.num_classes)
  checkpoint_lib.check_workdir(config.workdir, fingerprint, config.resume, PHASES,
                               method_fingerprint)
  dummy = jnp.zeros((1, *spec.image_shape), jnp.float32)
  pretrained = None
  if config.init_from:  # read and check it before any data is loaded
    abstract_vars = jax.eval_shape(lambda: config.model.init(jax.random.key(0), dummy))
    pretrained = _pretrained_variables(config, abstract_vars)

  data = _load_data(config, mesh, log)
  writer = MetricWriter(config.workdir, enabled=main)
  runner = training.Runner(model=config.model, spec=spec, mesh=mesh, train=data.train,
                           val=data.val, workdir=config.workdir, fingerprint=fingerprint,
                           method_fingerprint=method_fingerprint, writer=writer,
                           augment=config.augment, progress=config.progress,
                           checkpoint_every_steps=config.checkpoint_every_steps,
                           stop_after_steps=config.stop_after_steps)
  results: dict[str, Any] = {"model": config.model_name, "dataset": config.dataset,
                             "gamma": config.gamma, "init_scale": config.init_scale,
                             "sustain": config.sustain, "learning_rate": config.learning_rate,
                             "ec2t_mode": config.ec2t_mode, "method": config.method,
                             "method_options": methods_lib.method_options(config)}
  fp_state = _full_precision(config, runner, data.train, pretrained, results, log)
  fp_test = runner.evaluate(fp_state, data.test)
  results["fp_test_accuracy"] = fp_test["accuracy"]
  log(f"[fp] test accuracy {fp_test['accuracy']:.4f} on {fp_test['examples']} examples")
  # The paper's rule keeps the first and last kernel in full precision; trained params have
  # re-sorted keys, so name them by the forward pass.
  params_shape, stats_shape = jax.eval_shape(lambda: _init_variables(config))
  order = ec2t.forward_order(
      lambda p, s, x: config.model.apply({"params": p, "batch_stats": s}, x, train=False),
      params_shape, stats_shape, dummy)
  selection = ec2t.Selection(order=order)
  # A bytes budget's F: the full-precision leaves as the export will store them.
  fixed_bytes = (ec2t.export.fixed_bytes(parallel.to_host(fp_state.params), selection)
                 if config.target_bytes else 0.0)
  steps = data.train.steps_per_epoch
  setup = methods_lib.build(
      dataclasses.replace(config, ec2t_steps=(config.phase1_epochs + config.phase2_epochs) * steps,
                          budget_ramp_steps=int(config.budget_ramp * config.phase1_epochs * steps),
                          budget_fixed_bytes=fixed_bytes), selection)
  if setup.post_training is not None:  # MCQ, calibrated pruning: no training phases
    return _post_training(config, setup, selection, runner, fp_state, data.train_shards,
                          data.test, spec, results, writer, main, log)
  if config.phase1_epochs == 0:  # pretraining only
    return _finish(config, results, writer, main)
  state, info1, info2 = _train_method(config, setup, runner, fp_state, params_shape, selection)
  return _train_results(config, setup, runner, state, info1, info2, data.test, results,
                        writer, main)


def _train_method(config, setup, runner, fp_state, params_shape, selection):
  """Phase 1 of the method, then phase 2 from its best state (its last for staged methods
  and size budgets) with ``ec2t.set_phase`` (EC2T: assignment frozen; staged: last stage)."""
  tx, phase2_phase = setup.optimizer, 1
  steps = runner.train.steps_per_epoch
  if setup.staged is not None:
    num_layers = sum(plan is not None for plan in selection.plan(params_shape))
    tx, phase2_phase = setup.staged(config.phase1_epochs * steps, num_layers,
                                    phase2_steps=config.phase2_epochs * steps)

  def start_ec2t(params, batch_stats):
    return training.TrainState.create(params, batch_stats, tx, config.seed + 1,
                                      prepare_params=ec2t.quantized_params)

  state, info1 = runner.run_phase(
      "ec2t_phase1", tx, config.phase1_epochs, start_ec2t, (fp_state.params, fp_state.batch_stats),
      resume=config.resume, evaluate_start=setup.phase_starts_are_results,
      epoch_metrics=ec2t_epoch_metrics, regularizer=setup.regularizer,
      keep="last" if _phase1_keeps_last(config, setup) else "best")
  info2 = {"epoch_seconds": []}
  if config.phase2_epochs > 0:
    def start_phase2(best):
      return best._replace(step=jnp.zeros((), jnp.int32),
                           opt_state=ec2t.set_phase(best.opt_state, phase2_phase))
    state, info2 = runner.run_phase(
        "ec2t_phase2", tx, config.phase2_epochs, start_phase2, (state,), resume=config.resume,
        evaluate_start=setup.phase_starts_are_results, epoch_metrics=ec2t_epoch_metrics)
  return state, info1, info2


def _train_results(config, setup, runner, state, info1, info2, test, results, writer, main):
  """Test accuracy, summary, grid check, export and report of a trained method."""
  ternary_test = runner.evaluate(state, test)
  summary = ec2t.summary(parallel.to_host(state.opt_state))
  host_params = parallel.to_host(state.params)
  layers = [(int(np.prod(l.shape)), l.entropy) for l in summary.layers]
  best = [info.get("best_val_accuracy", 0.0) for info in (info1, info2)]
  results.update({
      "ternary_test_accuracy": ternary_test["accuracy"],
      "ternary_val_accuracy": best[1] if setup.staged is not None else max(best),
      "ternary": setup.ternary,
      "sparsity": summary.totals["sparsity"],
      "bits_per_weight": summary.totals["entropy"],
      "ternary_layers": len(summary.layers),
      "ternary_weights": summary.totals["numel"],
      "total_params": training.count_params(host_params),
      "layers": [l._asdict() for l in summary.layers],
      "ec2t_seconds_per_epoch": _typical(info1["epoch_seconds"] + info2["epoch_seconds"]),
      "phase1_seconds_per_epoch": _typical(info1["epoch_seconds"]),
      "phase2_seconds_per_epoch": _typical(info2["epoch_seconds"]),
  })
  results["budget"] = summary.budget  # None without a size budget
  results["sizes"] = report_lib.model_sizes(results["total_params"], layers)
  # Every quantized leaf of the final params is on the method's grid (a setup without a
  # grid quantizes nothing: full precision).
  flat = dict(posttrain.named_leaves(host_params))
  if setup.check is not None:
    setup.check([(l.path, flat[l.path]) for l in summary.layers
                 if l.mode != "ecp" and l.path in flat])
  if main:
    exported = ec2t.export.save(os.path.join(config.workdir, "model.ec2t"), host_params)
    results["export_bytes"] = exported.total_bytes
    print(summary)
    print(report_lib.format_report(results))
  return _finish(config, results, writer, main)


def _finish(config, results, writer, main) -> dict[str, Any]:
  if main:
    with open(os.path.join(config.workdir, "report.json"), "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2, default=float)
  writer.close()
  return results


def _phase1_keeps_last(config: PipelineConfig, setup: methods_lib.MethodSetup) -> bool:
  """Staged methods (earlier epochs half quantized) and size budgets (earlier epochs above
  the target) keep phase 1's last epoch, not its best."""
  return setup.staged is not None or methods_lib.size_budget(config) is not None


def _typical(seconds: list[float]) -> float | None:
  """Median epoch time, leaving out the first epoch (compilation) when there are more."""
  if not seconds:
    return None
  kept = seconds[1:] if len(seconds) > 1 else seconds
  return float(np.median(kept))


def _post_training(config, setup, selection, runner, fp_state, train_shards, test, spec,
                   results, writer, main, log) -> dict[str, Any]:
  """MCQ / calibrated pruning of the full-precision model, then evaluation, export, report."""
  if jax.process_count() > 1:
    raise UserError(f"--method={config.method} (post-training) runs in a single process")
  host_params = parallel.to_host(fp_state.params)
  host_stats = parallel.to_host(fp_state.batch_stats)
  apply_fn = lambda p, x: config.model.apply({"params": p, "batch_stats": host_stats}, x,
                                             train=False)
  inputs = methods_lib.PostTrainingInputs(
      params=host_params, apply_fn=apply_fn,
      train_images=np.concatenate([s.images for s in train_shards]),
      image_shape=tuple(spec.image_shape), mean=tuple(spec.mean), std=tuple(spec.std),
      seed=config.seed, selection=selection)
  started = time.perf_counter()
  params = jax.block_until_ready(setup.post_training(inputs))
  seconds = time.perf_counter() - started
  params = jax.tree.map(np.asarray, params)
  log(f"[{config.method}] post-training took {seconds:.2f} s")
  state = fp_state._replace(params=params)
  val, test_metrics = runner.evaluate(state), runner.evaluate(state, test)
  named = posttrain.selected_leaves(params, selection)
  setup.check(named)  # on the method's grid (or at its sparsity)
  measures = posttrain.compression_measures(named)
  total = training.count_params(params)
  results.update({
      "ternary_test_accuracy": test_metrics["accuracy"],
      "ternary_val_accuracy": val["accuracy"],
      "ternary": setup.ternary,
      "posttrain_seconds": seconds,
      "sparsity": measures["sparsity"],
      "bits_per_weight": measures["bits_per_weight"],
      "ternary_layers": len(named),
      "ternary_weights": measures["numel"],
      "total_params": total,
      "layers": measures["layers"],
  })
  results["sizes"] = report_lib.model_sizes(
      total, [(l["numel"], l["entropy"]) for l in measures["layers"]])
  if main:
    exported = ec2t.export.save(os.path.join(config.workdir, "model.ec2t"), params)
    results["export_bytes"] = exported.total_bytes
    for layer in measures["layers"]:
      print(f"{layer['path']:<24} {str(layer['shape']):<18} sparsity {layer['sparsity']:.3f}  "
            f"entropy {layer['entropy']:.3f} bits  {layer['distinct_values']} values")
    print(report_lib.format_report(results))
  return _finish(config, results, writer, main)
