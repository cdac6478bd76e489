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
from typing import Any

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


def run(config: PipelineConfig) -> dict[str, Any]:
  """Runs the whole job; returns the results (also in ``<workdir>/report.json``).

  Raises:
    UserError: for problems the user can fix (data, flags, checkpoints).
    training.StopRequested: when ``stop_after_steps`` interrupted the run.
  """
  spec = data_lib.dataset_spec(config.dataset)
  mesh = _mesh(config)
  main = parallel.is_main_process()
  log = (lambda *a: print(*a, flush=True)) if main else (lambda *a: None)
  devices = mesh.devices.size
  if config.batch_size % devices or config.eval_batch_size % devices:
    raise UserError(f"--batch_size ({config.batch_size}) and --eval_batch_size "
                    f"({config.eval_batch_size}) must be multiples of the {devices} devices")

  fingerprint = {"model": config.model_name, "dataset": config.dataset,
                 "num_classes": spec.num_classes}
  checkpoint_lib.check_workdir(config.workdir, fingerprint, config.resume, PHASES)
  dummy = jnp.zeros((1, *spec.image_shape), jnp.float32)
  pretrained = None
  if config.init_from:  # read and check it before any data is loaded
    abstract_vars = jax.eval_shape(lambda: config.model.init(jax.random.key(0), dummy))
    pretrained = _pretrained_variables(config, abstract_vars)
  elif config.fp_epochs <= 0:
    raise UserError("full-precision model needed: set --fp_epochs > 0 or --init_from")
  if config.phase1_epochs < 0 or config.phase2_epochs < 0:
    raise UserError("--phase1_epochs and --phase2_epochs must be >= 0")
  methods_lib.build(config)  # bad --method / --method_options fail before any data is loaded

  # ---- data: this process reads only its own shards.
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

  writer = MetricWriter(config.workdir, enabled=main)
  runner = training.Runner(model=config.model, spec=spec, mesh=mesh, train=train, val=val,
                           workdir=config.workdir, fingerprint=fingerprint, writer=writer,
                           augment=config.augment, progress=config.progress,
                           checkpoint_every_steps=config.checkpoint_every_steps,
                           stop_after_steps=config.stop_after_steps)

  def init_variables():
    variables = config.model.init(jax.random.key(config.seed), dummy, train=False)
    return variables["params"], variables.get("batch_stats", {})

  # ---- full precision
  results: dict[str, Any] = {"model": config.model_name, "dataset": config.dataset,
                             "gamma": config.gamma, "init_scale": config.init_scale,
                             "sustain": config.sustain, "learning_rate": config.learning_rate,
                             "ec2t_mode": config.ec2t_mode, "method": config.method,
                             "method_options": methods_lib.parse_options(config.method,
                                                                         config.method_options)}
  fp_steps = max(config.fp_epochs, 1) * train.steps_per_epoch
  fp_tx = config.fp_optimizer(fp_steps) if config.fp_optimizer else optax.adam(1e-3)
  if pretrained is not None:
    params, batch_stats = pretrained
    fp_state = runner.init_state(
        lambda p, b: training.TrainState.create(p, b, fp_tx, config.seed), params, batch_stats)
    log(f"[fp] loaded {config.init_from}")
  else:
    fp_state, fp_info = runner.run_phase(
        "fp", fp_tx, config.fp_epochs,
        lambda: training.TrainState.create(*init_variables(), fp_tx, config.seed),
        resume=config.resume)
    results["fp_seconds_per_epoch"] = _typical(fp_info["epoch_seconds"])
  fp_test = runner.evaluate(fp_state, test)
  results["fp_test_accuracy"] = fp_test["accuracy"]
  log(f"[fp] test accuracy {fp_test['accuracy']:.4f} on {fp_test['examples']} examples")
  # The paper's rule keeps the first and last kernel in full precision; trained params have
  # re-sorted keys, so name them by the forward pass.
  params_shape, stats_shape = jax.eval_shape(init_variables)
  order = ec2t.forward_order(
      lambda p, s, x: config.model.apply({"params": p, "batch_stats": s}, x, train=False),
      params_shape, stats_shape, dummy)
  selection = ec2t.Selection(order=order)
  # A bytes budget's F: the full-precision leaves as the export will store them.
  fixed_bytes = (ec2t.export.fixed_bytes(parallel.to_host(fp_state.params), selection)
                 if config.target_bytes else 0.0)
  setup = methods_lib.build(
      dataclasses.replace(config, ec2t_steps=(config.phase1_epochs + config.phase2_epochs)
                          * train.steps_per_epoch,
                          budget_ramp_steps=int(config.budget_ramp * config.phase1_epochs
                                                * train.steps_per_epoch),
                          budget_fixed_bytes=fixed_bytes), selection)
  keep_last = _phase1_keeps_last(config, setup)
  if setup.post_training is not None:  # MCQ, calibrated pruning: no training phases
    return _post_training(config, setup, selection, runner, fp_state, train_shards, test, spec,
                          results, writer, main, log)
  if config.phase1_epochs == 0:  # pretraining only
    if main:
      with open(os.path.join(config.workdir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=float)
    writer.close()
    return results

  # ---- phase 1 of the method. A staged method (INQ, SLQ, MLQ) spreads its stages over
  # phase 1 and keeps phase 1's last state: earlier epochs are only partly quantized.
  tx, phase2_phase = setup.optimizer, 1
  if setup.staged is not None:
    num_layers = posttrain.count_selected(params_shape, selection)
    tx, phase2_phase = setup.staged(config.phase1_epochs * train.steps_per_epoch, num_layers)

  def start_ec2t(params, batch_stats):
    return training.TrainState.create(params, batch_stats, tx, config.seed + 1,
                                      prepare_params=ec2t.quantized_params)

  state, info1 = runner.run_phase(
      "ec2t_phase1", tx, config.phase1_epochs, start_ec2t, (fp_state.params, fp_state.batch_stats),
      resume=config.resume, evaluate_start=setup.phase_starts_are_results,
      epoch_metrics=ec2t_epoch_metrics, regularizer=setup.regularizer,
      keep="last" if keep_last else "best")
  del fp_state

  # ---- phase 2: best phase-1 state, phase 1 set (EC2T: assignment frozen; staged methods:
  # their last stage), same optimizer.
  if config.phase2_epochs > 0:
    def start_phase2(best):
      return best._replace(step=jnp.zeros((), jnp.int32),
                           opt_state=ec2t.set_phase(best.opt_state, phase2_phase))
    state, info2 = runner.run_phase(
        "ec2t_phase2", tx, config.phase2_epochs, start_phase2, (state,), resume=config.resume,
        evaluate_start=setup.phase_starts_are_results, epoch_metrics=ec2t_epoch_metrics)
  else:
    info2 = {"epoch_seconds": []}

  # ---- results
  ternary_test = runner.evaluate(state, test)
  summary = ec2t.summary(parallel.to_host(state.opt_state))
  host_params = parallel.to_host(state.params)
  layers = [(int(np.prod(l.shape)), l.entropy) for l in summary.layers]
  results.update({
      "ternary_test_accuracy": ternary_test["accuracy"],
      "ternary_val_accuracy": (info2.get("best_val_accuracy", 0.0) if setup.staged is not None
                               else max(info1.get("best_val_accuracy", 0.0),
                                        info2.get("best_val_accuracy", 0.0))),
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
  # Every quantized leaf of the final params is on the method's grid: at most
  # ``max_values`` values (3: ternary), per filter for per-filter methods.
  _check_ternary(host_params, summary, setup.per_filter, setup.max_values)
  if main:
    exported = ec2t.export.save(os.path.join(config.workdir, "model.ec2t"), host_params)
    results["export_bytes"] = exported.total_bytes
    print(summary)
    print(report_lib.format_report(results))
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


def _check_ternary(params: Any, summary: ec2t.Summary, per_filter: bool = False,
                   max_values: int = 3) -> None:
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  for layer in summary.layers:
    if layer.mode != "ecp" and layer.path in flat:
      posttrain.check_at_most_values(layer.path, np.asarray(flat[layer.path]), max_values,
                                     per_filter)


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
    with open(os.path.join(config.workdir, "report.json"), "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2, default=float)
  writer.close()
  return results
