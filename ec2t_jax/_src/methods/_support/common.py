"""Helpers several methods share: which leaves they touch, forward ranks, staged steps."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ec2t_jax._src.core import segments as segments_lib
from ec2t_jax._src.core import selection as selection_lib
from ec2t_jax._src.core import tracing
from ec2t_jax._src.core import trees


def selected_leaves(params, selection: selection_lib.SelectionLike) -> list[bool]:
  """Per leaf of ``jax.tree.leaves(params)``: whether ``selection`` picks it.

  The same rules as the training transformations (:class:`ec2t.Rule`, the
  paper's first/last default), so a post-training method and EC2T touch the
  same layers. The mode of a rule (``ternary``/``ecp``) does not matter here,
  only whether the leaf is selected.
  """
  plans = selection_lib.as_selection(selection).plan(params)
  leaves = jax.tree.leaves(params)
  if len(plans) != len(leaves):  # pragma: no cover - pure_tree flattens like params
    raise ValueError("the selection's view of params does not match its leaves")
  return [plan is not None for plan in plans]


def with_forward_order(selection: selection_lib.SelectionLike, apply_fn, params, example):
  """``selection`` as a :class:`Selection` whose first/last rule uses the traced forward order.

  An explicit ``Selection(order=...)`` is kept as given.
  """
  chosen = selection_lib.as_selection(selection)
  if chosen.order is not None or chosen.default not in ("paper", "all_but_last"):
    return chosen
  order = tuple(tracing.forward_order(apply_fn, params, example))
  return dataclasses.replace(chosen, order=order)


def forward_ranks(selection: selection_lib.SelectionLike, params) -> dict[str, int]:
  """Selected path -> its position in forward order among the selected leaves.

  The order is the selection's (its ``order``, else the tree's own, see
  :class:`~ec2t_jax.Selection`), as for the paper's first/last rule.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax._src.methods._support.common import forward_ranks  # internal
    >>> forward_ranks(lambda path, leaf: True, {"fc2": jnp.ones(2), "fc1": jnp.ones(2)})
    {'fc2': 0, 'fc1': 1}
  """
  chosen = selection_lib.as_selection(selection)
  plans = chosen.plan(params)
  flat, _ = jax.tree_util.tree_flatten_with_path(trees.pure_tree(params))
  paths = [trees.path_to_str(p) for p, _ in flat]
  selected = [i for i, plan in enumerate(plans) if plan is not None]
  ordered = chosen._forward_sorted(selected, params, flat, paths)  # pylint: disable=protected-access
  return {paths[i]: rank for rank, i in enumerate(ordered)}


def masked_step(update: jax.Array, leaf,
                segments: segments_lib.Segments = segments_lib.LeafSegments()):
  """Masked retraining: the free latent weights move by ``update``, frozen ones do not.

  ``leaf`` has ``latent``, a boolean ``frozen`` mask and ``latent_max``, the layer's
  ``max |latent|`` (INQ, SLQ/MLQ), which follows the move (per layer of a flat buffer's
  ``segments``).
  """
  latent = leaf.latent + jnp.where(leaf.frozen, 0.0, update)
  return leaf._replace(latent=latent, latent_max=segments.max(jnp.abs(latent)))


def scheduled_stage(phase, steps, steps_per_stage) -> jax.Array:
  """``max(phase, steps // steps_per_stage)``, or ``phase`` when ``steps_per_stage`` is 0.

  Example:
    >>> from ec2t_jax._src.methods._support.common import scheduled_stage  # internal
    >>> int(scheduled_stage(1, 7, 3))
    2
  """
  per = jnp.asarray(steps_per_stage, jnp.int32)
  by_steps = jnp.where(per > 0, steps // jnp.maximum(per, 1), 0)
  return jnp.maximum(jnp.asarray(phase, jnp.int32), by_steps)
