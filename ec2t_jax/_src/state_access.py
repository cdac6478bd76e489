"""Reading and switching EC2T state inside any optimizer state.

The functions here find :class:`TernarizeState` wherever it sits (inside
``optax.chain``, ``optax.inject_hyperparams``, :func:`ternarize`, or an
``nnx.Optimizer``), so users never index into optimizer states by hand.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ec2t_jax._src import transform
from ec2t_jax._src.trees import nnx_optimizer_type
from ec2t_jax._src.trees import pure_tree


def _is_ternarize_state(x) -> bool:
  return isinstance(x, transform.TernarizeState)


def find_ternarize_state(opt_state) -> transform.TernarizeState:
  """Returns the one :class:`TernarizeState` inside ``opt_state``.

  Args:
    opt_state: any optimizer state (or an ``nnx.Optimizer``) built with
      :func:`ternarize_transform` or :func:`ternarize`.

  Raises:
    ValueError: if there is no such state, or more than one.
  """
  found = [x for x in jax.tree.leaves(pure_tree(opt_state),
                                      is_leaf=_is_ternarize_state)
           if _is_ternarize_state(x)]
  if len(found) != 1:
    raise ValueError(
        f"opt_state holds {len(found)} EC2T states; expected exactly one (was "
        "the optimizer built with ec2t.ternarize_transform or ec2t.ternarize?)")
  return found[0]


def ternary_params(params, opt_state):
  """``params`` with every selected leaf replaced by its current ternary value.

  Call it once right after ``init`` so that the very first forward pass is
  already ternary (``init`` cannot change params; later steps keep them
  ternary by themselves)::

    opt_state = tx.init(params)
    params = ec2t.ternary_params(params, opt_state)

  With Flax NNX::

    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    nnx.update(model, ec2t.ternary_params(nnx.state(model, nnx.Param), optimizer))

  Args:
    params: the params the optimizer was initialised with (any pytree; an
      ``nnx.State`` is accepted).
    opt_state: the optimizer state, or an ``nnx.Optimizer``.

  Returns:
    A pytree like ``params`` (plain arrays), dtypes preserved.
  """
  state = find_ternarize_state(opt_state)
  params = pure_tree(params)
  leaves, treedef = jax.tree.flatten(params)
  fields = [treedef.flatten_up_to(t) for t in
            (state.latent, state.w_n, state.w_p, state.assignment, state.ecp)]
  out = []
  for leaf, (latent, w_n, w_p, a, ecp) in zip(leaves, zip(*fields)):
    if latent is None:
      out.append(leaf)
    else:
      leaf_state = transform.LeafState(latent, w_n, w_p, a, None)
      dtype = jnp.asarray(leaf).dtype
      out.append(jnp.where(ecp, transform.leaf_value(leaf_state, True, dtype),
                           transform.leaf_value(leaf_state, False, dtype)))
  return treedef.unflatten(out)


def freeze_assignment(opt_state, frozen: bool = True):
  """Switches EC2T to phase 2 (or back), keeping the optimizer and its state.

  While frozen, the assignment and the latent weights stay as they are; the
  centroids and the non-ternarized params keep training. Works with any state
  that holds a :class:`TernarizeState` (chains, ``inject_hyperparams``,
  :func:`ternarize`) and, in place, with an ``nnx.Optimizer``.

  Args:
    opt_state: the optimizer state, or an ``nnx.Optimizer`` (changed in place).
    frozen: True for phase 2, False to resume phase 1.

  Returns:
    The new optimizer state (the same ``nnx.Optimizer`` for NNX).

  Example:
    >>> opt_state = ec2t.freeze_assignment(opt_state)
  """
  if isinstance(opt_state, nnx_optimizer_type()):
    states = [x for x in jax.tree.leaves(opt_state.opt_state,
                                         is_leaf=_is_ternarize_state)
              if _is_ternarize_state(x)]
    if len(states) != 1:
      find_ternarize_state(opt_state)  # raises the error
    states[0].frozen.set_value(jnp.asarray(frozen))
    return opt_state
  find_ternarize_state(opt_state)
  return jax.tree.map(
      lambda x: x._replace(frozen=jnp.asarray(frozen))
      if _is_ternarize_state(x) else x,
      opt_state, is_leaf=_is_ternarize_state)


def is_frozen(opt_state) -> Any:
  """Whether the assignment is frozen (phase 2), as a bool array."""
  return find_ternarize_state(opt_state).frozen
