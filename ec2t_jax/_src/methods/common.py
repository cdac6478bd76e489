"""Shared helpers of the post-training methods: which leaves they touch."""

from __future__ import annotations

import jax

from ec2t_jax._src import selection as selection_lib


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
