"""The quantization methods the examples run: a name -> a builder of its optimizer.

``--method=NAME`` picks an entry of :data:`METHODS`; ``--method_options``
(``key=value,key=value``) passes the method's own knobs, typed by the
builder's defaults. Every method runs through the same pipeline
(``common/pipeline.py``): full precision, then phase 1 with
:attr:`MethodSetup.optimizer` (plus :attr:`MethodSetup.regularizer` in the
loss), then phase 2 with the same optimizer after
``ec2t.set_phase(opt_state, 1)`` (EC2T: assignment frozen; Faraone et al.:
prune and retrain; TWN, TTQ, STTN: one phase, so phase 2 simply trains on).

Add a method with :func:`register`::

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
  """
  optimizer: optax.GradientTransformation
  regularizer: Callable[[Any], Any] | None = None
  per_filter: bool = False
  phase_starts_are_results: bool = True


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
  try:
    return METHODS[config.method].builder(config, options, selection)
  except ValueError as error:  # a knob out of range: name it as the user typed it
    raise UserError(f"--method={config.method} --method_options: {error}") from None


def _inner(config) -> optax.GradientTransformation:
  """The inner optimizer every chain-form method shares: L2 + Adam(learning_rate)."""
  return optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.adam(config.learning_rate))


@register("ec2t", description="EC2T (--ec2t_mode, --gamma, --init_scale, learning rates)")
def _ec2t(config, options, selection) -> MethodSetup:
  """EC2T. ``reference``: ``ec2t.reference_optimizer``, the paper's three Adams
  (non-ternary params: ``learning_rate`` with L2 ``weight_decay``; latent weights:
  ``latent_learning_rate``; centroids: ``centroid_learning_rate``), constant rates.
  ``chain``: ``optax.chain(add_decayed_weights, adam, ternarize_transform)``, Adam's
  ``learning_rate`` decayed to 0 by a cosine over ``config.ec2t_steps`` (both
  phases; constant when 0). Both use ``config.sustain``.
  """
  del options
  if config.ec2t_mode == "reference":
    return MethodSetup(ec2t.reference_optimizer(
        gamma=config.gamma, init_scale=config.init_scale, learning_rate=config.learning_rate,
        weight_decay=config.weight_decay, latent_learning_rate=config.latent_learning_rate,
        centroid_learning_rate=config.centroid_learning_rate, sustain=config.sustain,
        selection=selection))
  if config.ec2t_mode == "chain":
    learning_rate = (optax.cosine_decay_schedule(config.learning_rate, config.ec2t_steps)
                     if config.ec2t_steps else config.learning_rate)
    inner = optax.chain(optax.add_decayed_weights(config.weight_decay),
                        optax.adam(learning_rate))
    return MethodSetup(optax.chain(inner, ec2t.ternarize_transform(
        gamma=config.gamma, init_scale=config.init_scale, sustain=config.sustain,
        selection=selection)))
  raise UserError(f"--ec2t_mode must be 'reference' or 'chain', got {config.ec2t_mode!r}")


@register("twn", {"threshold": "layer"}, description="TWN: threshold=layer|filter")
def _twn(config, options, selection) -> MethodSetup:
  return MethodSetup(optax.chain(_inner(config),
                                 ec2t.twn(options["threshold"], selection=selection)),
                     per_filter=options["threshold"] == "filter")


@register("ttq", {"threshold": 0.05, "sparsity": None, "init_scale": None},
          description="TTQ: threshold=t, or sparsity=r; init_scale=None (fit) or 1.0 (paper)")
def _ttq(config, options, selection) -> MethodSetup:
  as_float = lambda v: None if v is None else float(v)
  return MethodSetup(optax.chain(_inner(config), ec2t.ttq(
      options["threshold"], sparsity=as_float(options["sparsity"]),
      init_scale=as_float(options["init_scale"]), selection=selection)))


@register("sttn", {"init_factor": 0.7}, description="STTN: init_factor (initial threshold factor)")
def _sttn(config, options, selection) -> MethodSetup:
  return MethodSetup(optax.chain(_inner(config),
                                 ec2t.sttn(options["init_factor"], selection=selection)),
                     per_filter=True)


@register("faraone", {"strength": 1.0, "l2": 0.0, "factor": 0.7, "temperature": 0.25},
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
