"""Incremental Network Quantization (Zhou et al., ICLR 2017): the pure functions.

Examples build their model, params or optimizer state with the fixture
:func:`ec2t_jax.models.small_cnn_example`.

Each layer gets a power-of-two codebook from its largest magnitude
``s = max|W|``::

    n1 = floor(log2(4 s / 3))          n2 = n1 + 1 - 2^(b-1) / 2
    P  = {0} U {+-2^n : n2 <= n <= n1}

``b = 2`` gives ``{0, +-2^n1}`` (ternary), ``b = 5`` sixteen non-zero values.
A weight is quantized to the nearest element of ``P`` (the paper's
thresholds at the midpoints ``3 * 2^(n-2)`` between neighbouring powers, and
``2^(n2-1)`` to zero, are exactly nearest-value rounding). The ``b - 1``
non-zero bits hold sign and exponent; the zero takes the remaining code.

Training freezes the largest-magnitude weights first, by accumulated
portions (``0.3, 0.6, 0.8, 1.0``, the official ``run.py``; the paper's 5-bit
schedule was ``0.5, 0.75, 0.875, 1.0``); :func:`inq_frozen_mask` grows the
frozen set to the next portion, choosing the largest of the still free
weights. Each official stage is a fresh run of the solver (SGD, momentum
0.9, learning rate 0.003 times 0.2 every 15k of 63k iterations, weight decay
5e-4): :func:`official_stage_optimizer` is that solver scaled to a stage's
length, for :func:`~ec2t_jax.restart_on_stage`.

Example:
  >>> import jax.numpy as jnp
  >>> from ec2t_jax import inq_quantize
  >>> w = jnp.array([0.9, -0.05, 0.3, -0.6, 0.02, 0.1])
  >>> inq_quantize(w, bits=3)
  Array([ 1. ,  0. ,  0.5, -0.5,  0. ,  0. ], dtype=float32)
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from ec2t_jax._src import core
from ec2t_jax._src.core import segments as segments_lib
from ec2t_jax._src.core import selection as selection_lib
from ec2t_jax._src.methods._support import common
from ec2t_jax._src.methods._support import grids
from ec2t_jax._src.methods._support import registry

MIN_BITS = 2
MAX_BITS = 8


def check_bits(bits, name: str = "bits") -> int:
  """Validates a bit width in ``[2, 8]`` (2 = ternary); returns it as ``int``."""
  if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
    raise ValueError(f"{name} must be an integer in [{MIN_BITS}, {MAX_BITS}] "
                     f"(2 = ternary), got {bits!r}")
  return bits


def check_portions(portions: Sequence[float], name: str = "portions") -> tuple[float, ...]:
  """Validates accumulated portions: strictly increasing in ``(0, 1]``, ending at 1."""
  try:
    values = tuple(float(p) for p in portions)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a sequence of numbers, got {portions!r}") from None
  if not values:
    raise ValueError(f"{name} must not be empty")
  if any(not 0.0 < p <= 1.0 for p in values):
    raise ValueError(f"{name} must lie in (0, 1], got {portions!r}")
  if any(b <= a for a, b in zip(values, values[1:])):
    raise ValueError(f"{name} must be strictly increasing, got {portions!r}")
  if values[-1] != 1.0:
    raise ValueError(f"{name} must end at 1.0 (every weight quantized), got {portions!r}")
  return values


def num_magnitudes(bits: int) -> int:
  """Number of non-zero magnitudes ``2^(b-1) / 2`` (at least 1)."""
  return max(1, 2 ** (bits - 1) // 2)


def floor_log2_four_thirds(magnitude: jax.Array) -> jax.Array:
  """The exact ``n = floor(log2(4 m / 3))``: ``3 * 2^(n-2) <= m < 3 * 2^(n-1)``.

  ``frexp`` of the rounded product gives a candidate; one comparison with
  the exact thresholds (3 times a power of two) corrects it by one either way.
  """
  magnitude = jnp.asarray(magnitude)
  _, e = jnp.frexp(magnitude * (4.0 / 3.0))  # = f 2^e with f in [0.5, 1)
  n = e.astype(jnp.int32) - 1
  three = jnp.asarray(3.0, magnitude.dtype)
  n = jnp.where(magnitude >= jnp.ldexp(three, n - 1), n + 1, n)
  return jnp.where(magnitude < jnp.ldexp(three, n - 2), n - 1, n)


def inq_exponents(max_abs: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
  """``(n1, n2)`` of the codebook for a layer whose largest magnitude is ``max_abs``.

  Args:
    max_abs: ``max|W|`` (positive scalar).
    bits: bit width ``b >= 2``.

  Returns:
    ``(n1, n2)`` as int32 scalars, ``n1 = floor(log2(4 max_abs / 3))`` exactly.
  """
  n1 = floor_log2_four_thirds(jnp.asarray(max_abs, jnp.float32))
  return n1, n1 + 1 - num_magnitudes(bits)


def inq_codebook(max_abs: jax.Array, bits: int, dtype=jnp.float32) -> jax.Array:
  """The sorted codebook ``{-2^n1, ..., -2^n2, 0, 2^n2, ..., 2^n1}``.

  Example:
    >>> from ec2t_jax import inq_codebook
    >>> inq_codebook(0.9, bits=3)
    Array([-1. , -0.5,  0. ,  0.5,  1. ], dtype=float32)
  """
  n1, _ = inq_exponents(max_abs, bits)
  powers = jnp.ldexp(jnp.ones((), dtype), n1 - jnp.arange(num_magnitudes(bits))[::-1])
  return jnp.concatenate([-powers[::-1], jnp.zeros((1,), dtype), powers])


def nearest_power_of_two(weights: jax.Array, n1: jax.Array, n2: jax.Array) -> jax.Array:
  """Rounds each weight to the nearest of ``{0, +-2^n : n2 <= n <= n1}``.

  Ties go to the larger magnitude (the paper's ``<=`` on the lower
  threshold). Exact: the thresholds ``3 * 2^(n-2)`` and ``2^(n2-1)`` are
  compared in floating point without rounding.
  """
  magnitude = jnp.abs(weights)
  n = jnp.clip(floor_log2_four_thirds(magnitude), n2, n1)
  one = jnp.ones((), weights.dtype)
  signed = jnp.where(weights < 0, -jnp.ldexp(one, n), jnp.ldexp(one, n))
  # +0.0 (never -0.0) for zeros: the exported ternary leaf has one zero pattern.
  return jnp.where(magnitude < jnp.ldexp(one, n2 - 1), 0.0, signed).astype(weights.dtype)


def inq_quantize(weights: jax.Array, bits: int) -> jax.Array:
  """Quantizes a layer to its INQ codebook (nearest value).

  Args:
    weights: the layer's weights (any shape, floating).
    bits: bit width in ``[2, 8]``.

  Returns:
    An array of the same shape and dtype on the codebook.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import inq_quantize
    >>> w = jnp.array([0.9, -0.05, 0.3, -0.6, 0.02, 0.1])
    >>> inq_quantize(w, bits=2)
    Array([ 1.,  0.,  0., -1.,  0.,  0.], dtype=float32)
  """
  check_bits(bits)
  n1, n2 = inq_exponents(jnp.max(jnp.abs(weights)), bits)
  return nearest_power_of_two(weights, n1, n2)


def inq_frozen_mask(weights: jax.Array, frozen: jax.Array, portion,
                    segments: segments_lib.Segments = segments_lib.LeafSegments()) -> jax.Array:
  """Grows the frozen set to ``round(portion * n)`` weights, largest ``|w|`` first.

  Weights already frozen stay frozen; the new ones are the largest
  magnitudes among the free weights (ties: lower flat index first).

  Args:
    weights: the layer's current (latent) weights.
    frozen: boolean mask of the weights frozen so far.
    portion: accumulated portion in ``[0, 1]`` (may be traced; one per layer with
      ``segments``).
    segments: a flat buffer's segments (each layer ranked in its own span), by default
      the whole of ``weights`` is one layer.

  Returns:
    A boolean mask with ``max(round(portion * n), count(frozen))`` entries set (per layer).

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax._src.methods.inq import inq_frozen_mask  # internal
    >>> inq_frozen_mask(jnp.array([0.1, -0.9, 0.5, 0.2]),
    ...                 jnp.array([False, False, False, True]), 0.5)
    Array([False,  True, False,  True], dtype=bool)
  """
  count = segments.numel(weights)
  target = jnp.round(jnp.asarray(portion, jnp.float32) * count).astype(jnp.int32)
  score = jnp.where(frozen, jnp.inf, jnp.abs(weights).astype(jnp.float32))
  return (segments.descending_rank(score) < segments.expand(target)) | frozen


# ----------------------------------------------------------- one leaf's state


class InqLeaf(NamedTuple):
  """One layer under INQ.

  Attributes:
    latent: float32 full-precision weights (the free ones retrain).
    frozen: bool mask of the quantized, frozen weights.
    values: the frozen weights' codebook values (0 where free).
    n1: int32 top exponent of the layer's codebook, fixed when the layer was
      first quantized (from the pretrained ``max|W|``).
    stage: int32 index of the portion applied so far.
    steps: int32 number of steps taken (drives ``steps_per_stage``).
    latent_max: float32 ``max |latent|`` of the layer, the reference of the free weights'
      grid (kept with the latent weights, so that a flat buffer's value needs no reduction).
  """
  latent: jax.Array
  frozen: jax.Array
  values: jax.Array
  n1: jax.Array
  stage: jax.Array
  steps: jax.Array
  latent_max: jax.Array

  def value(self, dtype) -> jax.Array:
    """Codebook values where frozen, latent weights (snapped for exact landing) elsewhere."""
    free = core.snap_to_grid(self.latent, dtype, self.latent_max)
    return jnp.where(self.frozen, self.values, free).astype(dtype)

  def describe(self) -> dict:
    return {"method": "INQ", "mode": "power-of-two", "frozen": jnp.mean(self.frozen),
            "stage": self.stage, "n1": self.n1}


def inq_init_leaf(param: jax.Array, bits: int, first_portion) -> InqLeaf:
  """Quantizes and freezes the first portion of a pretrained layer."""
  latent = jnp.asarray(param, jnp.float32)
  n1, n2 = inq_exponents(jnp.max(jnp.abs(latent)), bits)
  frozen = inq_frozen_mask(latent, jnp.zeros(latent.shape, bool), first_portion)
  values = jnp.where(frozen, nearest_power_of_two(latent, n1, n2), 0.0)
  zero = jnp.zeros((), jnp.int32)
  return InqLeaf(latent, frozen, values, n1, zero, zero, jnp.max(jnp.abs(latent)))


def inq_advance(leaf: InqLeaf, stage, portions: jax.Array, bits: int,
                segments: segments_lib.Segments = segments_lib.LeafSegments()) -> InqLeaf:
  """Moves ``leaf`` to ``stage`` (no-op unless it is later): freezes up to ``portions[stage]``.

  With ``segments`` (a flat buffer) ``stage`` and the leaf's layer fields hold one value per
  layer, and each layer moves on its own. The ranking (a sort of the layer, or of the whole
  buffer) runs only at a step where some layer moves (``lax.cond``; under ``vmap`` both
  branches run, as a ``select``).
  """
  stage = jnp.clip(jnp.asarray(stage, jnp.int32), 0, portions.shape[0] - 1)
  later = stage > leaf.stage

  def freeze(leaf: InqLeaf) -> InqLeaf:
    frozen = inq_frozen_mask(leaf.latent, leaf.frozen, portions[stage], segments)
    frozen = jnp.where(segments.expand(later), frozen, leaf.frozen)
    n1 = segments.expand(leaf.n1)
    newly = frozen & ~leaf.frozen
    values = jnp.where(newly, nearest_power_of_two(leaf.latent, n1,
                                                   n1 + 1 - num_magnitudes(bits)), leaf.values)
    return leaf._replace(frozen=frozen, values=values)

  leaf = jax.lax.cond(jnp.any(later), freeze, lambda leaf: leaf, leaf)
  return leaf._replace(stage=jnp.maximum(stage, leaf.stage))


# Shared with SLQ/MLQ; they live in ``methods/common.py`` (kept here by name).
masked_step = common.masked_step
scheduled_stage = common.scheduled_stage


# ------------------------------------------------------------ the transformation


class InqHyper(NamedTuple):
  """INQ's numeric hyperparameter: ``steps_per_stage`` (0 = stages by phase only)."""
  steps_per_stage: Any = 0


HYPER_RANGES = {"steps_per_stage": core.Range(0.0)}


OFFICIAL_PORTIONS = (0.3, 0.6, 0.8, 1.0)
# The official solver.prototxt: base_lr 0.003, step policy gamma 0.2 every 15000 of 63000
# iterations, momentum 0.9, weight_decay 5e-4.
OFFICIAL_LEARNING_RATE = 0.003
OFFICIAL_DECAY = 0.2
OFFICIAL_STEP_FRACTION = 15000 / 63000
OFFICIAL_MOMENTUM = 0.9
OFFICIAL_WEIGHT_DECAY = 5e-4


def official_stage_schedule(steps_per_stage: int, learning_rate: float = OFFICIAL_LEARNING_RATE
                            ) -> optax.Schedule:
  """The official solver's step schedule scaled to one stage of ``steps_per_stage`` steps.

  ``lr(t) = learning_rate * 0.2^floor(t / s)`` with ``s = round(15/63 *
  steps_per_stage)``: the solver's ``lr_policy: "step"`` (``stepsize``
  15000 of ``max_iter`` 63000), so a stage ends at ``0.2^4`` of its start.

  Raises:
    ValueError: ``steps_per_stage`` not a positive integer (named).

  Example:
    >>> from ec2t_jax import official_stage_schedule
    >>> sched = official_stage_schedule(63)
    >>> [round(float(sched(t)), 7) for t in (0, 14, 15, 30, 62)]
    [0.003, 0.003, 0.0006, 0.00012, 4.8e-06]
  """
  if (isinstance(steps_per_stage, bool) or not isinstance(steps_per_stage, int)
      or steps_per_stage < 1):
    raise ValueError(f"steps_per_stage must be a positive integer (the stage's length, so "
                     f"that the schedule can restart), got {steps_per_stage!r}")
  steps = steps_per_stage
  every = max(1, round(OFFICIAL_STEP_FRACTION * steps))
  return optax.exponential_decay(learning_rate, transition_steps=every,
                                 decay_rate=OFFICIAL_DECAY, staircase=True)


def official_stage_optimizer(steps_per_stage: int, learning_rate: float = OFFICIAL_LEARNING_RATE
                             ) -> optax.GradientTransformation:
  """The official INQ solver for one stage: L2 5e-4, SGD with momentum 0.9 on the step schedule.

  Wrap the method with :func:`~ec2t_jax.restart_on_stage` so that every
  stage starts the solver afresh (momentum and schedule), as each official
  stage is a new Caffe run from the previous stage's model:

    >>> import ec2t_jax as ec2t
    >>> tx = ec2t.restart_on_stage(ec2t.official_stage_optimizer(1000),
    ...                            ec2t.inq(steps_per_stage=1000))

  (Caffe adds ``lr * g`` to its momentum buffer, optax ``g`` before scaling:
  the two differ only in the steps right after a learning-rate drop.)
  """
  return optax.chain(optax.add_decayed_weights(OFFICIAL_WEIGHT_DECAY),
                     optax.sgd(official_stage_schedule(steps_per_stage, learning_rate),
                               momentum=OFFICIAL_MOMENTUM))


def inq(bits: int = 5, portions: Sequence[float] = OFFICIAL_PORTIONS, *,
        steps_per_stage: int = 0, selection: selection_lib.SelectionLike = None
        ) -> optax.GradientTransformation:
  """Incremental Network Quantization as the last transformation of an optax chain.

  At ``init`` each selected layer gets its codebook (module docstring) from
  the pretrained ``max|W|`` and its largest ``portions[0]`` weights are
  quantized and frozen. Stage ``s`` freezes the largest free weights up to
  ``portions[s]``; the free ones retrain: the incoming update ``u`` (what the
  inner optimizer proposes) moves them and is masked to zero on frozen ones.
  The last portion is 1, so at the last stage every weight is on the codebook.

  Stages advance with the phase (``ec2t.set_phase(opt_state, s)``; the
  paper also resets the learning rate there) or, with ``steps_per_stage =
  N > 0``, every ``N`` updates as well (stage ``max(phase, steps // N)``).

  Args:
    bits: bit width in ``[2, 8]``; 2 = ternary ``{0, +-2^n1}``, 5 = the paper's.
    portions: accumulated portions, strictly increasing, ending at 1
      (the official ``run.py``'s ``(0.3, 0.6, 0.8, 1.0)`` by default; the
      paper's 5-bit schedule was ``(0.5, 0.75, 0.875, 1.0)``, its ternary
      ResNet-18 ``(0.2, 0.4, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.975, 1.0)``).
    steps_per_stage: advance a stage every this many updates (0: by phase only).
    selection: which leaves (``None`` = the paper's rule; the INQ paper
      quantizes all layers: pass ``ec2t.Selection(default=lambda p, l: l.ndim >= 2)``
      or rules).

  Returns:
    An ``optax.GradientTransformation`` with state
    :class:`~ec2t_jax.QuantizerState` whose leaves are :class:`InqLeaf`.

  Example:
    >>> import optax
    >>> from ec2t_jax import inq, quantized_params
    >>> from ec2t_jax.models import small_cnn_example
    >>> params = small_cnn_example().params  # a small CNN (fixture)
    >>> tx = optax.chain(optax.adam(1e-3), inq(bits=5, steps_per_stage=500))
    >>> opt_state = tx.init(params)
    >>> params = quantized_params(params, opt_state)  # first portion on the codebook
  """
  return quantizer(bits, portions, steps_per_stage=steps_per_stage,
                   selection=selection).transform()


def quantizer(bits: int = 5, portions: Sequence[float] = OFFICIAL_PORTIONS, *,
              steps_per_stage: int = 0, selection: selection_lib.SelectionLike = None
              ) -> core.Quantizer:
  """INQ as a :class:`~core.Quantizer` (training: :func:`inq`; one-shot: ``.instant``)."""
  bits = check_bits(bits)
  portions = check_portions(portions)
  table = jnp.asarray(portions, jnp.float32)

  def init_leaf(param, ctx, hyper):
    del ctx, hyper
    return inq_init_leaf(param, bits, portions[0])

  def step_leaf(update, leaf, ctx, hyper, phase):
    segments = segments_lib.of(ctx)
    stage = common.scheduled_stage(phase, leaf.steps, hyper.steps_per_stage)
    leaf = inq_advance(leaf, stage, table, bits, segments)
    leaf = common.masked_step(update, leaf, segments)
    return leaf._replace(steps=leaf.steps + 1)

  return core.Quantizer(core.Method("inq", init_leaf, step_leaf, flat=True),
                        InqHyper(steps_per_stage), HYPER_RANGES, selection)


def staged_knobs(portions_sweep, bits_sweep=(2, 3, 5)) -> dict:
  """The knobs of a staged method: ``bits``, ``portions``, ``steps_per_stage``."""
  return {"bits": registry.Knob(core.Range(MIN_BITS, MAX_BITS), tuple(bits_sweep),
                                doc="bit width (2 = ternary)"),
          "portions": registry.Knob(None, tuple(portions_sweep),
                                    doc="accumulated portions, ending at 1"),
          "steps_per_stage": registry.Knob(core.Range(0.0), (0, 100), traced=True,
                                           doc="advance a stage every this many updates")}


def power_of_two_grid(options) -> grids.Grid:
  """INQ's grid: 0 and ``2 num_magnitudes(bits)`` signed powers of two per layer."""
  bits = options["bits"]
  return grids.Grid(2 * num_magnitudes(bits) + 1, leaf_checks=(grids.zero_or_power_of_two,),
                    ternary=bits == 2)


registry.register_method(registry.MethodSpec(
    name="inq", kind="staged", quantizer=quantizer, transform=inq,
    knobs=staged_knobs((OFFICIAL_PORTIONS, (0.5, 0.75, 0.875, 1.0))), grid=power_of_two_grid,
    last_phase=lambda o, layers: len(o["portions"]) - 1,
    description="Incremental Network Quantization (Zhou et al. 2017)"))
