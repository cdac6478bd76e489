r"""Size budgets: train to a size, not to a knob.

A :class:`Budget` names one target for the quantized model: a rate in
bits/weight, a file size in bytes (what :func:`ec2t_jax.export.save` writes
for the whole params tree) or a sparsity. During training a controller
drives one of the method's knobs (EC2T: a multiplier ``m`` on every selected
layer's lambda, TWN: its threshold factor) so that the measured size of the
current assignment meets the target. These are the pure pieces; the
transformation (:func:`~ec2t_jax._src.core.transform.quantize_transform`)
composes them.

**Rate of an assignment.** For a ternary layer ``l`` of ``n_l`` weights with
cluster frequencies ``P_c`` (``c`` in negative, zero, positive), the rate is
its zeroth-order entropy

.. math:: H_l = -\sum_c P_c \log_2 P_c,

and the rate of the model is the numel-weighted mean over the selected
layers, :math:`R = \sum_l n_l H_l / \sum_l n_l` bits/weight (the total that
:func:`~ec2t_jax.summary` prints). Its sparsity is
:math:`S = \sum_l n_l P_{0,l} / \sum_l n_l`.

**Bytes.** The export's context coder stores a ternary layer in about
``coding_ratio x n_l x H_l`` bits plus its two centroids: 0.90-0.92 on the
official ResNet-20 checkpoints' 3x3 convs (``benchmarks/RESULTS_export.md``),
1.00-1.03 on LeNet-5's dense layers (no kernel neighbours to exploit;
``benchmarks/RESULTS_budget.md``), hence the default ``rho = 1.0``, which
errs on the large side for conv nets (pass ``coding_ratio=0.9`` there). The
other leaves are stored as raw bytes at most (float32/float64 ones as 2-byte
float16 when the file is written with ``float16=True`` and the budget says
so). So a file of ``B`` bytes has

.. math:: B \approx F + \frac{\rho}{8} \sum_l n_l H_l
          = F + \frac{\rho N}{8} R,

with ``F`` = :func:`fixed_bytes_bound` (file header and checksum, per-leaf header
records, centroids, every full-precision leaf at its raw size; or ``F``
measured by packing those leaves, ``Budget(fixed_bytes=...)``) and
``N = sum_l n_l``; a bytes target ``B*`` is the rate target
:math:`R^* = 8 (B^* - F) / (\rho N)` (:func:`bytes_to_rate`). The smallest
reachable file is ``F`` (every selected weight zero).

**Controller.** The knob ``m`` is updated every step by dual ascent on the
error ``e`` between the measured size and the target (the integral, "I",
controller of the Lagrange multiplier of the size constraint):

.. math:: m_{t+1} = \mathrm{clip}(m_t + \eta\, e_t,\ m_{lo},\ m_{hi}),
          \qquad e_t = R_t - R^*_t \ \text{(rates)}, \quad
          e_t = S^*_t - S_t \ \text{(sparsity)},

positive when the model is too large, so a larger ``m`` (more zeros) answers
it. **Ramp**: the target moves linearly from the size of the first
assignment ``R_0`` to the target over ``ramp_steps`` updates,
:math:`R^*_t = R_0 + (R^* - R_0) \min(1, t / T_{ramp})`, so the first steps do
not destroy accuracy.

**Unreachable targets.** The knob has a range (EC2T's ``m`` in ``[0, 1]``);
a target beyond what that range can give pins ``m`` at a bound while the
size stays off target. An update *saturates* when, after the ramp
(``t >= T_ramp``), the new ``m`` sits at the bound that cannot help
(``m = m_hi`` while the model is too large, ``m = m_lo`` while it is too
small) and the size misses the target by more than
:data:`MISS_TOLERANCE` of it, :math:`|size_t - target_t| > 0.01\,|target_t|`.
:attr:`BudgetState.saturated_steps` counts consecutive saturated updates
(reset by any other update, held while frozen or skipped), and
:attr:`BudgetState.unreachable` is ``saturated_steps >=``
:data:`UNREACHABLE_AFTER_STEPS` (50): ``ec2t.summary`` then prints
"target 0.999 not reachable: reached 0.977 with the multiplier at its bound
(1) for 57 steps" and warns on the host.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ec2t_jax._src import container_layout
from ec2t_jax._src.core.hyper import is_concrete
from ec2t_jax._src.core.protocol import StackedLeaf

MAX_BITS_PER_WEIGHT = math.log2(3)
KINDS = ("bits_per_weight", "bytes", "sparsity")
# Measured on the export (benchmarks/RESULTS_budget.md, "bytes model"):
# coded bytes of a ternary layer over n H / 8 (LeNet-5: 1.00-1.03).
DEFAULT_CODING_RATIO = 1.0
# The container's sizes (owned by the export's format, read from the layout module).
FILE_OVERHEAD_BYTES = container_layout.FILE_OVERHEAD_BYTES
HEADER_BYTES_PER_LEAF = container_layout.HEADER_BYTES_PER_LEAF
TERNARY_STREAM_EXTRA_BYTES = container_layout.TERNARY_STREAM_EXTRA_BYTES
# The step counter is int32: a longer ramp could never end.
MAX_RAMP_STEPS = 2**31 - 1
# Unreachable target: the size misses the target by more than this fraction
# of it, with the knob at its bound, for this many consecutive updates.
MISS_TOLERANCE = 0.01
UNREACHABLE_AFTER_STEPS = 50
_MAX_COUNT = 2**30  # saturated_steps stops counting here (no int32 overflow)


@dataclasses.dataclass(frozen=True)
class Budget:
  """A size target for a quantizing transformation: exactly one of three.

  Args:
    bits_per_weight: rate of the selected layers' assignments, the
      numel-weighted zeroth-order entropy, in ``(0, log2 3]``.
    bytes: size of the file :func:`ec2t_jax.export.save` writes for the whole
      params tree (full-precision leaves included), ``> 0`` (checked against
      the smallest reachable size at ``init``).
    sparsity: fraction of zeros among the selected weights, in ``(0, 1)``.
    ramp_steps: the target moves in linearly from the first assignment's size
      over this many updates (0: at once).
    gain: the controller's step ``eta`` (None: the method's default; EC2T
      0.05 per bit of error).
    coding_ratio: bytes budgets only: the export's coded bits of a ternary
      layer over ``numel x H0`` (1.0; measured 1.00-1.03 on LeNet-5's dense
      layers, 0.90-0.92 on ResNet-20's convs).
    float16: bytes budgets only: the file will be written with
      ``ec2t.export.save(..., float16=True)``, so the float32/float64 leaves
      kept in full precision count 2 bytes per value.
    fixed_bytes: bytes budgets only: ``F`` measured on the params
      (:func:`ec2t_jax.export.fixed_bytes`: the full-precision leaves as the
      export really stores them, compressed) instead of the model's bound
      (those leaves at their raw size), which is loose when they are a large
      part of the file (a GPT's embeddings: 11% over).

  Raises:
    ValueError: for every bad knob, naming it and the value: no target or
      more than one; a number knob given a bool, a string or anything but a
      real number; a target <= 0, NaN or infinite, ``bits_per_weight >
      log2 3``, ``sparsity >= 1`` (with a hint when it looks like a
      percentage), a ``bytes`` / ``fixed_bytes`` beyond float32; a
      ``ramp_steps`` that is not an integer in ``[0, 2^31 - 1]``; ``gain <=
      0``; a ``coding_ratio`` outside ``(0, 2]``; a ``float16`` that is not a
      bool; or ``float16`` / ``fixed_bytes`` without a bytes target
      (``fixed_bytes`` must be > 0).

  Example:
    >>> from ec2t_jax import Budget
    >>> Budget(bits_per_weight=0.6).kind, Budget(sparsity=0.9).target
    ('bits_per_weight', 0.9)
  """
  bits_per_weight: Optional[float] = None
  bytes: Optional[float] = None
  sparsity: Optional[float] = None
  ramp_steps: int = 0
  gain: Optional[float] = None
  coding_ratio: float = DEFAULT_CODING_RATIO
  float16: bool = False
  fixed_bytes: Optional[float] = None

  def __post_init__(self):
    given = [k for k in KINDS if getattr(self, k) is not None]
    if len(given) != 1:
      raise ValueError("Budget takes exactly one of bits_per_weight, bytes, sparsity; got "
                       + (", ".join(f"{k}={getattr(self, k)!r}" for k in given) or "none"))
    check_target(self.kind, self.target)
    self._check_controller()
    self._check_bytes_options()

  def _check_controller(self) -> None:
    ramp = self.ramp_steps
    if (isinstance(ramp, (bool, np.bool_)) or not isinstance(ramp, (int, np.integer))
        or not 0 <= ramp <= MAX_RAMP_STEPS):
      raise ValueError(f"Budget ramp_steps must be an integer in [0, {MAX_RAMP_STEPS}] (the "
                       f"step counter is int32), got {_shown(ramp)}")
    if self.gain is not None:
      gain = _real("gain", self.gain)
      if gain is not None and not (math.isfinite(gain) and gain > 0):
        raise ValueError(f"Budget gain must be finite and > 0, got {_shown(self.gain)}")

  def _check_bytes_options(self) -> None:
    ratio = _real("coding_ratio", self.coding_ratio)
    if ratio is not None and not (math.isfinite(ratio) and 0 < ratio <= 2):
      raise ValueError(f"Budget coding_ratio must be in (0, 2], got {_shown(self.coding_ratio)}")
    if not isinstance(self.float16, (bool, np.bool_)) or (self.float16
                                                           and self.kind != "bytes"):
      raise ValueError(f"Budget float16 (the export's float16 option) is a bool for a bytes "
                       f"budget, got float16={_shown(self.float16)} with {self.kind}")
    if self.fixed_bytes is not None:
      fixed = _real("fixed_bytes", self.fixed_bytes)
      if fixed is not None and not (self.kind == "bytes" and _finite32(fixed) and fixed > 0):
        raise ValueError(f"Budget fixed_bytes must be finite and > 0, for a bytes budget; got "
                         f"fixed_bytes={_shown(self.fixed_bytes)} with {self.kind}")

  @property
  def kind(self) -> str:
    """``"bits_per_weight"``, ``"bytes"`` or ``"sparsity"``."""
    return next(k for k in KINDS if getattr(self, k) is not None)

  @property
  def target(self):
    """The target's value."""
    return getattr(self, self.kind)


def _shown(value) -> str:
  return f"{value!r:.80} ({type(value).__name__})"


def _finite32(x: float) -> bool:
  """Finite, and finite as float32 (the controller's state)."""
  return math.isfinite(x) and abs(x) <= float(np.finfo(np.float32).max)


def _real(name: str, value) -> Optional[float]:
  """A number knob's value as a float (``None`` when traced), or ``ValueError``.

  Real numbers are Python ints and floats, numpy integer / floating scalars
  and one-element real arrays; bools, strings, complex numbers and anything
  else are refused.
  """
  if isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    dtype = np.dtype(value.dtype)
    if np.size(value) == 1 and (dtype.kind in "iuf" or dtype.name == "bfloat16"):
      return float(np.asarray(value, np.float64).reshape(()))
  elif isinstance(value, numbers.Real) and not isinstance(value, bool):
    try:
      return float(value)
    except OverflowError:  # an int beyond float64
      return math.inf
  raise ValueError(f"Budget {name} must be a real number, got {_shown(value)}")


def check_target(kind: str, value) -> None:
  """Raises ``ValueError`` for a concrete target that is not a real number in its range."""
  v = _real(kind, value)
  if v is None:
    return
  if not (_finite32(v) and v > 0):
    raise ValueError(f"Budget {kind} must be finite and > 0, got {_shown(value)}")
  if kind == "bits_per_weight" and v > MAX_BITS_PER_WEIGHT:
    raise ValueError(f"Budget bits_per_weight must be at most log2(3) = "
                     f"{MAX_BITS_PER_WEIGHT:.4f} (a ternary weight), got {_shown(value)}")
  if kind == "sparsity" and v >= 1:
    hint = (f"; sparsity is a fraction of zeros in (0, 1): for {v:g}% pass "
            f"sparsity={v / 100:g}" if 1 < v < 100 else "")
    raise ValueError(f"Budget sparsity must be below 1, got {_shown(value)}{hint}")


def target_is_valid(kind: str, value, smallest_bytes: float = 0.0) -> jax.Array:
  """Whether a (traced) target is finite and in range, as a bool scalar."""
  v = jnp.asarray(value, jnp.float32)
  ok = jnp.isfinite(v) & (v > 0)
  if kind == "bits_per_weight":
    ok &= v <= MAX_BITS_PER_WEIGHT
  elif kind == "sparsity":
    ok &= v < 1
  else:
    ok &= v >= smallest_bytes
  return ok


class BudgetState(NamedTuple):
  """The controller's state (in :attr:`QuantizerState.budget`), in the budget's units.

  Attributes:
    multiplier: the knob ``m`` the next step uses (float32).
    kind: index of the budget's kind in :data:`KINDS` (int32).
    start: size of the first assignment, where the ramp starts (bits/weight,
      predicted bytes or sparsity).
    measured: size of the last assignment, same units.
    target: the (ramped) target of the last update, same units.
    saturated_steps: consecutive updates with the multiplier at the bound that
      cannot help and the target missed (int32; module docstring,
      "Unreachable targets").
  """
  multiplier: jax.Array
  kind: jax.Array
  start: jax.Array
  measured: jax.Array
  target: jax.Array
  saturated_steps: jax.Array

  @property
  def unreachable(self) -> jax.Array:
    """Whether the target is not reachable: :data:`UNREACHABLE_AFTER_STEPS` or more
    consecutive saturated updates (a bool scalar)."""
    return jnp.asarray(self.saturated_steps) >= UNREACHABLE_AFTER_STEPS

  def describe(self) -> dict:
    """``{"kind", "target", "reached", "multiplier", "saturated_steps", "unreachable"}``
    as Python values."""
    return {"kind": KINDS[int(self.kind)], "target": float(self.target),
            "reached": float(self.measured), "multiplier": float(self.multiplier),
            "saturated_steps": int(self.saturated_steps), "unreachable": bool(self.unreachable)}


def unreachable_message(described: dict) -> Optional[str]:
  """The line saying that a budget's target is not reachable, or ``None`` if it is.

  Args:
    described: :meth:`BudgetState.describe` (as in ``ec2t.summary(...).budget``).

  Example:
    >>> from ec2t_jax._src.core.budget import unreachable_message  # internal
    >>> unreachable_message({"kind": "sparsity", "target": 0.999, "reached": 0.977,
    ...                      "multiplier": 1.0, "saturated_steps": 57, "unreachable": True})
    'sparsity target 0.999 not reachable: reached 0.977 with the multiplier at its bound (1) for 57 steps; choose a target the method can reach on this model'
  """
  if not described or not described.get("unreachable"):
    return None
  fmt = ((lambda v: f"{v:,.0f} bytes") if described["kind"] == "bytes"
         else (lambda v: f"{v:.4g}"))
  return (f"{described['kind']} target {fmt(described['target'])} not reachable: reached "
          f"{fmt(described['reached'])} with the multiplier at its bound "
          f"({described['multiplier']:.4g}) for {described['saturated_steps']:,} steps; "
          "choose a target the method can reach on this model")


def next_saturated_steps(old, multiplier, error, measured, goal, low: float, high: float,
                         ramp_over, active) -> jax.Array:
  """The next :attr:`BudgetState.saturated_steps` (module docstring, "Unreachable targets").

  An update saturates when ``ramp_over``, the new ``multiplier`` sits at the
  bound that cannot help (``high`` with ``error > 0``: too large; ``low``
  with ``error < 0``: too small) and ``|measured - goal| >``
  :data:`MISS_TOLERANCE` ``|goal|``.

  Args:
    old: the count so far (int32).
    multiplier: the knob after this update (clipped to ``[low, high]``).
    error: :func:`size_error` of this update (positive: too large).
    measured, goal: the size and the (ramped) target, in the budget's units.
    low, high: the knob's range.
    ramp_over: bool scalar, the target is no longer ramping.
    active: bool scalar, the update moved the controller (neither frozen nor
      skipped); otherwise the count is kept.

  Returns:
    ``old + 1`` if saturated (at most ``2^30``), ``0`` if not, ``old`` if not
    ``active``; int32.

  Example:
    >>> from ec2t_jax._src.core.budget import next_saturated_steps  # internal
    >>> [int(next_saturated_steps(3, m, 0.02, 0.977, 0.999, 0.0, 1.0, True, True))
    ...  for m in (1.0, 0.9)]
    [4, 0]
  """
  measured = jnp.asarray(measured, jnp.float32)
  goal = jnp.asarray(goal, jnp.float32)
  m = jnp.asarray(multiplier, jnp.float32)
  at_bound = (m >= high) & (error > 0) | (m <= low) & (error < 0)
  missed = jnp.abs(measured - goal) > MISS_TOLERANCE * jnp.abs(goal)
  old = jnp.asarray(old, jnp.int32)
  new = jnp.where(at_bound & missed & ramp_over, jnp.minimum(old + 1, _MAX_COUNT), 0)
  return jnp.where(active, new, old).astype(jnp.int32)


def sign_counts(symbols) -> jax.Array:
  """``(n_negative, n_zero, n_positive)`` of an array, float32.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax._src.core.budget import sign_counts  # internal
    >>> sign_counts(jnp.array([-0.5, 0.0, 0.0, 2.0]))
    Array([1., 2., 1.], dtype=float32)
  """
  return _sign_counts(jnp.asarray(symbols))


def _add_pairs(x, y):
  return tuple(a + b for a, b in zip(x, y))


@jax.jit
def _sign_counts(symbols):
  # One variadic reduction (one pass); jitted so eager calls (init) compile once.
  s = jnp.sign(symbols.astype(jnp.float32))
  terms = ((s < 0).astype(jnp.float32), (s == 0).astype(jnp.float32),
           (s > 0).astype(jnp.float32))
  return jnp.stack(jax.lax.reduce(terms, (0.0,) * 3, _add_pairs, tuple(range(s.ndim))))


def entropy_bits(counts) -> jax.Array:
  """``n x H0`` in bits from cluster counts: ``-sum_c k_c log2(k_c / n)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax._src.core.budget import entropy_bits  # internal
    >>> entropy_bits(jnp.array([1.0, 2.0, 1.0]))  # 4 weights x 1.5 bits
    Array(6., dtype=float32)
  """
  k = jnp.asarray(counts, jnp.float32)
  n = jnp.sum(k)
  safe = jnp.where(k > 0, k, 1.0)
  return -jnp.sum(jnp.where(k > 0, k * jnp.log2(safe / jnp.maximum(n, 1.0)), 0.0))


def rate_and_sparsity(per_leaf_counts: Sequence) -> tuple[jax.Array, jax.Array]:
  """Numel-weighted rate (bits/weight) and sparsity over layers.

  Args:
    per_leaf_counts: per selected layer, its :func:`sign_counts`.

  Returns:
    :math:`(\\sum_l n_l H_l / N,\\ \\sum_l k_{0,l} / N)`.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax._src.core.budget import rate_and_sparsity  # internal
    >>> r, s = rate_and_sparsity([jnp.array([1.0, 2.0, 1.0]), jnp.array([0.0, 4.0, 0.0])])
    >>> float(r), float(s)
    (0.75, 0.75)
  """
  bits = sum(entropy_bits(c) for c in per_leaf_counts)
  total = sum(jnp.sum(c) for c in per_leaf_counts)
  zeros = sum(c[1] for c in per_leaf_counts)
  total = jnp.maximum(total, 1.0)
  return bits / total, zeros / total


def fixed_bytes_bound(unselected: Sequence[tuple[int, int]], selected: Sequence[int]) -> int:
  """An upper bound of ``F``, the bytes of an exported file that do not depend on the rate.

  Args:
    unselected: ``(numel, itemsize)`` of every leaf kept in full precision
      (counted at its raw size; the export may store it smaller).
    selected: ``numel`` of every selected (ternary) leaf; each costs its header
      record and :data:`TERNARY_STREAM_EXTRA_BYTES`.

  Returns:
    :data:`FILE_OVERHEAD_BYTES` + :data:`HEADER_BYTES_PER_LEAF` per leaf +
    the full-precision bytes + :data:`TERNARY_STREAM_EXTRA_BYTES` per
    selected leaf.

  Example:
    >>> from ec2t_jax._src.core.budget import fixed_bytes_bound  # internal
    >>> fixed_bytes_bound([(10, 4)], [100])  # 56 + 2 x 28 + 40 + 8
    160
  """
  leaves = len(unselected) + len(selected)
  return (FILE_OVERHEAD_BYTES + HEADER_BYTES_PER_LEAF * leaves
          + sum(n * size for n, size in unselected)
          + TERNARY_STREAM_EXTRA_BYTES * len(selected))


def bytes_to_rate(target_bytes, fixed: float, numel: int, coding_ratio: float):
  """The rate target (bits/weight) of a file size: ``8 (B - F) / (rho N)``.

  Example:
    >>> from ec2t_jax._src.core.budget import bytes_to_rate  # internal
    >>> bytes_to_rate(1000.0, 100.0, 12000, 0.9)
    0.6666666666666666
  """
  return 8.0 * (target_bytes - fixed) / (coding_ratio * numel)


def rate_to_bytes(rate, fixed: float, numel: int, coding_ratio: float):
  """The predicted file size of a rate: ``F + rho N R / 8``.

  Example:
    >>> from ec2t_jax._src.core.budget import rate_to_bytes  # internal
    >>> rate_to_bytes(2 / 3, 100.0, 12000, 0.9)
    1000.0
  """
  return fixed + coding_ratio * numel * rate / 8.0


def ramped_target(start, target, count, ramp_steps: int) -> jax.Array:
  """``start + (target - start) min(1, count / ramp_steps)`` (target if 0 steps).

  Example:
    >>> from ec2t_jax._src.core.budget import ramped_target  # internal
    >>> float(ramped_target(1.5, 0.5, 25, 100))
    1.25
  """
  target = jnp.asarray(target, jnp.float32)
  if ramp_steps <= 0:
    return target
  fraction = jnp.minimum(jnp.asarray(count, jnp.float32) / float(ramp_steps), 1.0)
  return start + (target - start) * fraction


def controller_step(multiplier, error, gain, low: float, high: float) -> jax.Array:
  """Dual ascent: ``clip(m + gain * error, low, high)``, float32.

  Example:
    >>> from ec2t_jax._src.core.budget import controller_step  # internal
    >>> float(controller_step(0.5, 0.25, 0.4, 0.0, 1.0))
    0.6000000238418579
  """
  m = jnp.asarray(multiplier, jnp.float32) + jnp.asarray(gain, jnp.float32) * error
  return jnp.clip(m, low, high).astype(jnp.float32)


def size_error(kind: str, measured, target, bits_per_byte: float = 1.0) -> jax.Array:
  """``e``, positive when the model is too large.

  ``R - R*`` (bits/weight), ``S* - S`` (sparsity) or, for bytes,
  ``(B - B*) * bits_per_byte`` with ``bits_per_byte = 8 / (rho N)``: the
  same error in bits/weight.

  Example:
    >>> from ec2t_jax._src.core.budget import size_error  # internal
    >>> [round(float(e), 6) for e in (size_error("sparsity", 0.8, 0.9),
    ...                               size_error("bytes", 700, 500, 0.001))]
    [0.1, 0.2]
  """
  measured = jnp.asarray(measured, jnp.float32)
  target = jnp.asarray(target, jnp.float32)
  if kind == "sparsity":
    return target - measured
  if kind == "bytes":
    return (measured - target) * bits_per_byte
  return measured - target


class ControlledHyper(NamedTuple):
  """The hyperparameter of a method that a budget's controller drives.

  Attributes:
    name: the field of the method's hyper ``NamedTuple``.
    initial: its value at ``init``.
    low, high: its range (the controller clips to it).
    gain: default controller step (per unit of :func:`size_error`).
  """
  name: str
  initial: float
  low: float
  high: float
  gain: float


# ---------------------------------------------------------------------------
# The controller over a tree of leaf states (used by quantize_transform).


class BudgetPlan(NamedTuple):
  """Static facts of a budget on one params tree (from shapes only).

  Attributes:
    budget: the :class:`Budget`.
    controlled: the method's :class:`ControlledHyper`.
    numel: ``N``, the selected weights.
    fixed: ``F`` (:func:`fixed_bytes_bound`, or the budget's measured ``fixed_bytes``).
    bits_per_byte: ``8 / (rho N)``: a byte of error in bits/weight.
  """
  budget: Budget
  controlled: ControlledHyper
  numel: int
  fixed: int
  bits_per_byte: float

  @property
  def gain(self) -> float:
    return self.controlled.gain if self.budget.gain is None else self.budget.gain

  def smallest_bytes(self) -> int:
    """The smallest reachable file: every selected weight zero."""
    return self.fixed


def plan_budget(budget: Budget, controlled: ControlledHyper, param_leaves: Sequence,
                leaf_states: Sequence) -> BudgetPlan:
  """The :class:`BudgetPlan` of a params tree (flattening order, states None-aligned).

  Raises:
    ValueError: a bytes budget with a selected leaf that is not ternary (ECP
      keeps full-precision survivors, which this model does not count).
  """
  unselected, selected = [], []
  for param, leaf in zip(param_leaves, leaf_states):
    n = int(np.prod(np.shape(param)))
    if leaf is None:
      unselected.append((n, _stored_itemsize(np.dtype(param.dtype), budget.float16)))
    else:
      selected.append(n)
      if budget.kind == "bytes":
        _check_bytes_model(leaf)
  numel = sum(selected)
  fixed = (fixed_bytes_bound(unselected, selected) if budget.fixed_bytes is None
           else int(math.ceil(budget.fixed_bytes)))
  return BudgetPlan(budget, controlled, numel, fixed, 8.0 / (budget.coding_ratio * max(numel, 1)))


def _stored_itemsize(dtype: np.dtype, float16: bool) -> int:
  """Bytes per value of a full-precision leaf in the file (the export's float16 option)."""
  return 2 if float16 and dtype.name in ("float32", "float64") else dtype.itemsize


def _check_bytes_model(leaf) -> None:
  if isinstance(leaf, StackedLeaf):
    raise ValueError("Budget(bytes=...) models one ternary record per leaf; a stacked leaf "
                     "holds one layer per slice (use bits_per_weight or sparsity)")
  if leaf.describe().get("mode") == "ecp":
    raise ValueError("Budget(bytes=...) models ternary leaves only; a selected leaf is "
                     "in mode 'ecp' (use bits_per_weight or sparsity)")


def leaf_symbols(leaf) -> jax.Array:
  """The ternary symbols of a leaf state: its ``assignment`` or its value's sign."""
  if hasattr(leaf, "assignment"):
    return leaf.assignment
  return leaf.value(jnp.float32)


def leaf_counts(leaf) -> list:
  """:func:`sign_counts` per layer of a leaf state: one, or one per slice of a
  :class:`StackedLeaf` (each slice is a layer with its own entropy)."""
  symbols = jnp.asarray(leaf_symbols(leaf))
  if not isinstance(leaf, StackedLeaf):
    return [sign_counts(symbols)]
  per_slice = symbols.reshape((-1,) + symbols.shape[leaf.stack_ndim:])
  counts = jax.vmap(_sign_counts)(per_slice)
  return [counts[i] for i in range(counts.shape[0])]


def measure(plan: BudgetPlan, leaf_states: Sequence) -> jax.Array:
  """The size of the current assignments in the budget's units."""
  counts = [c for s in leaf_states if s is not None for c in leaf_counts(s)]
  rate, sparsity = rate_and_sparsity(counts)
  kind = plan.budget.kind
  if kind == "sparsity":
    return sparsity
  if kind == "bytes":
    return rate_to_bytes(rate, plan.fixed, plan.numel, plan.budget.coding_ratio)
  return rate


def init_budget_state(plan: BudgetPlan, leaf_states: Sequence, target) -> BudgetState:
  """The controller's first state; checks that a bytes target is reachable.

  Raises:
    ValueError: a concrete bytes target below :meth:`BudgetPlan.smallest_bytes`.
  """
  kind = plan.budget.kind
  if kind == "bytes" and is_concrete(target) and float(target) < plan.smallest_bytes():
    raise ValueError(
        f"Budget bytes={target!r} is unreachable for these params: the full-precision "
        f"leaves, headers and centroids alone take {plan.smallest_bytes():,} bytes (the "
        f"smallest reachable size)")
  start = measure(plan, leaf_states)
  first_target = ramped_target(start, target, 0, plan.budget.ramp_steps)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return BudgetState(multiplier=f32(plan.controlled.initial),
                     kind=jnp.asarray(KINDS.index(kind), jnp.int32), start=f32(start),
                     measured=f32(start), target=f32(first_target),
                     saturated_steps=jnp.asarray(0, jnp.int32))


def update_budget_state(plan: BudgetPlan, old: BudgetState, leaf_states: Sequence, target,
                        count, frozen, skipped) -> BudgetState:
  """One controller update after a step with ``old.multiplier``.

  Args:
    plan: the :class:`BudgetPlan`.
    old: the state the step used.
    leaf_states: the new leaf states (None where unselected).
    target: the budget's target (maybe traced), in its units.
    count: the step's index (``QuantizerState.count`` before it), for the ramp.
    frozen: bool scalar: the assignment is frozen (``phase >= 1``): the
      multiplier is kept, the measurement still updated.
    skipped: bool scalar: the step was skipped (invalid hyperparameter or
      target): the whole state is kept.

  Returns:
    The new :class:`BudgetState`.
  """
  kind = plan.budget.kind
  measured = measure(plan, leaf_states)
  goal = ramped_target(old.start, target, count, plan.budget.ramp_steps)
  error = size_error(kind, measured, goal, plan.bits_per_byte)
  m = controller_step(old.multiplier, error, plan.gain, plan.controlled.low,
                     plan.controlled.high)
  keep = lambda new, prev: jnp.where(skipped, prev, jnp.asarray(new, jnp.float32))
  ramp_over = jnp.asarray(count) >= plan.budget.ramp_steps
  saturated = next_saturated_steps(old.saturated_steps, m, error, measured, goal,
                                   plan.controlled.low, plan.controlled.high, ramp_over,
                                   ~(frozen | skipped))
  return old._replace(multiplier=jnp.where(frozen | skipped, old.multiplier, m),
                      measured=keep(measured, old.measured), target=keep(goal, old.target),
                      saturated_steps=saturated)
