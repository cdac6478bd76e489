"""Reading and switching a method's state inside any optimizer state.

Examples build their model, params or optimizer state with the fixture
:func:`ec2t_jax.models.small_cnn_example`.

The functions here find the :class:`QuantizerState` wherever it sits (inside
``optax.chain``, ``optax.inject_hyperparams``, :func:`ternarize_reference`, or an
``nnx.Optimizer``), so users never index into optimizer states by hand. They
work for every method built on the shared core.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ec2t_jax._src import core
from ec2t_jax._src.core.trees import nnx_optimizer_type
from ec2t_jax._src.core.trees import pure_tree


def _is_quantizer_state(x) -> bool:
  return isinstance(x, core.QuantizerState)


def _find_all(opt_state) -> list:
  return [x for x in jax.tree.leaves(opt_state, is_leaf=_is_quantizer_state)
          if _is_quantizer_state(x)]


def find_quantizer_state(opt_state) -> core.QuantizerState:
  """Returns the one :class:`QuantizerState` inside ``opt_state`` (any method's).

  Args:
    opt_state: any optimizer state (or an ``nnx.Optimizer``) built with one
      of the library's transformations (:func:`ternarize_transform`,
      :func:`ternarize_reference`, ...).

  Raises:
    ValueError: if there is no such state, or more than one.
  """
  found = _find_all(pure_tree(opt_state))
  if len(found) != 1:
    raise ValueError(
        f"opt_state holds {len(found)} quantizer states; expected exactly one "
        "(was the optimizer built with ec2t.ternarize_transform, ec2t.ternarize_reference"
        " or another ec2t method?)")
  return found[0]


def quantized_params(params, opt_state):
  """``params`` with every selected leaf replaced by its current quantized value.

  Call it once right after ``init`` so that the very first forward pass is
  already quantized (``init`` cannot change params; later steps keep them on
  the grid by themselves)::

    opt_state = tx.init(params)
    params = ec2t.quantized_params(params, opt_state)

  With Flax NNX::

    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    nnx.update(model, ec2t.quantized_params(nnx.state(model, nnx.Param), optimizer))

  Args:
    params: the params the optimizer was initialised with (any pytree; an
      ``nnx.State`` is accepted).
    opt_state: the optimizer state, or an ``nnx.Optimizer``.

  Returns:
    A pytree like ``params`` (plain arrays), dtypes preserved.
  """
  state = find_quantizer_state(opt_state)
  params = pure_tree(params)
  core.check_same_tree("params", params, state.leaves)
  leaves, treedef = jax.tree.flatten(params)
  states, _ = core.flat_leaf_states(state.resolved_leaves())
  out = [p if leaf is None else leaf.value(jnp.asarray(p).dtype)
         for p, leaf in zip(leaves, states)]
  return treedef.unflatten(out)


def set_phase(opt_state, phase: int):
  """Sets the training phase, keeping the optimizer and its state.

  Phase 0 is the first phase. EC2T's phase 2 (frozen assignment) is phase 1
  (see :func:`freeze_assignment`); staged methods number their stages. Works
  with any state that holds a :class:`QuantizerState` and, in place, with an
  ``nnx.Optimizer``.

  Args:
    opt_state: the optimizer state, or an ``nnx.Optimizer`` (changed in place).
    phase: the new phase, an int ``>= 0``.

  Returns:
    The new optimizer state (the same ``nnx.Optimizer`` for NNX).

  Example:
    >>> import ec2t_jax as ec2t
    >>> from ec2t_jax.models import small_cnn_example
    >>> opt_state = small_cnn_example().opt_state  # a small CNN (fixture)
    >>> opt_state = ec2t.set_phase(opt_state, 1)
  """
  if isinstance(phase, bool) or int(phase) != phase or phase < 0:
    raise ValueError(f"phase must be an int >= 0, got {phase!r}")
  value = jnp.asarray(phase, jnp.int32)
  if isinstance(opt_state, nnx_optimizer_type()):
    states = _find_all(opt_state.opt_state)
    if len(states) != 1:
      find_quantizer_state(opt_state)  # raises the error
    states[0].phase.set_value(value)
    return opt_state
  find_quantizer_state(opt_state)
  return jax.tree.map(
      lambda x: x._replace(phase=value) if _is_quantizer_state(x) else x,
      opt_state, is_leaf=_is_quantizer_state)


def freeze_assignment(opt_state, frozen: bool = True):
  """Switches EC2T to phase 2 (or back), keeping the optimizer and its state.

  While frozen, the assignment and the latent weights stay as they are; the
  centroids and the non-ternarized params keep training. Same as
  ``set_phase(opt_state, 1 if frozen else 0)``.

  Args:
    opt_state: as for :func:`set_phase`.
    frozen: True for phase 2, False to resume phase 1.

  Returns:
    What :func:`set_phase` returns.

  Example:
    >>> import ec2t_jax as ec2t
    >>> from ec2t_jax.models import small_cnn_example
    >>> opt_state = small_cnn_example().opt_state  # a small CNN (fixture)
    >>> opt_state = ec2t.freeze_assignment(opt_state)
  """
  return set_phase(opt_state, 1 if frozen else 0)


def is_frozen(opt_state) -> Any:
  """Whether the assignment is frozen (phase 2), as a bool array."""
  return find_quantizer_state(opt_state).frozen
