"""The quantization methods the examples run: a name -> a builder of its optimizer.

``--method=NAME`` picks an entry of :data:`METHODS`; ``--method_options``
(``key=value,key=value``) passes the method's own knobs, typed by the
builder's defaults. Every method runs through the same pipeline
(``common/pipeline.py``): full precision, then phase 1 with
:attr:`MethodSetup.optimizer` (plus :attr:`MethodSetup.regularizer` in the
loss), then phase 2 with the same optimizer after
``ec2t.set_phase(opt_state, 1)`` (EC2T: assignment frozen; Faraone et al.:
prune and retrain; TWN, TTQ, STTN, BitNet: one phase, so phase 2 simply trains on).
Staged methods (INQ, SLQ, MLQ, :attr:`MethodSetup.staged`) spread their stages
over phase 1 and start phase 2 at their last stage; post-training methods
(MCQ, calibrated pruning, :attr:`MethodSetup.post_training`) skip both phases.

The methods are the library's registry (``ec2t.method_registry()``): its
kind (train / staged / one-shot), last phase and grid (values per layer, per
filter, ternary or not) come from there. A method registered in the library
runs here with no code of its own (:func:`_from_registry`: the inner
optimizer chained with ``spec.make_transform(**options)``; staged ones over
phase 1). :func:`register` adds an example-specific builder (EC2T's two
modes, Faraone et al.'s regulariser, the post-training calibration inputs)::

  @register("mine", {"knob": 0.5})
  def _mine(config, options, selection):
    return MethodSetup(optax.chain(optax.adam(config.learning_rate),
                                   my_transform(**options, selection=selection)))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import optax

import ec2t_jax as ec2t
from common import posttrain
from common.cli import UserError


@dataclasses.dataclass(frozen=True)
class MethodSetup:
  """How the pipeline trains one method.

  Attributes:
    optimizer: the optimizer of phases 1 and 2 (holds the method's
      transformation, so ``ec2t.ternary_params`` / ``ec2t.summary`` work).
    regularizer: ``params -> scalar`` added to the training loss in phase 1,
      or None.
    per_filter: the grid has one scale per output filter (at most three
      values per filter rather than per kernel).
    phase_starts_are_results: whether the state at the start of a phase may be
      kept as that phase's best model (False for Faraone et al.: phase 1
      starts from the unregularised model and its phase switch only prunes at
      the first phase-2 step).
    max_values: at most this many distinct values per quantized leaf (per
      filter with ``per_filter``) in the final params (3: ternary).
    staged: for staged methods (INQ, SLQ, MLQ): ``(phase-1 steps, number of
      quantized layers) -> (optimizer, last stage)``; the optimizer advances
      its stages by step count over phase 1, phase 2 starts at the last stage
      (every selected weight frozen on its grid), and phase 1's final state,
      not its best epoch (a half-quantized model), goes on to phase 2.
    post_training: for post-training methods (MCQ, calibrated pruning):
      :class:`PostTrainingInputs` -> compressed params. The pipeline skips the
      training phases and runs this on the full-precision model.
    check: ``[(path, leaf)]`` of the selected layers of a post-training
      method's result -> raises ``AssertionError`` if off the method's grid.
    ternary: the result is ternary (the report's 2-bit packed size applies).
  """
  optimizer: optax.GradientTransformation | None
  regularizer: Callable[[Any], Any] | None = None
  per_filter: bool = False
  phase_starts_are_results: bool = True
  max_values: int = 3
  staged: Callable[[int, int], tuple[optax.GradientTransformation, int]] | None = None
  post_training: Callable[[PostTrainingInputs], Any] | None = None
  check: Callable[[list[tuple[str, Any]]], None] | None = None
  ternary: bool = True


@dataclasses.dataclass(frozen=True)
class PostTrainingInputs:
  """What a post-training method gets from the pipeline.

  Attributes:
    params: the full-precision params.
    apply_fn: ``apply_fn(params, x) -> logits`` (inference mode).
    train_images: this process's ``uint8`` training images (calibration).
    image_shape: ``(H, W, C)``.
    mean, std: the input standardisation.
    seed: the run's seed.
    selection: the compressed leaves (the paper's rule in forward order).
  """
  params: Any
  apply_fn: Callable[[Any, Any], Any]
  train_images: Any
  image_shape: tuple[int, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  seed: int
  selection: Any


Builder = Callable[[Any, dict[str, Any], Any], MethodSetup]


@dataclasses.dataclass(frozen=True)
class MethodEntry:
  builder: Builder
  defaults: dict[str, Any]
  description: str


METHODS: dict[str, MethodEntry] = {}


def register(name: str, defaults: dict[str, Any] | None = None, description: str = ""):
  """Decorator: adds ``builder(config, options, selection) -> MethodSetup`` as ``name``."""
  def wrap(builder: Builder) -> Builder:
    METHODS[name] = MethodEntry(builder, dict(defaults or {}),
                                description or (builder.__doc__ or ""))
    return builder
  return wrap


def _typed(name: str, key: str, text: str, default: Any) -> Any:
  if default is None or isinstance(default, str):
    return None if text.lower() == "none" else text
  try:
    if isinstance(default, bool):
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(text)
      return text.lower() in ("true", "1")
    return type(default)(text)
  except ValueError:
    raise UserError(f"--method_options: {key}={text!r} is not a {type(default).__name__} "
                    f"(method {name!r})") from None


def parse_options(name: str, text: str) -> dict[str, Any]:
  """``"a=1,b=x"`` -> the method's defaults updated with these, typed like them."""
  if name not in METHODS:
    raise UserError(f"--method={name!r} is not one of {', '.join(sorted(METHODS))}")
  entry = METHODS[name]
  options = dict(entry.defaults)
  for item in filter(None, (s.strip() for s in (text or "").split(","))):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or key not in entry.defaults:
      known = ", ".join(sorted(entry.defaults)) or "none"
      raise UserError(f"--method_options: {item!r} is not key=value with a key of method "
                      f"{name!r} (known: {known})")
    options[key] = _typed(name, key, value.strip(), entry.defaults[key])
  return options


def build(config, selection=None) -> MethodSetup:
  """The :class:`MethodSetup` of ``config.method`` with ``config.method_options``.

  ``selection``: which leaves (an ``ec2t.Selection``, e.g. with the forward
  order of the layers); default the paper's rule by the tree's order.
  """
  options = parse_options(config.method, config.method_options)
  if config.method != "ec2t" and size_budget(config) is not None:
    raise UserError(f"a size budget (--bits_per_weight / --target_bytes / --target_sparsity) "
                    f"trains EC2T's chain form; --method={config.method} takes none")
  try:
    return METHODS[config.method].builder(config, options, selection)
  except ValueError as error:  # a knob out of range: name it as the user typed it
    raise UserError(f"--method={config.method} --method_options: {error}") from None


def size_budget(config) -> ec2t.Budget | None:
  """The :class:`ec2t.Budget` of ``--bits_per_weight`` / ``--target_bytes`` /
  ``--target_sparsity`` (None when all are 0), ramped over ``budget_ramp_steps``; a bytes
  budget takes ``budget_fixed_bytes`` (``ec2t.export.fixed_bytes`` of the full-precision model,
  measured by the example) and the example's float16 export."""
  given = {name: value for name, value in (
      ("bits_per_weight", getattr(config, "bits_per_weight", 0.0)),
      ("bytes", getattr(config, "target_bytes", 0.0)),
      ("sparsity", getattr(config, "target_sparsity", 0.0))) if value}
  if not given:
    return None
  if not 0 <= getattr(config, "budget_ramp", 0.0) <= 1:
    raise UserError(f"--budget_ramp must be in [0, 1], got {config.budget_ramp}")
  try:
    measured = {}
    if "bytes" in given:  # the file's rate-independent part, as the example will export it
      measured = {"float16": bool(getattr(config, "export_float16", False)),
                  "fixed_bytes": getattr(config, "budget_fixed_bytes", 0.0) or None}
    return ec2t.Budget(**given, ramp_steps=getattr(config, "budget_ramp_steps", 0), **measured)
  except ValueError as error:
    raise UserError(f"size budget (--bits_per_weight / --target_bytes / --target_sparsity): "
                    f"{error}") from None


def _grid(name: str, **knobs) -> dict[str, Any]:
  """``per_filter``, ``max_values`` and ``ternary`` of the library's grid of ``name``."""
  grid = ec2t.get_method(name).grid_for(**knobs)
  return {"per_filter": grid.per_filter, "max_values": grid.max_values or 0,
          "ternary": grid.ternary}


def _stages(name: str, **knobs) -> Callable[[int], int]:
  """Number of stages given the number of quantized layers: the registry's last phase + 1."""
  spec = ec2t.get_method(name)
  options = spec.options(**knobs)
  return lambda num_layers: spec.last_phase(options, num_layers) + 1


def _inner(config) -> optax.GradientTransformation:
  """The inner optimizer every chain-form method shares: L2 + Adam(learning_rate).

  A config with an ``inner_optimizer`` (a callable returning an optax
  transformation, e.g. the GPT example's AdamW with warm-up and cosine) gives
  every method that optimizer instead, EC2T's chain form included.
  """
  custom = getattr(config, "inner_optimizer", None)
  if custom is not None:
    return custom()
  return optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.adam(config.learning_rate))


@register("ec2t", {"centroids": "layer"},
          description="EC2T (--ec2t_mode, --gamma, --init_scale, learning rates); "
                      "centroids=layer|channel (chain form)")
def _ec2t(config, options, selection) -> MethodSetup:
  """EC2T. ``reference``: ``ec2t.reference_optimizer``, the paper's three Adams
  (non-ternary params: ``learning_rate`` with L2 ``weight_decay``; latent weights:
  ``latent_learning_rate``; centroids: ``centroid_learning_rate``), constant rates.
  ``chain``: ``optax.chain(add_decayed_weights, adam, ternarize_transform)``, Adam's
  ``learning_rate`` decayed to 0 by a cosine over ``config.ec2t_steps`` (both
  phases; constant when 0). Both use ``config.sustain``.
  """
  budget = size_budget(config)
  if budget is not None and config.ec2t_mode != "chain":
    raise UserError("a size budget (--bits_per_weight / --target_bytes / --target_sparsity) "
                    "needs --ec2t_mode=chain")
  if options["centroids"] != "layer" and config.ec2t_mode != "chain":
    raise UserError(f"--method_options=centroids={options['centroids']} needs --ec2t_mode=chain")
  if config.ec2t_mode == "reference":
    return MethodSetup(ec2t.reference_optimizer(
        gamma=config.gamma, init_scale=config.init_scale, learning_rate=config.learning_rate,
        weight_decay=config.weight_decay, latent_learning_rate=config.latent_learning_rate,
        centroid_learning_rate=config.centroid_learning_rate, sustain=config.sustain,
        selection=selection))
  knob = {"gamma": config.gamma} if budget is None else {"budget": budget}
  knob["centroids"] = options["centroids"]
  grid = _grid("ec2t", centroids=options["centroids"])  # per channel: 3 values per column
  if config.ec2t_mode == "chain" and getattr(config, "inner_optimizer", None) is not None:
    return MethodSetup(optax.chain(_inner(config), ec2t.ternarize_transform(
        **knob, init_scale=config.init_scale, sustain=config.sustain, selection=selection)),
                       per_filter=grid["per_filter"])
  if config.ec2t_mode == "chain":
    learning_rate = (optax.cosine_decay_schedule(config.learning_rate, config.ec2t_steps)
                     if config.ec2t_steps else config.learning_rate)
    inner = optax.chain(optax.add_decayed_weights(config.weight_decay),
                        optax.adam(learning_rate))
    return MethodSetup(optax.chain(inner, ec2t.ternarize_transform(
        **knob, init_scale=config.init_scale, sustain=config.sustain, selection=selection)),
                       per_filter=grid["per_filter"])
  raise UserError(f"--ec2t_mode must be 'reference' or 'chain', got {config.ec2t_mode!r}")


def _float_or_none(value):
  return None if value is None else float(value)


@register("twn", {"threshold": "layer"}, description="TWN: threshold=layer|filter")
def _twn(config, options, selection) -> MethodSetup:
  grid = _grid("twn", threshold=options["threshold"])
  return MethodSetup(optax.chain(_inner(config), ec2t.twn(
      # factor (default 0.7 layer / 0.75 filter) is not a --method_options key; a caller
      # that builds the setup directly (benchmarks/compare_methods.py) may pass it.
      options["threshold"], _float_or_none(options.get("factor")), selection=selection)),
                     per_filter=grid["per_filter"], max_values=grid["max_values"])


@register("ttq", {"threshold": 0.05, "sparsity": None, "init_scale": None},
          description="TTQ: threshold=t, or sparsity=r; init_scale=None (fit) or 1.0 (paper)")
def _ttq(config, options, selection) -> MethodSetup:
  as_float = _float_or_none
  # latent_step (update | gradient) is not a --method_options key; a caller that builds
  # the setup directly (benchmarks/compare_methods.py) may pass it.
  return MethodSetup(optax.chain(_inner(config), ec2t.ttq(
      options["threshold"], sparsity=as_float(options["sparsity"]),
      init_scale=as_float(options["init_scale"]),
      latent_step=options.get("latent_step", "update"), selection=selection)))


@register("sttn", {"init_factor": 0.7, "latent_step": "update"},
          description="STTN: init_factor (initial threshold factor), latent_step=update|gradient")
def _sttn(config, options, selection) -> MethodSetup:
  return MethodSetup(optax.chain(_inner(config), ec2t.sttn(
      options["init_factor"], latent_step=options["latent_step"], selection=selection)),
                     **_grid("sttn"))


@register("faraone", {"strength": 3.0, "l2": 0.0, "factor": 0.7, "temperature": 0.25},
          description="Faraone et al.: phase 1 regularised full precision, phase 2 pruned ternary")
def _faraone(config, options, selection) -> MethodSetup:
  if config.phase2_epochs < 1:
    raise UserError("--method=faraone needs --phase2_epochs >= 1 (phase 2 prunes and retrains "
                    "the ternary survivors)")
  regularizer = ec2t.sparsity_regularizer(
      options["l2"], options["strength"], factor=options["factor"],
      temperature=options["temperature"], selection=selection)
  return MethodSetup(optax.chain(_inner(config),
                                 ec2t.quantization_pruning(options["factor"], selection=selection)),
                     regularizer=regularizer, phase_starts_are_results=False)


# ---------------------------------------------------------------- staged methods (issue 10)


def _portions(text: str) -> tuple[float, ...]:
  """``"0.5/0.75/1"`` -> ``(0.5, 0.75, 1.0)`` (``/``: commas separate the options)."""
  try:
    return tuple(float(p) for p in text.split("/"))
  except ValueError:
    raise ValueError(f"portions must be numbers separated by '/', got {text!r}") from None


def _staged(config, make: Callable[[int], optax.GradientTransformation],
            stages: Callable[[int], int], grid: dict[str, Any], name: str,
            restart: bool = True) -> MethodSetup:
  """A staged method: ``make(steps_per_stage)`` is its transformation.

  Phase 1 spreads the stages ``0 .. last - 1`` evenly over its steps; phase 2
  starts with ``ec2t.set_phase(opt_state, last)``, so its first update
  freezes every remaining weight on the grid and phase 2 retrains the rest.
  With ``restart`` the inner optimizer starts afresh at each stage
  (``ec2t.restart_on_stage``, as the official INQ code).
  """
  compose = ec2t.restart_on_stage if restart else (lambda a, b: optax.chain(a, b))
  if config.phase2_epochs < 1:
    raise UserError(f"--method={name} needs --phase2_epochs >= 1 (its first phase-2 step "
                    "quantizes the last weights; phase 2 retrains the other parameters)")
  make(0)  # a bad knob fails here, at build time

  def staged(phase1_steps: int, num_layers: int):
    last = stages(num_layers) - 1
    per_stage = max(1, phase1_steps // last) if last > 0 else 0
    return compose(_inner(config), make(per_stage)), last

  return MethodSetup(compose(_inner(config), make(0)), staged=staged,
                     phase_starts_are_results=False, **grid)


@register("inq", {"bits": 5, "portions": "0.5/0.75/0.875/1", "restart": True},
          description="INQ: bits (2 = ternary), portions (accumulated, '/'-separated), "
                      "restart (fresh inner optimizer per stage)")
def _inq(config, options, selection) -> MethodSetup:
  bits, portions = options["bits"], _portions(options["portions"])
  make = lambda n: ec2t.inq(bits, portions, steps_per_stage=n, selection=selection)
  make(0)  # a bad knob fails here, before the registry reads it
  return _staged(config, make, _stages("inq", bits=bits, portions=portions),
                 _grid("inq", bits=bits), "inq", options["restart"])


@register("slq", {"bits": 2, "portions": "0.5/0.75/0.875/1", "restart": True,
                 "levels": "float"},
          description="SLQ: bits (2^(bits-1) + 1 clusters; 2 = ternary), portions ('/'-separated)")
def _slq(config, options, selection) -> MethodSetup:
  bits, portions = options["bits"], _portions(options["portions"])
  make = lambda n: ec2t.slq(bits, portions, steps_per_stage=n, levels=options["levels"],
                            selection=selection)
  make(0)  # a bad knob fails here, before the registry reads it
  return _staged(config, make, _stages("slq", bits=bits, portions=portions),
                 _grid("slq", bits=bits, levels=options["levels"]), "slq", options["restart"])


@register("mlq", {"portions": "0.5/1", "restart": True},
          description="MLQ: ternary, layers staggered one stage apart; portions ('/'-separated)")
def _mlq(config, options, selection) -> MethodSetup:
  portions = _portions(options["portions"])
  make = lambda n: ec2t.mlq(portions, steps_per_stage=n, selection=selection)
  make(0)  # a bad knob fails here, before the registry reads it
  return _staged(config, make, _stages("mlq", portions=portions), _grid("mlq"), "mlq",
                 options["restart"])


# ------------------------------------------------------------ post-training methods (issue 10)


@register("mcq", {"K": 1.0, "per_neuron": False},
          description="MCQ (post-training): K samples per weight, per_neuron scales")
def _mcq(config, options, selection) -> MethodSetup:
  samples, per_neuron = options["K"], options["per_neuron"]
  if not 0 < samples < float("inf"):
    raise ValueError(f"K must be a positive finite number, got {samples}")

  def run(inputs: PostTrainingInputs):
    return posttrain.mcq(inputs.params, samples, seed=inputs.seed, per_neuron=per_neuron,
                         selection=inputs.selection)

  grid = ec2t.get_method("mcq").grid_for(per_neuron=per_neuron)
  del config, selection
  return MethodSetup(None, post_training=run, check=grid.check, ternary=grid.ternary)


@register("prune", {"sparsity": 0.5, "calibration": "real", "calibration_images": 300,
                   "steps_per_level": 0},
          description="Calibrated pruning (post-training): sparsity, calibration=real|fractal, "
                      "calibration_images, steps_per_level (of each layer's fit; 0: OpenVINO "
                      "POT's 30 x 40 steps on batches of 50, N > 0: N steps, the fast schedule)")
def _prune(config, options, selection) -> MethodSetup:
  sparsity, kind, count = options["sparsity"], options["calibration"], options["calibration_images"]
  steps = options["steps_per_level"]
  if steps < 0:
    raise ValueError(f"steps_per_level must be >= 0, got {steps}")
  if not 0 <= sparsity < 1:
    raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
  if kind not in posttrain.CALIBRATIONS:
    raise ValueError(f"calibration must be one of {', '.join(posttrain.CALIBRATIONS)}, "
                     f"got {kind!r}")
  if count < 1:
    raise ValueError(f"calibration_images must be >= 1, got {count}")

  def run(inputs: PostTrainingInputs):
    images = posttrain.calibration_images(kind, count, inputs.train_images, inputs.image_shape,
                                          inputs.mean, inputs.std, seed=inputs.seed)
    return posttrain.prune(inputs.params, inputs.apply_fn, images, sparsity,
                           selection=inputs.selection, steps_per_level=steps or None,
                           seed=inputs.seed)

  grid = ec2t.get_method("prune").grid_for(sparsity=sparsity)
  del config, selection
  return MethodSetup(None, post_training=run, check=grid.check, ternary=grid.ternary)


# ------------------------------------------------- every other method of the library registry


def _from_registry(name: str) -> Builder:
  """A builder for a registered train or staged method with no example builder of its own."""
  spec = ec2t.get_method(name)

  def build_setup(config, options, selection) -> MethodSetup:
    if spec.kind == "one_shot":
      raise UserError(f"--method={name}: one-shot methods need an example builder "
                      "(their inputs: " + ", ".join(spec.inputs) + ")")
    grid = _grid(name, **options)
    if spec.kind == "staged":
      make = lambda n: spec.make_transform(selection=selection, **{**options,
                                                                    "steps_per_stage": n})
      make(0)
      return _staged(config, make, _stages(name, **options), grid, name)
    if spec.last_phase(spec.options(**options), 0) > 0 and config.phase2_epochs < 1:
      raise UserError(f"--method={name} needs --phase2_epochs >= 1 (it reaches its grid in "
                      "phase 2)")
    return MethodSetup(optax.chain(_inner(config),
                                   spec.make_transform(selection=selection, **options)),
                       **grid)

  return build_setup


for _name, _spec in ec2t.method_registry().items():
  if _name not in METHODS:
    register(_name, {k: knob.default for k, knob in _spec.knobs.items()},
             _spec.description)(_from_registry(_name))
