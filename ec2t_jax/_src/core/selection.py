"""Which parameter leaves are ternarized, pruned (ECP) or left alone.

Leaves are named by their flattened path: the keys joined with ``/``, e.g.
``params/Conv_1/kernel`` for Flax Linen or ``layers/0/kernel`` for the
``nnx.State`` of an NNX model.

**The paper's rule** (the default, ``Selection(default="paper")``): every
floating-point kernel with ``ndim >= 2`` (leaves named ``embedding`` excluded)
is ternarized, except the first and the last such leaf *in forward order*, i.e.
the input and the output layer. ``default="all_but_last"`` keeps only the last
one (the output layer) in full precision; ``default="none"`` selects nothing.

Which published numbers each default reproduces:

=====================  ====================================================
``"paper"``            the EC2T paper's ResNet-20 / ResNet-18 /
                       EfficientNet / MicroNet results ("all layers but the
                       input and the output layer")
``"all_but_last"``     the reference code's LeNet-5 (MNIST) runs: conv1,
                       conv2, fc1 and fc2 ternary, only the output layer
                       full precision
=====================  ====================================================

**Forward order.** "First" and "last" come from, in order of preference:

1. ``Selection(order=...)``, the paths in the order the computation uses
   them, from :func:`ec2t_jax.forward_order` (recommended; works for any
   names, Linen and NNX);
2. the order the tree itself carries: a Linen params dict fresh from
   ``model.init`` has its keys in call order. Tree operations such as
   ``jax.tree.map``, ``optax.apply_updates`` and the outputs of ``jax.jit``
   return dicts with *sorted* keys, and ``nnx.State`` is always sorted, so
   this order is lost after them;
3. natural-sort order of the paths, where digit runs compare as numbers
   (``Conv_2 < Conv_10``). Right for auto-named models (``Conv_0, Dense_1``,
   ``layers/0``) whose layers of one kind run in index order; for other names
   a warning at ``init`` says which leaves were taken as first and last.

The plan is made once, by the transformation's ``init``; later re-sorted trees
do not change it.

**Rules** override the default, first match wins, and a rule that matches no
leaf is an error (catches typos). :func:`describe_selection` lists what each
rule selected.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import re
import warnings
from typing import Any, Callable, Literal, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ec2t_jax._src.core import hyper
from ec2t_jax._src.core.trees import path_to_str
from ec2t_jax._src.core.trees import pure_tree

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
    if self.gamma is not None:  # None: the transformation's gamma
      hyper.check_range("Rule.gamma", self.gamma, hyper.Range(0.0, 1.0))


class LeafPlan(NamedTuple):
  """What happens to one leaf: its path, mode and gamma (None = global)."""
  path: str
  mode: Mode
  gamma: Optional[float]
  source: str  # "default", "rule <i>: <pattern>" or "select"


Select = Callable[[str, Any], bool]
SelectionLike = Union[None, "Selection", Sequence[Rule], Select]
_DEFAULTS = ("paper", "all_but_last", "none")
# Flax's generated names: ``Conv_0`` (Linen), list / nnx.List indices ``0``.
_AUTO_NAME = re.compile(r"^(?:\d+|[A-Za-z][A-Za-z0-9]*_\d+)$")


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
    default: for leaves no rule matches: ``"paper"`` (every kernel but the
      first and the last, see the module docstring), ``"all_but_last"`` (every
      kernel but the last: the reference's LeNet-5), ``"none"`` (leave them
      alone) or a callable ``(path, leaf) -> bool`` that says which to
      ternarize.
    order: the paths in forward order (:func:`ec2t_jax.forward_order`), used
      by ``"paper"`` and ``"all_but_last"`` to tell the first and last kernel.
      ``None``: the tree's own order (see the module docstring). Every kernel
      must be in it; other paths (biases, unused leaves) may be missing.

  Example:
    >>> order = ec2t.forward_order(lambda p, x: model.apply({"params": p}, x),
    ...                            params, x)  # doctest: +SKIP
    >>> tx = ec2t.ternarize_transform(
    ...     selection=ec2t.Selection(order=order))  # doctest: +SKIP
  """
  rules: tuple[Rule, ...] = ()
  default: Union[Literal["paper", "all_but_last", "none"], Select] = "paper"
  order: Optional[tuple[str, ...]] = None

  def __post_init__(self):
    object.__setattr__(self, "rules", tuple(self.rules))
    for rule in self.rules:
      if not isinstance(rule, Rule):
        raise TypeError(f"Selection.rules must hold Rule objects, got {rule!r}")
    if not (callable(self.default) or self.default in _DEFAULTS):
      raise ValueError(f"Selection.default must be one of {_DEFAULTS} or a "
                       f"callable (path, leaf) -> bool, got {self.default!r}")
    if self.order is not None:
      if isinstance(self.order, str):
        raise TypeError("Selection.order must be a sequence of paths, got the "
                        f"string {self.order!r}")
      order = tuple(self.order)
      bad = [p for p in order if not isinstance(p, str)]
      if bad:
        raise TypeError("Selection.order must hold '/'-joined path strings, got "
                        f"{bad[0]!r}")
      if not order:
        raise ValueError("Selection.order is empty; pass "
                         "ec2t.forward_order(fn, params, *example_args)")
      seen = set()
      for path in order:
        if path in seen:
          raise ValueError(f"Selection.order lists {path!r} twice")
        seen.add(path)
      object.__setattr__(self, "order", order)

  def leaf_rule(self, path: str) -> LeafPlan:
    """What applies to ``path`` if it is selected: the first matching rule's
    mode and gamma, else the default's ``("ternary", None, "default")``.

    Independent of the order and of the other leaves (unlike :meth:`plan`,
    which also decides *whether* a leaf is selected).

    Example:
      >>> Selection([Rule("conv", mode="ecp", gamma=0.1)]).leaf_rule("conv2/kernel")
      LeafPlan(path='conv2/kernel', mode='ecp', gamma=0.1, source='rule 0: conv')
      >>> Selection().leaf_rule("fc1/kernel")
      LeafPlan(path='fc1/kernel', mode='ternary', gamma=None, source='default')
    """
    for index, rule in enumerate(self.rules):
      if re.search(rule.pattern, path):
        return LeafPlan(path, rule.mode, rule.gamma,
                        f"rule {index}: {rule.pattern}")
    return LeafPlan(path, "ternary", None, "default")

  def plan(self, params) -> list[Optional[LeafPlan]]:
    """One :class:`LeafPlan` per leaf of ``params`` (flattening order).

    ``None`` marks a leaf left alone. Called once, by the transformation's
    ``init``.

    Raises:
      ValueError: a rule matched no leaf, a rule or the default selected a leaf
        that cannot be ternarized, a kernel is missing from ``order``, or
        nothing at all was selected.
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
    for i in self._default_indices(params, flat, paths, leaves):
      if not claimed[i]:
        _check_selectable(paths[i], leaves[i], "The default selection")
        plans[i] = LeafPlan(paths[i], "ternary", None, "default")
    if not any(plans):
      raise ValueError(
          "No leaf is selected for ternarization. The paper's rule keeps the "
          "first and last kernel in full precision; pass selection=[Rule(...)]"
          " to choose leaves explicitly. Paths: " + ", ".join(paths))
    return plans

  def _default_indices(self, params, flat, paths, leaves) -> list[int]:
    if self.default == "none":
      return []
    if callable(self.default):
      return [i for i, (p, l) in enumerate(zip(paths, leaves))
              if self.default(p, l)]
    kernels = [i for i, (p, l) in enumerate(zip(paths, leaves)) if is_kernel(p, l)]
    kernels = self._forward_sorted(kernels, params, flat, paths)
    return kernels[1:-1] if self.default == "paper" else kernels[:-1]

  def _forward_sorted(self, kernels, params, flat, paths) -> list[int]:
    """``kernels`` (leaf indices) sorted by forward order, best source first."""
    if self.order is not None:
      position = {p: k for k, p in enumerate(self.order)}
      missing = [paths[i] for i in kernels if paths[i] not in position]
      if missing:
        shown = ", ".join(repr(p) for p in self.order[:4])
        raise ValueError(
            f"Selection.order lacks the kernel {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f"; the order holds {shown}{', ...' if len(self.order) > 4 else ''}. "
            "Compute it with ec2t.forward_order(fn, params, *example_args) on "
            "the same tree the optimizer sees, or choose leaves with Rule(...)")
      return sorted(kernels, key=lambda i: position[paths[i]])
    ranks = _insertion_ranks(pure_tree(params), [p for p, _ in flat])
    if sorted(range(len(ranks)), key=ranks.__getitem__) != list(range(len(ranks))):
      return sorted(kernels, key=ranks.__getitem__)  # the tree's own order
    kernels = sorted(kernels, key=lambda i: _natural_key(paths[i]))
    if kernels and not _auto_named([paths[i] for i in kernels]):
      warnings.warn(
          f"Selection: default={self.default!r} keeps "
          + ("the last kernel" if self.default == "all_but_last"
             else "the first and the last kernel")
          + " in full precision, but these parameters carry no forward order "
          "(nnx.State and trees returned by jax.tree.map or "
          "optax.apply_updates have sorted keys) and their names are not "
          "Flax's generated ones, so the order was guessed by natural sort: "
          f"first {paths[kernels[0]]!r}, last {paths[kernels[-1]]!r}. Pass the "
          "order: Selection(order=ec2t.forward_order(fn, params, "
          "*example_args)), or choose leaves with Rule(...).", stacklevel=4)
    return kernels


def _insertion_ranks(tree, key_paths) -> list[tuple]:
  """Per leaf, its position in the tree's own key order (dict insertion
  order; sequences by index), with the flattening index as the tie-break
  below nodes that are neither."""
  ranks = []
  for index, key_path in enumerate(key_paths):
    node, rank = tree, []
    for entry in key_path:
      if (isinstance(entry, jax.tree_util.DictKey)
          and isinstance(node, collections.abc.Mapping)):
        rank.append(list(node.keys()).index(entry.key))
        node = node[entry.key]
      elif (isinstance(entry, jax.tree_util.SequenceKey)
            and isinstance(node, collections.abc.Sequence)):
        rank.append(entry.idx)
        node = node[entry.idx]
      else:
        break
    ranks.append(tuple(rank) + (index,))
  return ranks


def _auto_named(paths: Sequence[str]) -> bool:
  """Whether every choice between sibling subtrees is between generated names
  (``Conv_3``, ``Dense_0``, list indices)."""
  groups: dict[str, list[str]] = {}
  for path in paths:
    head, _, rest = path.partition("/")
    groups.setdefault(head, []).append(rest)
  if len(groups) > 1 and not all(_AUTO_NAME.match(k) for k in groups):
    return False
  return all(_auto_named([r for r in rests if r])
             for rests in groups.values() if len(rests) > 1)


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
    >>> print(describe_selection(params, [Rule("Conv_0", mode="ecp")]))  # doctest: +SKIP
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
