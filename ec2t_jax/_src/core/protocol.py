"""The method protocol: what a method provides and the state every method keeps."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Protocol

import jax

NO_PARAMS_MSG = ("The quantizer's update needs the current params: call "
                 "`tx.update(updates, state, params)`.")


class LeafContext(NamedTuple):
  """Static facts about one selected leaf, given to a method's functions.

  Attributes:
    path: the leaf's ``/``-joined path.
    shape: its shape.
    dtype: the param's dtype.
    mode: the selecting rule's mode (``"ternary"``, ``"ecp"``, ...).
    gamma: the selecting rule's knob, or None for the transformation's.
    size_fraction: ``numel / max numel`` over all selected leaves.
  """
  path: str
  shape: tuple
  dtype: Any
  mode: str
  gamma: Optional[float]
  size_fraction: float


class LeafState(Protocol):
  """What a method's per-leaf state (a ``NamedTuple``) provides."""
  latent: jax.Array

  def value(self, dtype) -> jax.Array:
    """The value the params hold, on the method's grid."""

  def describe(self) -> dict:
    """For :func:`~ec2t_jax.summary`: ``"method"`` and ``"mode"`` names and
    the method's own scalars (beyond sparsity/entropy, which are generic)."""

  # Optional: ``codes() -> Array`` of integer symbols whose zeroth-order
  # entropy is the layer's information when the values alone overstate it
  # (per-filter scales: TWN "filter", STTN). :func:`~ec2t_jax.summary` uses
  # it for bits/weight and levels; without it, the values are the symbols.


class Method(NamedTuple):
  """A quantization method: its per-leaf functions.

  Attributes:
    name: shown by :func:`~ec2t_jax.summary`.
    init_leaf: ``(param, ctx, hyper) -> LeafState`` from the pretrained value.
    step_leaf: ``(update, leaf, ctx, hyper, phase) -> LeafState``; ``update``
      is what the inner optimizer proposes to add to the quantized param
      (float32, finite), ``phase`` a traced int32 (see :func:`set_phase`).
      Pure and ``vmap``-able.
  """
  name: str
  init_leaf: Callable[..., Any]
  step_leaf: Callable[..., Any]


class QuantizerState(NamedTuple):
  """State of every method's transformation.

  Attributes:
    count: number of updates (int32).
    phase: the training phase (int32); EC2T's phase 2 (frozen assignment) is
      1, staged methods count their stages.
    nonfinite_count: updates in which some selected leaf received a
      non-finite update; such a leaf keeps its state for that step.
    invalid_hyper_count: updates skipped (all selected leaves kept their
      state) because a traced hyperparameter was non-finite or out of range.
    leaves: a tree like the params: a method's :class:`LeafState` at each
      selected leaf, ``None`` elsewhere.
    budget: the size-budget controller's ``BudgetState`` (multiplier,
      target, reached size), or ``None`` without a :class:`~ec2t_jax.Budget`.
  """
  count: jax.Array
  phase: jax.Array
  nonfinite_count: jax.Array
  invalid_hyper_count: jax.Array
  leaves: Any
  budget: Any = None

  @property
  def frozen(self) -> jax.Array:
    """EC2T's phase 2 flag: ``phase >= 1``."""
    return self.phase >= 1

  def field(self, name: str):
    """The tree of one per-leaf field (``None`` where unselected or absent).

    Example:
      >>> state.field("latent")["Conv_1"]["kernel"].shape
      (3, 3, 4, 8)
      >>> state.field("w_p")["Conv_0"]  # unselected (first layer)
      {'bias': None, 'kernel': None}
    """
    return jax.tree.map(lambda leaf: getattr(leaf, name, None), self.leaves,
                        is_leaf=is_leaf_state)

  @property
  def latent(self):
    """The tree of latent weights (``None`` at unselected leaves)."""
    return self.field("latent")


def is_leaf_state(x) -> bool:
  """Whether ``x`` is one selected leaf's state (or ``None``)."""
  return x is None or (isinstance(x, tuple) and hasattr(x, "_fields")
                       and hasattr(x, "value") and hasattr(x, "describe"))

