"""Which parameter leaves are ternarized, pruned (ECP) or left alone.

Leaves are named by their flattened path: the keys joined with ``/``, e.g.
``params/Conv_1/kernel`` for Flax Linen or ``layers/0/kernel`` for the
``nnx.State`` of an NNX model.

**The paper's rule** (the default): every floating-point kernel with
``ndim >= 2`` (leaves named ``embedding`` excluded) is ternarized, except the
first and the last such leaf. First and last are taken in *natural-sort order*
of the paths, where digit runs compare as numbers (``Conv_2 < Conv_10``). Flax
names modules ``Conv_0, Conv_1, ..., Dense_0, ...`` and ``nnx.List`` items
``0, 1, ...``, and both Linen and NNX trees flatten with sorted keys, so for
auto-named models (and for named ones whose names sort in forward order, like
``conv1, conv2, fc1, fc2``) this is the input and the output layer. If your
names do not sort that way, say which leaves to keep with :class:`Rule`\\ s.

**Rules** override the default, first match wins, and a rule that matches no
leaf is an error (catches typos). :func:`describe_selection` lists what each
rule selected.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Literal, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ec2t_jax._src.trees import path_to_str
from ec2t_jax._src.trees import pure_tree

Mode = Literal["ternary", "ecp", "skip"]
_MODES = ("ternary", "ecp", "skip")


@dataclasses.dataclass(frozen=True)
class Rule:
  """Selects leaves whose path matches ``pattern`` (``re.search``).

  Attributes:
    pattern: regular expression searched in the ``/``-joined path; anchor it
      (``^...$``) to match whole paths.
    mode: ``"ternary"`` (EC2T), ``"ecp"`` (entropy-constrained pruning: only
      the zero decision is applied, the rest keep their latent value) or
      ``"skip"`` (left to the inner optimizer).
    gamma: this rule's gamma; ``None`` uses the transformation's gamma.

  Example:
    >>> rules = [Rule(r"shortcut"), Rule(r"^head/", mode="skip"),
    ...          Rule(r"depthwise", mode="ecp", gamma=0.05)]
  """
  pattern: str
  mode: Mode = "ternary"
  gamma: Optional[float] = None

  def __post_init__(self):
    if self.mode not in _MODES:
      raise ValueError(f"Rule.mode must be one of {_MODES}, got {self.mode!r}")
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"Rule.pattern {self.pattern!r} is not a valid regular "
                       f"expression: {e}") from None
    if self.gamma is not None and not 0.0 <= float(self.gamma) <= 1.0:
      raise ValueError(f"Rule.gamma must be in [0, 1] or None, got {self.gamma}")


class LeafPlan(NamedTuple):
  """What happens to one leaf: its path, mode and gamma (None = global)."""
  path: str
  mode: Mode
  gamma: Optional[float]
  source: str  # "default", "rule <i>: <pattern>" or "select"


Select = Callable[[str, Any], bool]
SelectionLike = Union[None, "Selection", Sequence[Rule], Select]


def _natural_key(path: str):
  return [(0, int(t), "") if t.isdigit() else (1, 0, t)
          for t in re.split(r"(\d+)", path) if t]


def is_kernel(path: str, leaf) -> bool:
  """A floating leaf with ``ndim >= 2`` that is not an embedding table."""
  return (hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)
          and len(leaf.shape) >= 2 and path.rsplit("/", 1)[-1] != "embedding")


def _check_selectable(path: str, leaf, reason: str):
  if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
    raise ValueError(f"{reason} selects leaf {path!r} of dtype "
                     f"{getattr(leaf, 'dtype', type(leaf))}; only floating-point "
                     "leaves can be ternarized")
  if int(np.prod(leaf.shape)) < 2:
    raise ValueError(f"{reason} selects leaf {path!r} of shape {leaf.shape}; "
                     "a ternarized leaf needs at least two elements (scalars "
                     "and empty leaves cannot be ternarized)")


@dataclasses.dataclass(frozen=True)
class Selection:
  """Rules plus a default that together say what happens to each leaf.

  Attributes:
    rules: :class:`Rule`\\ s, first match wins.
    default: for leaves no rule matches: ``"paper"`` (the paper's rule, see the
      module docstring), ``"none"`` (leave them alone) or a callable
      ``(path, leaf) -> bool`` that says which to ternarize.
  """
  rules: tuple[Rule, ...] = ()
  default: Union[Literal["paper", "none"], Select] = "paper"

  def __post_init__(self):
    object.__setattr__(self, "rules", tuple(self.rules))
    for rule in self.rules:
      if not isinstance(rule, Rule):
        raise TypeError(f"Selection.rules must hold Rule objects, got {rule!r}")
    if not (callable(self.default) or self.default in ("paper", "none")):
      raise ValueError("Selection.default must be 'paper', 'none' or a callable "
                       f"(path, leaf) -> bool, got {self.default!r}")

  def plan(self, params) -> list[Optional[LeafPlan]]:
    """One :class:`LeafPlan` per leaf of ``params`` (flattening order).

    ``None`` marks a leaf left alone.

    Raises:
      ValueError: a rule matched no leaf, a rule or the default selected a leaf
        that cannot be ternarized, or nothing at all was selected.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(pure_tree(params))
    paths = [path_to_str(p) for p, _ in flat]
    leaves = [leaf for _, leaf in flat]
    plans: list[Optional[LeafPlan]] = [None] * len(leaves)
    claimed = [False] * len(leaves)
    for index, rule in enumerate(self.rules):
      compiled = re.compile(rule.pattern)
      hits = [i for i, p in enumerate(paths)
              if not claimed[i] and compiled.search(p)]
      if not hits:
        raise ValueError(
            f"Rule {index} (pattern {rule.pattern!r}) selects no leaf. Paths: "
            + ", ".join(paths))
      for i in hits:
        claimed[i] = True
        if rule.mode != "skip":
          _check_selectable(paths[i], leaves[i], f"Rule {index} ({rule.pattern!r})")
          plans[i] = LeafPlan(paths[i], rule.mode, rule.gamma,
                              f"rule {index}: {rule.pattern}")
    for i in self._default_indices(paths, leaves):
      if not claimed[i]:
        _check_selectable(paths[i], leaves[i], "The default selection")
        plans[i] = LeafPlan(paths[i], "ternary", None, "default")
    if not any(plans):
      raise ValueError(
          "No leaf is selected for ternarization. The paper's rule keeps the "
          "first and last kernel in full precision; pass selection=[Rule(...)]"
          " to choose leaves explicitly. Paths: " + ", ".join(paths))
    return plans

  def leaf_rule(self, path: str) -> LeafPlan:
    """What applies to ``path`` given that it is selected.

    The first matching :class:`Rule`'s mode and gamma, else the default's
    ``("ternary", None)``. Needs no params and no order: transformations call
    it at every update for the leaves their state says were selected at init.
    """
    for index, rule in enumerate(self.rules):
      if re.search(rule.pattern, path):
        return LeafPlan(path, rule.mode, rule.gamma,
                        f"rule {index}: {rule.pattern}")
    return LeafPlan(path, "ternary", None, "default")

  def _default_indices(self, paths, leaves) -> list[int]:
    if self.default == "none":
      return []
    if callable(self.default):
      return [i for i, (p, l) in enumerate(zip(paths, leaves))
              if self.default(p, l)]
    kernels = sorted((i for i, (p, l) in enumerate(zip(paths, leaves))
                      if is_kernel(p, l)), key=lambda i: _natural_key(paths[i]))
    return kernels[1:-1]


def as_selection(selection: SelectionLike) -> Selection:
  """Coerces ``None``, a :class:`Selection`, rules or a callable."""
  if selection is None:
    return Selection()
  if isinstance(selection, Selection):
    return selection
  if isinstance(selection, Rule):
    return Selection(rules=(selection,))
  if callable(selection):
    return Selection(default=selection)
  return Selection(rules=tuple(selection))


def describe_selection(params, selection: SelectionLike = None) -> str:
  """A table of every leaf: path, shape, dtype, mode, gamma and why.

  Example:
    >>> print(describe_selection(params, [Rule("Conv_0", mode="ecp")]))
  """
  plans = as_selection(selection).plan(params)
  flat, _ = jax.tree_util.tree_flatten_with_path(pure_tree(params))
  rows = [("path", "shape", "dtype", "mode", "gamma", "selected by")]
  for (path, leaf), plan in zip(flat, plans):
    rows.append((
        path_to_str(path), str(tuple(getattr(leaf, "shape", ()))),
        str(getattr(leaf, "dtype", type(leaf).__name__)),
        plan.mode if plan else "-",
        ("global" if plan.gamma is None else f"{plan.gamma:g}") if plan else "-",
        plan.source if plan else "-"))
  widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
  return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
                   for r in rows)
