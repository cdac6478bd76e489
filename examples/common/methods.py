"""The quantization methods the examples run: the library's registry, one generic builder.

``--method=NAME`` picks a method of ``ec2t.method_registry()``;
``--method_options`` (``key=value,key=value``) sets its knobs by their library
names (``samples_per_weight=2`` for MCQ, ``portions=0.5/1`` for INQ: tuples are
``/``-separated, ``none`` is None), typed like their defaults. :func:`build`
dispatches on the spec's kind; nothing here names a method but the paper's:

* ``train``: ``optax.chain(inner, spec.transform(**knobs))``, the inner
  optimizer L2 + Adam(``learning_rate``); a method with a ``regularizer`` (Faraone
  et al.) adds it to the loss of phase 1; one that reaches its grid in phase
  ``last_phase > 0`` needs phase 2;
* ``staged`` (INQ, SLQ, MLQ): the stages spread over phase 1, phase 2 starts at
  the last; option ``restart`` (default true): a fresh inner optimizer per stage
  (``ec2t.restart_on_stage``, as the official INQ code), and option ``solver``, which
  one: ``inner`` (default; the example's inner optimizer with its learning rate
  annealed within each stage by a cosine of the stage's length), ``official``
  (``ec2t.official_stage_optimizer``: the official INQ solver, L2 5e-4 + SGD momentum
  0.9 at 0.003, x0.2 every 15/63 of a stage) or ``constant`` (the inner optimizer's
  moments restarted, its rate constant: the examples before issue 25);
* ``one_shot`` (MCQ, calibrated pruning): ``spec.build(**knobs, **inputs).instant(params)``
  on the full-precision model; the inputs are ``key`` (from the seed) and
  ``apply_fn`` / ``calibration_data`` (options ``calibration=real|fractal`` and
  ``calibration_images``).

The paper's method (EC2T) also takes ``--gamma``, ``--init_scale``,
``--sustain`` as flags and ``--ec2t_mode=reference`` (``ec2t.reference_optimizer``,
its three Adams); its chain form decays Adam's rate by a cosine over both phases.
A size budget (``--bits_per_weight`` / ``--target_bytes`` / ``--target_sparsity``)
goes to any method whose transformation takes ``budget``.

Example:
  >>> from common.methods import parse_options
  >>> parse_options("mcq", "samples_per_weight=2")
  {'samples_per_weight': 2.0}
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax
import optax

import ec2t_jax as ec2t
from common import posttrain
from common.cli import UserError

PAPER = "ec2t"
PAPER_FLAGS = ("gamma", "init_scale", "sustain")  # EC2T's knobs that are also flags
_NOT_KNOBS = ("selection", "budget", "budget_target")


@dataclasses.dataclass(frozen=True)
class MethodSetup:
  """How the pipeline trains one method.

  Attributes:
    optimizer: the optimizer of phases 1 and 2 (None for one-shot methods).
    regularizer: ``params -> scalar`` added to the training loss in phase 1, or None.
    per_filter, max_values, ternary: the method's grid (``spec.grid_for``).
    phase_starts_are_results: the state at the start of a phase may be kept as
      that phase's best (False where the grid is reached later: staged methods,
      Faraone et al.).
    staged: ``(phase-1 steps, number of quantized layers) -> (optimizer, last stage)``.
    post_training: :class:`PostTrainingInputs` -> compressed params (one-shot methods).
    check: ``[(path, leaf)]`` of the quantized layers -> ``AssertionError`` if off the grid.
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
  """What a one-shot method gets from the pipeline: the full-precision ``params``,
  ``apply_fn(params, x)``, the training images (calibration), their ``(H, W, C)``,
  ``mean`` / ``std``, the run's ``seed`` and the ``selection``."""
  params: Any
  apply_fn: Callable[[Any, Any], Any]
  train_images: Any
  image_shape: tuple[int, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  seed: int
  selection: Any


def _spec(name: str):
  registry = ec2t.method_registry()
  if name not in registry:
    raise UserError(f"--method={name!r} is not one of {', '.join(registry)}")
  return registry[name]


def _keywords(fn) -> dict[str, Any]:
  """The keyword parameters of ``fn`` with defaults (the knobs it takes)."""
  return {n: p.default for n, p in inspect.signature(fn).parameters.items()
          if p.default is not inspect.Parameter.empty and n not in _NOT_KNOBS}


def extra_options(spec) -> dict[str, Any]:
  """The example's own options of a kind: how it stages or calibrates a method."""
  extra = {"restart": True, "solver": "inner"} if spec.kind == "staged" else {}
  if "calibration_data" in spec.inputs:
    extra.update(calibration="real", calibration_images=300)
  return extra


def option_defaults(name: str) -> dict[str, Any]:
  """Every ``--method_options`` key of ``name`` with its default: the registry's knobs
  (and keywords of its transformation), its regulariser's knobs, the example's options."""
  spec = _spec(name)
  knobs = {k: knob.default for k, knob in spec.knobs.items()}
  if spec.transform is not None and not spec.inputs:
    knobs = {**_keywords(spec.transform), **knobs}
  regularizer = {k: knob.default for k, knob in spec.regularizer_knobs.items()}
  return {**knobs, **regularizer, **extra_options(spec)}


def _typed(key: str, text: str, default: Any) -> Any:
  if text.lower() == "none":
    return None
  try:
    if isinstance(default, bool):
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(text)
      return text.lower() in ("true", "1")
    if isinstance(default, tuple):
      return tuple(float(part) for part in text.split("/"))
    if isinstance(default, (int, float, str)):
      return type(default)(text)
    if "/" in text:  # default None (SLQ's portions, cluster_counts): '/'-separated numbers
      return tuple(int(p) if p.strip().lstrip("-").isdigit() else float(p)
                   for p in text.split("/"))
    for kind in (int, float):  # default None: a number if it reads as one
      try:
        return kind(text)
      except ValueError:
        pass
    return text
  except ValueError:
    raise UserError(f"--method_options: {key}={text!r} is not a {type(default).__name__}"
                    + (" ('/'-separated numbers)" if isinstance(default, tuple) else "")) from None


def parse_options(name: str, text: str) -> dict[str, Any]:
  """``"a=1,b=x"`` -> ``{"a": 1.0, "b": "x"}``, keys checked and typed by
  :func:`option_defaults` (only the options given)."""
  defaults = option_defaults(name)
  given = {}
  for item in filter(None, (s.strip() for s in (text or "").split(","))):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or key not in defaults:
      raise UserError(f"--method_options: {item!r} is not key=value with a key of method "
                      f"{name!r} (known: {', '.join(sorted(defaults)) or 'none'})")
    given[key] = _typed(key, value.strip(), defaults[key])
  return given


def method_options(config) -> dict[str, Any]:
  """Every option of ``config.method``: defaults, the paper's flags, ``--method_options``."""
  options = option_defaults(config.method)
  if config.method == PAPER:
    options.update({k: getattr(config, k) for k in PAPER_FLAGS if hasattr(config, k)})
  return {**options, **parse_options(config.method, config.method_options)}


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


def build(config, selection=None) -> MethodSetup:
  """The :class:`MethodSetup` of ``config.method`` with its options (:func:`method_options`).

  ``selection``: which leaves (an ``ec2t.Selection``, e.g. with the forward
  order of the layers); default the paper's rule by the tree's order.
  """
  spec = _spec(config.method)
  options = method_options(config)
  budget = size_budget(config)
  takes_budget = spec.transform is not None and "budget" in inspect.signature(
      spec.transform).parameters
  if budget is not None and not takes_budget:
    raise UserError(f"a size budget (--bits_per_weight / --target_bytes / --target_sparsity) "
                    f"needs a method that takes one; --method={config.method} takes none")
  try:
    return _BUILDERS[spec.kind](spec, config, options, selection, budget)
  except ValueError as error:  # a knob out of range: name it as the user typed it
    raise UserError(f"--method={config.method} --method_options: {error}") from None


def _split(spec, options):
  """``options`` -> (the method's knobs, its regulariser's knobs, the example's options)."""
  extra = extra_options(spec)
  regularizer = {k: v for k, v in options.items() if k in spec.regularizer_knobs}
  knobs = {k: v for k, v in options.items() if k not in extra and k not in regularizer}
  for name, value in regularizer.items():
    spec.regularizer_knobs[name].check(name, value)
  return knobs, regularizer, {k: options[k] for k in extra}


def _transform(spec, knobs, selection):
  """The method's transformation; knobs checked by name against the registry."""
  spec.options(**{k: v for k, v in knobs.items() if k in spec.knobs})
  if spec.transform is not None and not spec.inputs:
    return spec.transform(**knobs, selection=selection)
  return spec.build(selection=selection, **knobs).transform()


def _grid(spec, knobs) -> dict[str, Any]:
  grid = spec.grid_for(**{k: v for k, v in knobs.items() if k in spec.knobs})
  return {"per_filter": grid.per_filter, "max_values": grid.max_values or 0,
          "ternary": grid.ternary, "check": grid.check}


def _inner(config, paper: bool = False) -> optax.GradientTransformation:
  """The inner optimizer of every chain-form method: L2 + Adam(learning_rate).

  ``config.inner_optimizer`` (a callable returning an optax transformation, e.g. the GPT
  example's AdamW) replaces it for every method; the paper's chain form decays Adam's rate
  by a cosine over ``config.ec2t_steps`` (both phases; constant when 0).
  """
  custom = getattr(config, "inner_optimizer", None)
  if custom is not None:
    return custom()
  rate = config.learning_rate
  if paper and getattr(config, "ec2t_steps", 0):
    rate = optax.cosine_decay_schedule(config.learning_rate, config.ec2t_steps)
  return optax.chain(optax.add_decayed_weights(config.weight_decay), optax.adam(rate))


def _reference(spec, config, knobs, selection, budget) -> MethodSetup:
  """EC2T as the paper trains it: ``ec2t.reference_optimizer``, three constant-rate Adams
  (checked against EC2T's grid, as the chain form)."""
  if budget is not None:
    raise UserError("a size budget (--bits_per_weight / --target_bytes / --target_sparsity) "
                    "needs --ec2t_mode=chain")
  return MethodSetup(ec2t.reference_optimizer(
      gamma=knobs["gamma"], init_scale=knobs["init_scale"], learning_rate=config.learning_rate,
      weight_decay=config.weight_decay, latent_learning_rate=config.latent_learning_rate,
      centroid_learning_rate=config.centroid_learning_rate, sustain=knobs["sustain"],
      selection=selection), **_grid(spec, knobs))


def _train(spec, config, options, selection, budget) -> MethodSetup:
  knobs, regularizer_knobs, _ = _split(spec, options)
  paper = spec.name == PAPER
  mode = getattr(config, "ec2t_mode", "chain")
  if paper and mode not in ("reference", "chain"):
    raise UserError(f"--ec2t_mode must be 'reference' or 'chain', got {mode!r}")
  if paper and mode == "reference":
    return _reference(spec, config, knobs, selection, budget)
  last_phase = spec.last_phase(spec.options(**_own(spec, knobs)), 0)
  if last_phase > 0 and config.phase2_epochs < 1:
    raise UserError(f"--method={spec.name} needs --phase2_epochs >= 1 (it reaches its grid in "
                    "phase 2)")
  if budget is not None:  # the budget is a knob of the methods that take one (ec2t, twn)
    knobs = {**knobs, "budget": budget, **({"gamma": None} if paper else {})}
  regularizer = None
  if spec.regularizer is not None:
    shared = {k: v for k, v in knobs.items() if k in _keywords(spec.regularizer)}
    regularizer = spec.regularizer(**shared, **regularizer_knobs, selection=selection)
  # ec2t.chain: the inner optimizer's decoupled weight decay shrinks the latent weights
  # (config.decay_latents, the GPT's AdamW); optax.chain: it sees the quantized params.
  compose = ec2t.chain if getattr(config, "decay_latents", False) else optax.chain
  tx = compose(_inner(config, paper), _transform(spec, knobs, selection))
  return MethodSetup(tx, regularizer=regularizer, phase_starts_are_results=last_phase == 0,
                     **_grid(spec, knobs))


def _own(spec, knobs):
  return {k: v for k, v in knobs.items() if k in spec.knobs}


def _staged(spec, config, options, selection, budget) -> MethodSetup:
  """Phase 1 spreads the stages ``0 .. last - 1`` evenly over its steps; phase 2 starts
  with ``ec2t.set_phase(opt_state, last)``, freezing every remaining weight on the grid."""
  del budget
  knobs, _, extra = _split(spec, options)
  if config.phase2_epochs < 1:
    raise UserError(f"--method={spec.name} needs --phase2_epochs >= 1 (its first phase-2 step "
                    "quantizes the last weights; phase 2 retrains the other parameters)")
  compose = ec2t.restart_on_stage if extra["restart"] else optax.chain
  make = lambda n: _transform(spec, {**knobs, "steps_per_stage": n}, selection)
  make(0)  # a bad knob fails here, at build time
  factory = _stage_solver(config, extra["solver"], extra["restart"])

  def staged(phase1_steps: int, num_layers: int, phase2_steps: int):
    last = spec.last_phase(spec.options(**_own(spec, knobs)), num_layers)
    per_stage = max(1, phase1_steps // last) if last > 0 else 0
    if factory is not None and per_stage:
      # Each run of the inner optimizer gets a schedule of its own length (factory(n)), so
      # every stage anneals: restarts follow the updates per, 2 per, ..., last * per.
      runs = ((per_stage + 1,) + (per_stage,) * (last - 1)
              + (max(1, phase1_steps + phase2_steps - last * per_stage - 1),))
      return ec2t.restart_on_stage(factory, make(per_stage), stage_steps=runs), last
    return compose(_inner(config), make(per_stage)), last

  return MethodSetup(compose(_inner(config), make(0)), staged=staged,
                     phase_starts_are_results=False, **_grid(spec, knobs))


STAGE_SOLVERS = ("inner", "official", "constant")


def _stage_solver(config, solver: str, restart: bool):
  """The factory ``steps -> optimizer`` of one stage's run for option ``solver``, or None
  (``constant``, or no restart: the inner optimizer as the other methods get it)."""
  if solver not in STAGE_SOLVERS:
    raise UserError(f"--method_options solver must be one of {', '.join(STAGE_SOLVERS)}, "
                    f"got {solver!r}")
  if solver == "official" and not restart:
    raise UserError("--method_options solver=official restarts the official solver at each "
                    "stage; it needs restart=true, got restart=false")
  if solver == "constant" and getattr(config, "inner_optimizer", None) is not None:
    raise UserError("--method_options solver=constant restarts a constant-rate optimizer; "
                    "this example's optimizer has a run-long schedule, which would restart "
                    "at its peak each stage and never anneal: use solver=inner")
  if not restart or solver == "constant":
    return None
  if solver == "official":
    return ec2t.official_stage_optimizer
  custom = getattr(config, "inner_optimizer", None)
  if custom is not None:
    return custom
  return lambda steps: optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.adam(optax.cosine_decay_schedule(config.learning_rate, steps)))


def _one_shot(spec, config, options, selection, budget) -> MethodSetup:
  """``spec.build(**knobs, **inputs).instant(params)`` on the full-precision model."""
  del config, selection, budget
  knobs, _, extra = _split(spec, options)
  placeholders = {"key": jax.random.key(0), "apply_fn": lambda p, x: x,
                  "calibration_data": jax.numpy.zeros((1, 1))}
  # A bad knob fails here, at build time: the quantizer checks its knobs on construction.
  spec.build(**knobs, **{name: placeholders[name] for name in spec.inputs})
  if "calibration_data" in spec.inputs:
    posttrain.check_calibration(extra["calibration"], extra["calibration_images"])

  def run(inputs: PostTrainingInputs):
    given = {"key": lambda: jax.random.key(inputs.seed),
             "apply_fn": lambda: inputs.apply_fn,
             "calibration_data": lambda: posttrain.calibration_images(
                 extra["calibration"], extra["calibration_images"], inputs.train_images,
                 inputs.image_shape, inputs.mean, inputs.std, seed=inputs.seed)}
    seeded = {"seed": inputs.seed} if "seed" in spec.knobs else {}  # the run's --seed
    quantizer = spec.build(selection=inputs.selection, **{**knobs, **seeded},
                           **{name: given[name]() for name in spec.inputs})
    return quantizer.instant(inputs.params)

  return MethodSetup(None, post_training=run, phase_starts_are_results=False,
                     **_grid(spec, knobs))


_BUILDERS = {"train": _train, "staged": _staged, "one_shot": _one_shot}
