r"""A ternary character-level GPT on tiny Shakespeare: full precision, then EC2T, then a report.

nanoGPT's CPU configuration by default (``ec2t_jax.models.GPT``: 4 layers, 4
heads, width 128, context 64, tied embedding, biases, GELU MLP of 4x width,
pre-LayerNorm, no dropout; AdamW 1e-3 with 100 warm-up steps and a cosine to
1e-4 at 2000, beta2 0.99, weight decay 0.1 on matrices, gradient clip 1.0,
batch 12, 2000 iterations). Then the method (``--method``, default EC2T) ternarizes
every linear kernel of the blocks -- the paper's rule in the traced forward order:
the token embedding is the first layer, the tied LM head the last, so they stay in
full precision, as in BitNet -- in phase 1 (assignment trained) and phase 2
(assignment frozen), with the same AdamW (no weight decay)
and a cosine from ``--learning_rate``. It reports the validation loss of both
models (nanoGPT's val split: the tfds ``validation`` + ``test`` splits), the
per-layer summary, the sizes (2-bit packed, entropy bound, exported file) and a
few lines sampled from each model. Measured (benchmarks/RESULTS_gpt.md, 2 seeds): full
precision 1.8829 val loss; EC2T (gamma 0.15) 1.9047 at 81.4% sparsity, 168,814 B exported
(128,102 B with ``--export_float16``); BitNet 1.8774 at 35.1%. The size budget flags
(``--bits_per_weight`` ...) train EC2T to a size instead of ``--gamma``.

``--scan_layers`` stacks the blocks (``nnx.vmap``) and applies them with
``nnx.scan``; ``--fsdp`` shards params and optimizer state, several processes
join with ``jax.distributed`` as in the CNN examples; ``--resume`` continues
exactly where a run stopped. Data: ``tfds.load("tiny_shakespeare")``, prepared
offline::

  TFDS_DATA_DIR=../shared/data/tfds python examples/shakespeare_gpt.py
  python examples/shakespeare_gpt.py --method=bitnet --workdir=runs/gpt_bitnet \
      --init_from=runs/shakespeare_gpt/checkpoints/fp/latest
  python examples/shakespeare_gpt.py --scan_layers --workdir=runs/gpt_scan
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

from absl import app
from absl import flags

from common import flags as flags_lib
from common.script import script_main

PHASES = ("fp", "ec2t_phase1", "ec2t_phase2")
NO_METHOD = "none"  # --method=none: full precision continued for the method's steps


def define_flags(fv: flags.FlagValues) -> None:
  """Defines this script's flags on ``fv``."""
  d = lambda *a, **k: flags.DEFINE_integer(*a, flag_values=fv, **k)
  f = lambda *a, **k: flags.DEFINE_float(*a, flag_values=fv, **k)
  flags.DEFINE_string("workdir", "runs/shakespeare_gpt", "Output folder: checkpoints/, "
                      "metrics.jsonl, tensorboard/, report.json, model.ec2t.", flag_values=fv)
  flags.DEFINE_string("data_dir", None, "tfds data folder; default $TFDS_DATA_DIR.",
                      flag_values=fv)
  # Model.
  d("num_layers", 4, "Transformer blocks.")
  d("num_heads", 4, "Attention heads.")
  d("width", 128, "Embedding width.")
  d("block_size", 64, "Context length.")
  flags.DEFINE_bool("scan_layers", False, "Stack the blocks (nnx.vmap) and apply them with "
                    "nnx.scan.", flag_values=fv)
  d("activation_bits", None, "8: the blocks' linear layers take per-token absmax int8 "
    "inputs (straight-through), BitNet's W1.58A8 with any method; unset: float inputs.")
  # Full precision (nanoGPT's CPU configuration).
  d("batch_size", 12, "Global batch (windows).")
  d("eval_batch_size", 256, "Global batch of the validation windows.")
  d("fp_steps", 2000, "Full-precision iterations (ignored with --init_from).")
  f("fp_learning_rate", 1e-3, "Peak learning rate of pretraining.")
  f("min_learning_rate", 1e-4, "Learning rate at the end of pretraining's cosine.")
  d("warmup_steps", 100, "Linear warm-up of pretraining.")
  f("beta2", 0.99, "AdamW beta2.")
  f("weight_decay", 0.1, "AdamW weight decay of pretraining (matrices only).")
  f("clip", 1.0, "Gradient clipping (global norm).")
  flags.DEFINE_string("init_from", None, "Full-precision checkpoint folder of this script "
                      "(e.g. runs/shakespeare_gpt/checkpoints/fp/latest) instead of pretraining.",
                      flag_values=fv)
  # The method.
  flags.DEFINE_string("method", "ec2t", "Quantization method (examples/common/methods.py): "
                      "ec2t, bitnet, twn, ttq, sttn, faraone, inq, slq, mlq, mcq, any "
                      "registered train-time method; 'none': full precision continued "
                      "(phases 1 and 2 with the same AdamW and schedule, nothing quantized).",
                      flag_values=fv)
  flags.DEFINE_string("method_options", "", "The method's own knobs, key=value,...",
                      flag_values=fv)
  f("gamma", 0.15, "EC2T sparsity knob (not used with a size budget).")
  flags_lib.define_budget_flags(fv)
  f("init_scale", 0.3, "EC2T initial centroid scaler.")
  f("sustain", 0.05, "EC2T layer-size decay sustain.")
  f("learning_rate", 5e-4, "Peak AdamW learning rate of phases 1 and 2 (cosine to 0).")
  f("ec2t_weight_decay", 0.0, "AdamW weight decay in phases 1 and 2 (matrices only).")
  d("phase1_steps", 750, "Steps of phase 1 (0: pretrain only).")
  d("phase2_steps", 250, "Steps of phase 2 (EC2T: assignment frozen).")
  # Run control.
  d("seed", 0, "Seed of initialisation, data order and sampling.")
  d("eval_every", 250, "Evaluate, record and checkpoint every N steps.")
  d("sample_chars", 300, "Characters sampled from each model (0: none).")
  flags.DEFINE_bool("export_float16", False, "Store the leaves that stay full precision "
                    "(embeddings, LayerNorms, biases) as float16 in model.ec2t (lossy: the "
                    "report then gives the validation loss of the exported model too).",
                    flag_values=fv)
  flags.DEFINE_enum("sample_packed", "", ["", "xla", "pallas", "dense"], "Also sample from "
                    "model.ec2t loaded as a packed inference model (ec2t.export.load_packed: "
                    "int4 or 2-bit kernels in memory, KV-cache decoding, at most block_size "
                    "characters) and report its resident bytes.", flag_values=fv)
  flags.DEFINE_bool("resume", False, "Continue from the checkpoints in --workdir.",
                    flag_values=fv)
  d("stop_after_steps", 0, "Stop after N steps of this invocation, with a checkpoint.")
  flags.DEFINE_bool("progress", True, "Progress (a bar on a terminal, lines every 10% in a "
                    "log).", flag_values=fv)
  flags_lib.define_parallel_flags(fv)


@dataclasses.dataclass(frozen=True)
class MethodConfig:
  """What :func:`common.methods.build` reads (the image pipeline's names)."""
  method: str
  method_options: str
  gamma: float
  init_scale: float
  sustain: float
  learning_rate: float
  weight_decay: float
  phase2_epochs: int
  ec2t_steps: int
  inner_optimizer: Callable[..., Any]
  # AdamW's decoupled decay acts on the methods' latent weights (ec2t.chain), not on the
  # quantized values the params hold.
  decay_latents: bool = True
  ec2t_mode: str = "chain"
  latent_learning_rate: float = 0.0
  centroid_learning_rate: float = 0.0
  bits_per_weight: float = 0.0
  target_bytes: float = 0.0
  target_sparsity: float = 0.0
  budget_ramp: float = 0.0
  budget_ramp_steps: int = 0
  export_float16: bool = False
  budget_fixed_bytes: float = 0.0


def adamw(schedule, beta2: float, weight_decay: float, clip: float):
  """nanoGPT's optimizer: clip, AdamW with weight decay on matrices only."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  return optax.chain(optax.clip_by_global_norm(clip),
                     optax.adamw(schedule, b1=0.9, b2=beta2, weight_decay=weight_decay,
                                 mask=decay_mask))


def paper_selection(init_params, apply_fn, block_size: int):
  """The paper's rule in the traced forward order: the token embedding is the first layer and
  the tied LM head the last, so every linear kernel of the blocks is ternarized (BitNet's choice
  too), one layer per slice of scanned blocks."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ec2t_jax as ec2t  # pylint: disable=g-import-not-at-top
  order = ec2t.forward_order(apply_fn, jax.eval_shape(init_params),
                             jnp.zeros((1, block_size), jnp.int32))
  return ec2t.Selection(order=order)


def _str_keys(tree):
  if isinstance(tree, dict):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


def _model_keys(tree):
  if isinstance(tree, dict):
    return {(int(k) if isinstance(k, str) and k.isdigit() else k): _model_keys(v)
            for k, v in tree.items()}
  return tree


def build_model(fv, vocab_size: int):
  """``(init_params() -> params, apply_fn(params, tokens) -> logits)`` of the GPT."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ec2t_jax import models  # pylint: disable=g-import-not-at-top
  from common.cli import UserError  # pylint: disable=g-import-not-at-top
  try:
    config = models.GPTConfig(vocab_size=vocab_size, block_size=fv.block_size,
                              num_layers=fv.num_layers, num_heads=fv.num_heads, width=fv.width,
                              scan_layers=fv.scan_layers, activation_bits=fv.activation_bits)
  except ValueError as error:  # e.g. --activation_bits=4
    raise UserError(f"--activation_bits / model flags: {error}") from None
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: models.GPT(config, rngs=nnx.Rngs(0))))

  def init_params():
    model = models.GPT(config, rngs=nnx.Rngs(fv.seed))
    return _str_keys(nnx.to_pure_dict(nnx.state(model, nnx.Param)))

  def apply_fn(params, tokens):
    return nnx.merge(graphdef, _model_keys(params))(tokens)

  return init_params, apply_fn


def _mesh(fv):
  import jax  # pylint: disable=g-import-not-at-top
  from common import parallel  # pylint: disable=g-import-not-at-top
  from common.cli import UserError  # pylint: disable=g-import-not-at-top
  if not fv.num_devices or fv.num_devices == jax.device_count():
    return parallel.make_mesh(fv.fsdp)
  if jax.process_count() > 1 or fv.num_devices > jax.device_count() or fv.num_devices % fv.fsdp:
    raise UserError(f"--num_devices={fv.num_devices} must be at most the {jax.device_count()} "
                    f"devices of a single process and a multiple of --fsdp={fv.fsdp}")
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((fv.num_devices // fv.fsdp, fv.fsdp), ("data", "fsdp"),
                       axis_types=(auto, auto), devices=jax.devices()[:fv.num_devices])


def method_setup(fv, selection, total_steps: int, budget_fixed_bytes: float = 0.0):
  """The method's :class:`common.methods.MethodSetup` with this script's AdamW inside
  (``budget_fixed_bytes``: ``F`` of a ``--target_bytes`` budget, 0: the library's bound)."""
  import optax  # pylint: disable=g-import-not-at-top
  from common import methods  # pylint: disable=g-import-not-at-top
  # steps: the length of the cosine (a staged method's runs between restarts; default the run).
  inner = lambda steps=total_steps: adamw(
      optax.cosine_decay_schedule(fv.learning_rate, max(steps, 1)), fv.beta2,
      fv.ec2t_weight_decay, fv.clip)
  if fv.method == NO_METHOD:  # the reference a method's steps are measured against
    if fv.method_options or any(budget_fields(fv)[k] for k in
                                ("bits_per_weight", "target_bytes", "target_sparsity")):
      from common.cli import UserError  # pylint: disable=g-import-not-at-top
      raise UserError(f"--method={NO_METHOD} takes no --method_options and no size budget")
    return methods.MethodSetup(inner(), ternary=False, max_values=0)
  config = MethodConfig(
      method=fv.method, method_options=fv.method_options, gamma=fv.gamma,
      init_scale=fv.init_scale, sustain=fv.sustain, learning_rate=fv.learning_rate,
      weight_decay=fv.ec2t_weight_decay, phase2_epochs=fv.phase2_steps, ec2t_steps=total_steps,
      inner_optimizer=inner,
      budget_fixed_bytes=budget_fixed_bytes, **budget_fields(fv))
  return methods.build(config, selection)


def budget_fields(fv) -> dict[str, Any]:
  """The size budget's flags (all 0: none), with the ramp in steps of phase 1."""
  return {"bits_per_weight": fv.bits_per_weight, "target_bytes": fv.target_bytes,
          "target_sparsity": fv.target_sparsity, "budget_ramp": fv.budget_ramp,
          "budget_ramp_steps": int(fv.budget_ramp * fv.phase1_steps),
          "export_float16": fv.export_float16}


def run(fv: flags.FlagValues) -> dict:
  """Runs the job described by parsed flags ``fv``; returns the results dict."""
  # pylint: disable=g-import-not-at-top  (after jax.distributed starts)
  import jax
  import optax
  from common import checkpoint as checkpoint_lib
  from common import language
  from common import parallel
  from common.metrics import MetricWriter

  main = parallel.is_main_process()
  log = (lambda *a: print(*a, flush=True)) if main else (lambda *a: None)
  total = _check_flags(fv)
  mesh = _mesh(fv)
  data = language.load_tiny_shakespeare(fv.data_dir)
  init_params, apply_fn = build_model(fv, len(data.vocab))
  selection = paper_selection(init_params, apply_fn, fv.block_size)
  setup = method_setup(fv, selection, total)
  if setup.post_training is not None and fv.method != "mcq":
    from common.cli import UserError
    raise UserError(f"--method={fv.method} calibrates on images; this example runs the "
                    "training-time methods and mcq")
  fingerprint = _fingerprint(fv)
  checkpoint_lib.check_workdir(fv.workdir, fingerprint, fv.resume, PHASES)
  writer = MetricWriter(fv.workdir, enabled=main)
  runner = language.LMRunner(apply_fn, data, mesh, fv.batch_size, fv.block_size, fv.workdir,
                             fingerprint, writer, seed=fv.seed, eval_every=fv.eval_every,
                             eval_batch_size=fv.eval_batch_size, progress=fv.progress,
                             stop_after_steps=fv.stop_after_steps)
  log(f"tiny_shakespeare: {len(data.train):,} training and {len(data.val):,} validation "
      f"characters, {len(data.vocab)} symbols; {jax.process_count()} process(es), mesh "
      f"{dict(mesh.shape)}")

  # ---- full precision
  fp_schedule = optax.warmup_cosine_decay_schedule(0.0, fv.fp_learning_rate, fv.warmup_steps,
                                                   max(fv.fp_steps, fv.warmup_steps + 1),
                                                   end_value=fv.min_learning_rate)
  fp_tx = adamw(fp_schedule, fv.beta2, fv.weight_decay, fv.clip)
  results: dict[str, Any] = {"model": fingerprint["model"], "method": fv.method,
                             "method_options": fv.method_options, "gamma": fv.gamma,
                             "learning_rate": fv.learning_rate, "phase1_steps": fv.phase1_steps,
                             "phase2_steps": fv.phase2_steps, "scan_layers": fv.scan_layers,
                             "activation_bits": fv.activation_bits}
  fp_state = _full_precision(fv, runner, fp_tx, init_params, results, log)
  samples = {"fp": language.sample_text(apply_fn, fp_state.params, data, fv.block_size,
                                        fv.sample_chars, seed=fv.seed)} if fv.sample_chars else {}
  if fv.phase1_steps == 0:
    return _finish(fv, results, samples, writer, log)

  # ---- the method
  results["total_params"] = language.count_params(fp_state.params)
  if fv.target_bytes:  # F measured on the full-precision model: its float leaves, packed
    import ec2t_jax as ec2t
    setup = method_setup(fv, selection, total, ec2t.export.fixed_bytes(
        parallel.to_host(fp_state.params), selection, float16=fv.export_float16))
  if setup.post_training is not None:  # MCQ
    state = _post_train(fv, runner, fp_state, fp_tx, setup, selection, apply_fn)
    return _report(fv, runner, state, None, setup, selection, results, samples, writer, log,
                   apply_fn, data)
  state, summary = _train_method(fv, runner, fp_state, setup, selection, results)
  return _report(fv, runner, state, summary, setup, selection, results, samples, writer, log,
                 apply_fn, data)


def _check_flags(fv) -> int:
  """Raises ``UserError`` for bad flags (before loading data); returns the method's steps."""
  from common.cli import UserError  # pylint: disable=g-import-not-at-top
  for name in ("phase1_steps", "phase2_steps"):
    if fv[name].value < 0:
      raise UserError(f"--{name} must be >= 0, got {fv[name].value}")
  if fv.init_from is None and fv.fp_steps < 1:
    raise UserError("full-precision model needed: set --fp_steps > 0 or --init_from")
  total = fv.phase1_steps + fv.phase2_steps
  method_setup(fv, None, total)  # bad --method flags fail before loading data
  if fv.activation_bits not in (None, 8):
    raise UserError(f"--activation_bits must be 8 or unset (float inputs), got "
                    f"{fv.activation_bits}")
  return total


def _fingerprint(fv) -> dict[str, Any]:
  """The run's fingerprint (model, data, method, budget): a workdir holds one run."""
  fingerprint = {"model": f"gpt{fv.num_layers}x{fv.num_heads}x{fv.width}x{fv.block_size}"
                          + ("-scan" if fv.scan_layers else ""),
                 "dataset": "tiny_shakespeare", "method": fv.method,
                 "method_options": fv.method_options, "gamma": fv.gamma}
  budget = {k: v for k, v in budget_fields(fv).items()
            if k not in ("budget_ramp_steps", "export_float16")}
  if any(budget[k] for k in ("bits_per_weight", "target_bytes", "target_sparsity")):
    fingerprint["budget"] = budget  # runs without a budget keep their former fingerprint
  if fv.activation_bits is not None:  # float-input runs keep their former fingerprint
    fingerprint["activation_bits"] = fv.activation_bits
  return fingerprint


def _full_precision(fv, runner, fp_tx, init_params, results, log):
  """The full-precision state: loaded (``--init_from``) or trained; records its loss."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from common import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from common.training import TrainState  # pylint: disable=g-import-not-at-top
  if fv.init_from:
    params, _ = checkpoint_lib.restore_variables(fv.init_from)
    params = jax.tree.map(np.asarray, params)  # restored on one device; the mesh may span more
    fp_state = runner.init_state(lambda p: TrainState.create(p, {}, fp_tx, fv.seed), params)
    log(f"[fp] loaded {fv.init_from}")
  else:
    fp_state, fp_info = runner.run_phase(
        "fp", fp_tx, fv.fp_steps, lambda: TrainState.create(init_params(), {}, fp_tx, fv.seed),
        resume=fv.resume)
    results["fp_seconds"] = fp_info["seconds"]
  results["fp_val_loss"] = runner.evaluate(fp_state.params)
  log(f"[fp] validation loss {results['fp_val_loss']:.4f}")
  return fp_state


def _post_train(fv, runner, fp_state, fp_tx, setup, selection, apply_fn):
  """The state of a post-training method (MCQ) applied to the full-precision model."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from common import parallel  # pylint: disable=g-import-not-at-top
  from common.methods import PostTrainingInputs  # pylint: disable=g-import-not-at-top
  from common.training import TrainState  # pylint: disable=g-import-not-at-top
  host = parallel.to_host(fp_state.params)
  params = setup.post_training(PostTrainingInputs(
      params=host, apply_fn=apply_fn, train_images=None, image_shape=(fv.block_size,),
      mean=(0.0,), std=(1.0,), seed=fv.seed, selection=selection))
  return runner.init_state(lambda p: TrainState.create(p, {}, fp_tx, fv.seed),
                           jax.tree.map(np.asarray, params))


def _train_method(fv, runner, fp_state, setup, selection, results):
  """Phases 1 and 2 of a training-time method; returns the state and its summary (or None)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ec2t_jax as ec2t  # pylint: disable=g-import-not-at-top
  from common import parallel  # pylint: disable=g-import-not-at-top
  from common import pipeline  # pylint: disable=g-import-not-at-top
  from common.training import TrainState  # pylint: disable=g-import-not-at-top
  tx, phase2_phase = setup.optimizer, 1
  if setup.staged is not None:
    layers = sum(p is not None for p in selection.plan(fp_state.params))
    tx, phase2_phase = setup.staged(fv.phase1_steps, layers, phase2_steps=fv.phase2_steps)

  quantized = fv.method != NO_METHOD
  epoch_metrics = pipeline.ec2t_epoch_metrics if quantized else None

  def start_phase1(params):
    return TrainState.create(params, {}, tx, fv.seed + 1,
                             prepare_params=ec2t.quantized_params if quantized else None)

  state, info1 = runner.run_phase("ec2t_phase1", tx, fv.phase1_steps, start_phase1,
                                  (fp_state.params,), resume=fv.resume,
                                  epoch_metrics=epoch_metrics,
                                  regularizer=setup.regularizer)
  seconds, val_loss = info1["seconds"], info1["val_loss"]
  if fv.phase2_steps > 0:
    def start_phase2(last):
      opt_state = (ec2t.set_phase(last.opt_state, phase2_phase) if quantized
                   else last.opt_state)
      return last._replace(step=jnp.zeros((), jnp.int32), opt_state=opt_state)
    state, info2 = runner.run_phase("ec2t_phase2", tx, fv.phase2_steps, start_phase2, (state,),
                                    resume=fv.resume, epoch_metrics=epoch_metrics)
    seconds, val_loss = seconds + info2["seconds"], info2["val_loss"]
  results["method_seconds"] = seconds
  results["val_loss"] = val_loss  # of the last state, measured at the end of its phase
  summary = ec2t.summary(parallel.to_host(state.opt_state)) if quantized else None
  results["budget"] = summary.budget if quantized else None  # None without a size budget
  return state, summary


def _report(fv, runner, state, summary, setup, selection, results, samples, writer, log,
            apply_fn, data):
  """Validation loss, sparsity, sizes, export and samples of the quantized model."""
  import ec2t_jax as ec2t  # pylint: disable=g-import-not-at-top
  from common import language, parallel, posttrain  # pylint: disable=g-import-not-at-top
  from common import report as report_lib  # pylint: disable=g-import-not-at-top
  host_params = parallel.to_host(state.params)
  named = posttrain.selected_leaves(host_params, selection)
  if fv.scan_layers:  # one layer per slice of the stacked blocks
    named = [(f"{path}[{i}]", leaf[i]) for path, leaf in named for i in range(leaf.shape[0])]
  if fv.method != NO_METHOD:  # every quantized kernel is on the method's grid
    setup.check(named)
  measures = posttrain.compression_measures(named)
  if fv.method == NO_METHOD:  # float kernels: stored at 32 bits, not their value entropy
    measures = {**measures, "bits_per_weight": 32.0,
                "layers": [{**l, "entropy": 32.0} for l in measures["layers"]]}
  if "val_loss" not in results:
    results["val_loss"] = runner.evaluate(state.params)
  results.update({"sparsity": measures["sparsity"],
                  "bits_per_weight": measures["bits_per_weight"],
                  "ternary_layers": len(named), "ternary_weights": measures["numel"]})
  results["sizes"] = report_lib.model_sizes(
      results["total_params"], [(l["numel"], l["entropy"]) for l in measures["layers"]])
  if parallel.is_main_process():
    exported = ec2t.export.save(os.path.join(fv.workdir, "model.ec2t"), host_params,
                                float16=fv.export_float16)
    results["export_bytes"] = exported.total_bytes
    if fv.sample_packed:
      from common import packed  # pylint: disable=g-import-not-at-top
      from ec2t_jax import models  # pylint: disable=g-import-not-at-top
      config = models.GPTConfig(vocab_size=len(data.vocab), block_size=fv.block_size,
                                num_layers=fv.num_layers, num_heads=fv.num_heads, width=fv.width)
      text, results["packed_resident_bytes"] = packed.sample_packed(
          os.path.join(fv.workdir, "model.ec2t"), fv.sample_packed, config, data,
          fv.sample_chars or 200, seed=fv.seed)
      samples[f"{fv.method} packed ({fv.sample_packed})"] = text
  results["export_float16"] = fv.export_float16
  if fv.export_float16:  # every process decodes the same bytes, then evaluates together
    shipped = ec2t.export.decode(ec2t.export.encode(host_params, float16=True))
    results["export_val_loss"] = runner.evaluate(shipped)
  if fv.sample_chars:
    samples[fv.method] = language.sample_text(apply_fn, state.params, data, fv.block_size,
                                              fv.sample_chars, seed=fv.seed)
  if summary is not None:
    log(summary)
  return _finish(fv, results, samples, writer, log)


def format_report(r: dict) -> str:
  """The one-screen comparison of the full-precision and the quantized model."""
  from common import report as report_lib  # pylint: disable=g-import-not-at-top
  name = {"ec2t": "EC2T", NO_METHOD: "FP continued"}.get(r["method"], r["method"])
  rows = [("validation loss (nats/char)", f"{r['fp_val_loss']:.4f}",
           f"{r['val_loss']:.4f}  ({r['val_loss'] - r['fp_val_loss']:+.4f})"),
          ("quantized kernels", "-", f"{r['ternary_layers']} layers, "
                                     f"{r['ternary_weights']:,} of {r['total_params']:,} weights"),
          ("their inputs (activations)", "float32",
           "int8 per token (W1.58A8: ternary x int8)" if r.get("activation_bits") == 8
           else "float32"),
          ("sparsity of the quantized kernels", "-", f"{100 * r['sparsity']:.1f}%"),
          ("bits/weight (entropy)", "32", f"{r['bits_per_weight']:.3f}"),
          ("size, float32 / 2-bit packed", f"{r['sizes']['float32_bits'] / 8:,.0f} B",
           f"{r['sizes']['packed_bits'] / 8:,.0f} B"),
          ("size, entropy bound", "", f"{r['sizes']['entropy_bits'] / 8:,.0f} B")]
  if r.get("export_bytes"):
    rows.append(("exported file (ec2t.export)" + (", float16" if r.get("export_float16") else ""),
                 "", f"{r['export_bytes']:,} B  "
                 f"({r['export_bytes'] * 8 / r['sizes']['packed_bits']:.3f}x 2-bit packed)"))
  if r.get("packed_resident_bytes"):
    rows.append(("packed inference model, resident", "", f"{r['packed_resident_bytes']:,} B"))
  if r.get("export_val_loss") is not None:
    rows.append(("validation loss of the exported file", "", f"{r['export_val_loss']:.4f}"))
  rows += report_lib.budget_rows(r.get("budget"))
  rows.insert(0, ("", "full precision", name))
  widths = [max(len(row[c]) for row in rows) for c in range(3)]
  knobs = ((f"{r['budget']['kind']} budget" if r.get("budget") else f"gamma={r['gamma']:g}")
           if r["method"] == "ec2t" else r["method_options"])
  title = f" {name} on tiny Shakespeare, {r['model']}" + (f", {knobs} " if knobs else " ")
  lines = [title.center(sum(widths) + 4, "=")]
  lines += [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c}" for a, b, c in rows]
  return "\n".join(lines + ["=" * (sum(widths) + 4)])


def _finish(fv, results, samples, writer, log) -> dict:
  from common import parallel  # pylint: disable=g-import-not-at-top
  results["samples"] = samples
  if "val_loss" in results:
    log(format_report(results))
  for name, text in samples.items():
    log(f"---- sampled from the {name} model ----\n{text}")
  if parallel.is_main_process():
    with open(os.path.join(fv.workdir, "report.json"), "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2, default=float)
  writer.close()
  return results


if __name__ == "__main__":
  define_flags(flags.FLAGS)
  app.run(script_main(run))
