"""Shared helpers of the post-training methods: which leaves they touch."""

from __future__ import annotations

import dataclasses

import jax

from ec2t_jax._src.core import selection as selection_lib
from ec2t_jax._src.core import tracing


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
