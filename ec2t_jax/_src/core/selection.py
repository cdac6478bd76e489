"""Which parameter leaves are ternarized, pruned (ECP) or left alone.

Examples build their model, params or optimizer state with the fixture
:func:`ec2t_jax.models.small_cnn_example`.

Leaves are named by their flattened path: the keys joined with ``/``, e.g.
``params/Conv_1/kernel`` for Flax Linen or ``layers/0/kernel`` for the
``nnx.State`` of an NNX model.

**The paper's rule** (the default, ``Selection(default="paper")``): every
floating-point kernel with ``ndim >= 2`` (not named ``bias``) is ternarized,
except the input and the output layer: the first and the last *layer in
forward order*. Layers are
the kernels plus the embedding tables (leaves named ``embedding``, or read by
an embedding lookup in the traced computation); embeddings are never
ternarized by default. So in a transformer the token embedding is the input
layer and the LM head the output layer; with a tied embedding (the head is
``embedding.attend``) the embedding is both, every block kernel is ternarized,
and an untied head stays in full precision. The 3-D kernels of
``DenseGeneral`` / ``nnx.LinearGeneral`` are one layer each.
``default="all_but_last"`` keeps only the last layer in full precision;
``default="none"`` selects nothing.

**Stacked layers.** A leaf may hold several layers along leading axes (Linen
``nn.scan(..., variable_axes={"params": 0})``, ``nnx.vmap``-built stacks applied
with ``nnx.scan``): ``blocks/c_fc/kernel`` of shape ``(L, d, 4d)`` is ``L``
layers. :func:`~ec2t_jax.forward_order` finds them (a ``scan`` slices the
param), ``Rule(..., stack_axes=(0,))`` says so explicitly. Whether a leaf is a
kernel is judged on one slice, so stacked norms and biases (``(L, d)``) are
not kernels; every method keeps its per-layer statistics per slice. For the
first/last rule a stacked leaf counts as one layer (kept whole or ternarized
whole).

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
    stack_axes: the leading axes along which the matched leaves stack layers
      (``(0,)`` for ``nn.scan``-ed blocks): each slice is one layer with its
      own statistics. ``None``: what the traced computation shows
      (``Selection(order=ec2t.forward_order(...))``), else not stacked. Must
      agree with the trace when both are known.
    output_axis: the output-channel axis of one slice of the matched leaves
      (per-filter statistics such as ``twn(threshold="filter")`` and
      ``sttn()`` run along it), e.g. ``0`` for ``(out, in)`` kernels applied
      as ``x @ k.T``. ``None``: what the trace shows, else the last axis.

  Example:
    >>> from ec2t_jax import Rule
    >>> rules = [Rule(r"shortcut"), Rule(r"^head/", mode="skip"),
    ...          Rule(r"depthwise", mode="ecp", gamma=0.05),
    ...          Rule(r"^blocks/.*kernel$", stack_axes=(0,))]
  """
  pattern: str
  mode: Mode = "ternary"
  gamma: Optional[float] = None
  stack_axes: Optional[tuple[int, ...]] = None
  output_axis: Optional[int] = None

  def __post_init__(self):
    _check_rule_mode(self.mode)
    _check_rule_pattern(self.pattern)
    if self.gamma is not None:  # None: the transformation's gamma
      hyper.check_range("Rule.gamma", self.gamma, hyper.Range(0.0, 1.0))
    if self.stack_axes is not None:
      object.__setattr__(self, "stack_axes",
                         _rule_stack_axes(self.stack_axes, self.pattern))
    if self.output_axis is not None:
      object.__setattr__(self, "output_axis",
                         _rule_output_axis(self.output_axis, self.pattern))


def _check_rule_mode(mode) -> None:
  """Raises ValueError unless ``mode`` is one of ``_MODES``."""
  if mode not in _MODES:
    raise ValueError(f"Rule.mode must be one of {_MODES}, got {mode!r}")


def _check_rule_pattern(pattern) -> None:
  """Raises ValueError unless ``pattern`` compiles as a regular expression."""
  try:
    re.compile(pattern)
  except re.error as e:
    raise ValueError(f"Rule.pattern {pattern!r} is not a valid regular "
                     f"expression: {e}") from None


def _is_int(value) -> bool:
  """Whether ``value`` is a Python or numpy integer (a bool is not)."""
  return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def _rule_stack_axes(stack_axes, pattern) -> tuple[int, ...]:
  """``Rule.stack_axes`` as a tuple of ints; ValueError unless the leading axes."""
  axes = (stack_axes,) if isinstance(stack_axes, int) else stack_axes
  try:
    axes = tuple(axes)
  except TypeError:
    axes = None
  if axes is None or not all(_is_int(a) for a in axes) or axes != tuple(range(len(axes))):
    raise ValueError(
        f"Rule.stack_axes must be the leading axes (0,), (0, 1), ... or (), "
        f"got {stack_axes!r} (rule {pattern!r})")
  return tuple(int(a) for a in axes)


def _rule_output_axis(output_axis, pattern) -> int:
  """``Rule.output_axis`` as an int; ValueError if it is not an integer."""
  if not _is_int(output_axis):
    raise ValueError(f"Rule.output_axis must be an int (an axis of one slice) "
                     f"or None, got {output_axis!r} (rule {pattern!r})")
  return int(output_axis)


class LeafPlan(NamedTuple):
  """What happens to one leaf: its path, mode and gamma (None = global), its
  number of leading stack axes (0: one layer) and the output-channel axis of
  one slice (-1: the last)."""
  path: str
  mode: Mode
  gamma: Optional[float]
  source: str  # "default", "rule <i>: <pattern>" or "select"
  stack_ndim: int = 0
  output_axis: int = -1

  def __repr__(self):
    stacked = f", stack_ndim={self.stack_ndim}" if self.stack_ndim else ""
    axis = f", output_axis={self.output_axis}" if self.output_axis != -1 else ""
    return (f"LeafPlan(path={self.path!r}, mode={self.mode!r}, "
            f"gamma={self.gamma!r}, source={self.source!r}{stacked}{axis})")


Select = Callable[[str, Any], bool]
SelectionLike = Union[None, "Selection", Sequence[Rule], Select]
_DEFAULTS = ("paper", "all_but_last", "none")
# Flax's generated names: ``Conv_0`` (Linen), list / nnx.List indices ``0``.
_AUTO_NAME = re.compile(r"^(?:\d+|[A-Za-z][A-Za-z0-9]*_\d+)$")


def _natural_key(path: str):
  return [(0, int(t), "") if t.isdigit() else (1, 0, t)
          for t in re.split(r"(\d+)", path) if t]


def _is_layer_table(path: str, leaf, stack_ndim: int) -> bool:
  """A floating leaf whose slices (one layer each) have ``ndim >= 2``."""
  return (hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)
          and len(leaf.shape) - stack_ndim >= 2)


def is_kernel(path: str, leaf, stack_ndim: int = 0) -> bool:
  """A floating leaf with ``ndim >= 2`` that is not an embedding table, a
  bias (``DenseGeneral`` with several feature axes has 2-D biases) or a norm's
  ``scale`` (2-D only when stacked).

  For a stacked leaf (``stack_ndim`` leading axes of layers) one slice is
  judged, so stacked norms and biases (``(L, d)``) are not kernels. This is
  the shape test only; with a trace, :class:`Selection` also requires that
  the leaf enters a matrix multiply or a convolution as a weight.
  """
  return (_is_layer_table(path, leaf, stack_ndim)
          and path.rsplit("/", 1)[-1] not in _NOT_KERNELS)


# Leaf names that are never matmul weights, and names that say a leaf is one.
_NOT_KERNELS = ("embedding", "bias", "scale")
_KERNEL_NAMES = ("kernel", "weight", "weights", "w", "W")


def _check_selectable(path: str, leaf, reason: str, stack_ndim: int = 0):
  if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
    raise ValueError(f"{reason} selects leaf {path!r} of dtype "
                     f"{getattr(leaf, 'dtype', type(leaf))}; only floating-point "
                     "leaves can be ternarized")
  if int(np.prod(leaf.shape[stack_ndim:])) < 2:
    what = (f"shape {leaf.shape}" if not stack_ndim else
            f"shape {leaf.shape} (slices of shape {leaf.shape[stack_ndim:]})")
    raise ValueError(f"{reason} selects leaf {path!r} of {what}; "
                     "a ternarized leaf needs at least two elements (scalars "
                     "and empty leaves cannot be ternarized)")


def _check_stack(path: str, leaf, stack_ndim: int, source: str) -> None:
  """A stack of layers along ``stack_ndim`` leading axes must fit the leaf."""
  shape = tuple(getattr(leaf, "shape", ()))
  if stack_ndim >= len(shape):
    raise ValueError(
        f"{source} gives leaf {path!r} of shape {shape} {stack_ndim} stack axes "
        f"(axes {tuple(range(stack_ndim))}): out of range, a layer must keep at "
        "least one axis")
  if any(shape[a] == 0 for a in range(stack_ndim)):
    raise ValueError(
        f"{source} gives leaf {path!r} of shape {shape} a stack axis of length "
        "0: a stack must hold at least one layer")


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
      When it is :func:`~ec2t_jax.forward_order`'s result, what the trace
      showed is kept in ``traced``: the stacked leaves, each leaf's last use
      (a tied embedding is also the output layer) and the embedding lookups.
    traced: the :class:`~ec2t_jax.ForwardOrder` itself (set from ``order``).

  Example:
    >>> import ec2t_jax as ec2t
    >>> from ec2t_jax.models import small_cnn_example
    >>> ex = small_cnn_example()  # a small CNN (fixture): ex.model, ex.params, ex.x
    >>> order = ec2t.forward_order(lambda p, x: ex.model.apply({"params": p}, x),
    ...                            ex.params, ex.x)
    >>> tx = ec2t.ternarize_transform(
    ...     selection=ec2t.Selection(order=order))
  """
  rules: tuple[Rule, ...] = ()
  default: Union[Literal["paper", "all_but_last", "none"], Select] = "paper"
  order: Optional[tuple[str, ...]] = None
  traced: Any = dataclasses.field(default=None, repr=False, compare=False)

  def __post_init__(self):
    if self.traced is None:
      object.__setattr__(self, "traced", _trace_of_order(self.order))
    object.__setattr__(self, "rules", tuple(self.rules))
    _check_rules(self.rules)
    _check_default(self.default)
    if self.order is not None:
      object.__setattr__(self, "order", _checked_order(self.order))

  def leaf_rule(self, path: str) -> LeafPlan:
    """What applies to ``path`` if it is selected: the first matching rule's
    mode and gamma, else the default's ``("ternary", None, "default")``.

    Independent of the order and of the other leaves (unlike :meth:`plan`,
    which also decides *whether* a leaf is selected).

    Example:
      >>> from ec2t_jax import Selection, Rule
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

  def output_axis(self, path: str, leaf, stack_ndim: int = 0) -> int:
    """The output-channel axis of one slice of ``leaf``: the first matching
    rule's ``output_axis``, else the trace's, else the last (``-1``, also
    returned when the axis is the last one).

    Raises:
      ValueError: the rule's ``output_axis`` is out of range for the slice.
    """
    ndim = len(getattr(leaf, "shape", ())) - stack_ndim
    for index, rule in enumerate(self.rules):
      if re.search(rule.pattern, path):
        if rule.output_axis is None:
          break
        if not -ndim <= rule.output_axis < ndim:
          raise ValueError(
              f"Rule {index} ({rule.pattern!r}, output_axis={rule.output_axis}) is out "
              f"of range for leaf {path!r} of shape {tuple(leaf.shape)}: one "
              f"{'slice' if stack_ndim else 'layer'} has {ndim} axes")
        axis = rule.output_axis % ndim
        return -1 if axis == ndim - 1 else axis
    if self.traced is not None:
      return getattr(self.traced, "output_axes", {}).get(path, -1)
    return -1

  def stack_ndim(self, path: str, leaf) -> int:
    """How many leading axes of ``leaf`` stack layers: the first matching
    rule's ``stack_axes``, else the trace's (``order``), else 0.

    Raises:
      ValueError: the rule's ``stack_axes`` disagree with the trace, are out
        of range for the leaf, or a stack axis has length 0.
    """
    traced = self.traced
    seen = traced is not None and path in traced
    from_trace = traced.stack_ndim.get(path, 0) if seen else None
    for index, rule in enumerate(self.rules):
      if re.search(rule.pattern, path):
        if rule.stack_axes is None:
          break
        source = f"Rule {index} ({rule.pattern!r}, stack_axes={rule.stack_axes})"
        if from_trace is not None and from_trace != len(rule.stack_axes):
          raise ValueError(
              f"{source} disagrees with the traced computation for leaf {path!r} "
              f"of shape {tuple(leaf.shape)}: the trace shows "
              + (f"{from_trace} stack axes {tuple(range(from_trace))} (a scan "
                 "slices it)" if from_trace else "no stack axis (no scan slices it)"))
        _check_stack(path, leaf, len(rule.stack_axes), source)
        return len(rule.stack_axes)
    if from_trace:
      _check_stack(path, leaf, from_trace, "The traced computation (order)")
    return from_trace or 0

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
    stacks = [self.stack_ndim(p, l) if hasattr(l, "shape") else 0
              for p, l in zip(paths, leaves)]
    by_rule, claimed = self._rule_plans(paths, leaves, stacks)
    # Called here, not in a helper: its warning's stacklevel points at plan's caller.
    chosen = self._default_indices(params, flat, paths, leaves, stacks)
    by_default = self._default_plans(chosen, paths, leaves, stacks, claimed)
    plans: list[Optional[LeafPlan]] = [by_rule.get(i, by_default.get(i))
                                       for i in range(len(leaves))]
    if self.traced is None and not callable(self.default):
      _warn_untraced([p for p in plans if p is not None and p.source == "default"],
                     dict(zip(paths, leaves)))
    elif not callable(self.default) and self.default != "none":
      self._warn_unmultiplied(paths, leaves, stacks, claimed)
    if not any(plans):
      raise ValueError(
          "No leaf is selected for ternarization. The paper's rule keeps the "
          "first and last kernel in full precision; pass selection=[Rule(...)]"
          " to choose leaves explicitly. Paths: " + ", ".join(paths))
    return plans

  def _checked_plan(self, path, leaf, stack, mode, gamma, source, chooser) -> LeafPlan:
    """The plan of a leaf that ``chooser`` selected; ValueError if it cannot be ternarized."""
    _check_selectable(path, leaf, chooser, stack)
    return LeafPlan(path, mode, gamma, source, stack, self.output_axis(path, leaf, stack))

  def _rule_plans(self, paths, leaves, stacks) -> tuple[dict[int, LeafPlan], list[bool]]:
    """``({leaf index: plan} of the leaves the rules select, which leaves a
    rule claims)``: the first matching rule claims a leaf (``"skip"`` too)."""
    plans: dict[int, LeafPlan] = {}
    claimed = [False] * len(leaves)
    for index, rule in enumerate(self.rules):
      for i in _rule_hits(index, rule, paths, claimed):
        claimed[i] = True
        if rule.mode != "skip":
          plans[i] = self._checked_plan(
              paths[i], leaves[i], stacks[i], rule.mode, rule.gamma,
              f"rule {index}: {rule.pattern}", f"Rule {index} ({rule.pattern!r})")
    return plans, claimed

  def _default_plans(self, chosen, paths, leaves, stacks,
                     claimed) -> dict[int, LeafPlan]:
    """``{leaf index: plan}`` of the leaves the default ``chosen`` that no
    rule claimed."""
    return {i: self._checked_plan(paths[i], leaves[i], stacks[i], "ternary", None,
                                  "default", "The default selection")
            for i in chosen if not claimed[i]}

  def _default_indices(self, params, flat, paths, leaves, stacks) -> list[int]:
    if self.default == "none":
      return []
    if callable(self.default):
      return [i for i, (p, l) in enumerate(zip(paths, leaves))
              if self.default(p, l)]
    layers, embeddings = self._layers(paths, leaves, stacks)
    layers = self._forward_sorted(layers, params, flat, paths,
                                  require=[i for i in layers if i not in embeddings])
    if not layers:
      return []
    drop = {self._last_layer(layers, paths)}
    if self.default == "paper":
      drop.add(layers[0])
    return [i for i in layers if i not in drop and i not in embeddings]

  def _layers(self, paths, leaves, stacks) -> tuple[list[int], set[int]]:
    """``(kernels and embedding tables, the embedding tables)``, leaf indices."""
    lookups = self.traced.lookups if self.traced is not None else frozenset()
    embeddings = {i for i, (p, l, k) in enumerate(zip(paths, leaves, stacks))
                  if _is_layer_table(p, l, k)
                  and (p.rsplit("/", 1)[-1] == "embedding" or p in lookups)}
    layers = [i for i, (p, l, k) in enumerate(zip(paths, leaves, stacks))
              if i in embeddings or (is_kernel(p, l, k) and self._multiplied(p))]
    return layers, embeddings

  def _warn_unmultiplied(self, paths, leaves, stacks, claimed) -> None:
    """Warns about leaves named and shaped like kernels that the trace saw in
    use but never as a matmul or convolution weight (left unselected): a
    weight prepared by an operation the trace does not follow would
    otherwise be dropped in silence."""
    traced = self.traced
    if not hasattr(traced, "output_axes"):
      return
    odd = [p for p, l, k, c in zip(paths, leaves, stacks, claimed)
           if not c and p in traced and p not in traced.output_axes
           and p.rsplit("/", 1)[-1] in _KERNEL_NAMES and is_kernel(p, l, k)]
    if odd:
      warnings.warn(
          f"Selection: the trace uses {', '.join(repr(p) for p in odd[:6])}"
          f"{' and more' if len(odd) > 6 else ''}, named like kernels, but never as the "
          "weight of a matrix multiply or a convolution, so the default does not select "
          "them. If they are weights, select them with Rule(pattern) (and "
          "output_axis=... if their output axis is not the last)", stacklevel=4)

  def _multiplied(self, path: str) -> bool:
    """Whether the trace shows ``path`` entering a matmul or a convolution as
    a weight (true without a trace, and for paths the trace never saw, which
    :meth:`_forward_sorted` reports as missing from the order)."""
    traced = self.traced
    if traced is None or not hasattr(traced, "output_axes"):
      return True
    return path in traced.output_axes or path not in traced.all_paths

  def _last_layer(self, layers: list[int], paths) -> int:
    """The output layer: the last one *used* (a tied embedding's head) when
    the trace says, else the last in forward order."""
    last_use = self.traced.last_use if self.traced is not None else {}
    if last_use and all(paths[i] in last_use for i in layers):
      return max(layers, key=lambda i: last_use[paths[i]])
    return layers[-1]

  def _forward_sorted(self, kernels, params, flat, paths, require=None) -> list[int]:
    """``kernels`` (leaf indices) sorted by forward order, best source first.

    Every index of ``require`` (default: all) must be in ``order``; others
    missing from it (an unused embedding table) are left out.
    """
    if self.order is not None:
      return self._sorted_by_order(kernels, paths, require)
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

  def _sorted_by_order(self, kernels, paths, require=None) -> list[int]:
    """``kernels`` sorted by ``self.order``; every one of ``require`` must be in it."""
    position = {p: k for k, p in enumerate(self.order)}
    required = kernels if require is None else require
    missing = [paths[i] for i in required if paths[i] not in position]
    if missing:
      shown = ", ".join(repr(p) for p in self.order[:4])
      raise ValueError(
          f"Selection.order lacks the kernel {missing[0]!r}"
          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
          + f"; the order holds {shown}{', ...' if len(self.order) > 4 else ''}. "
          "Compute it with ec2t.forward_order(fn, params, *example_args) on "
          "the same tree the optimizer sees, or choose leaves with Rule(...)")
    return sorted((i for i in kernels if paths[i] in position),
                  key=lambda i: position[paths[i]])


def _trace_of_copy(order):
  """The :class:`~ec2t_jax.ForwardOrder` a copy (``list(order)``) came from, if
  it is an unchanged copy; ``None`` for plain paths.

  Raises:
    ValueError: ``order`` is an edited copy of a traced order (what the trace
      showed cannot be kept for other paths, and is not dropped in silence).
  """
  traces = {id(getattr(p, "trace", None)): getattr(p, "trace", None) for p in order}
  traces.pop(id(None), None)
  if not traces:
    return None
  (trace,) = traces.values() if len(traces) == 1 else (None,)
  if trace is not None and list(order) == list(trace) and all(
      getattr(p, "trace", None) is trace for p in order):
    return trace
  raise ValueError(
      "Selection.order is an edited copy of ec2t.forward_order's result (reordered, "
      "filtered or mixed with other paths): what the trace showed (stacked "
      "layers, the tied head's last use, embedding lookups, which leaves are "
      "multiplied and their output axes) would not match it. Pass "
      "forward_order's result itself (or list(order) unchanged), or plain "
      "strings ([str(p) for p in order]) to give the trace up deliberately")


def _rule_hits(index: int, rule: Rule, paths, claimed) -> list[int]:
  """Indices of the unclaimed ``paths`` that ``rule`` matches; ValueError if none."""
  compiled = re.compile(rule.pattern)
  hits = [i for i, p in enumerate(paths) if not claimed[i] and compiled.search(p)]
  if not hits:
    raise ValueError(
        f"Rule {index} (pattern {rule.pattern!r}) selects no leaf. Paths: "
        + ", ".join(paths))
  return hits


def _trace_of_order(order):
  """The trace ``Selection.order`` carries: itself (a ForwardOrder), that of a
  copy of one, or None."""
  if hasattr(order, "stack_ndim"):
    return order
  if order is not None and not isinstance(order, str):
    return _trace_of_copy(order)
  return None


def _check_rules(rules) -> None:
  """Raises TypeError unless every element of ``Selection.rules`` is a Rule."""
  for rule in rules:
    if not isinstance(rule, Rule):
      raise TypeError(f"Selection.rules must hold Rule objects, got {rule!r}")


def _check_default(default) -> None:
  """Raises ValueError unless ``Selection.default`` is a known name or a callable."""
  if not (callable(default) or default in _DEFAULTS):
    raise ValueError(f"Selection.default must be one of {_DEFAULTS} or a "
                     f"callable (path, leaf) -> bool, got {default!r}")


def _checked_order(order) -> tuple[str, ...]:
  """``Selection.order`` as a tuple of distinct path strings (else TypeError or
  ValueError)."""
  if isinstance(order, str):
    raise TypeError("Selection.order must be a sequence of paths, got the "
                    f"string {order!r}")
  order = tuple(order)
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
  return order


def _bias_looks_stacked(path: str, leaves: dict) -> bool:
  """Whether a bias of 2+ axes does not match the trailing axes of its
  sibling kernel (as a bias with a leading layer axis does not)."""
  parent = path.rpartition("/")[0]
  shape = tuple(getattr(leaves[path], "shape", ()))
  kernel = leaves.get(f"{parent}/kernel" if parent else "kernel")
  kshape = tuple(getattr(kernel, "shape", ()))
  return kernel is not None and kshape[-len(shape):] != shape


def _stack_evidence(leaves: dict) -> list[str]:
  """Paths of norm scales and biases that look like stacks of layers (a
  leading layer axis)."""
  evidence = []
  for path, leaf in leaves.items():
    name = path.rpartition("/")[2]
    ndim = len(tuple(getattr(leaf, "shape", ())))
    if name == "scale" and ndim >= 2:
      evidence.append(path)
    elif name == "bias" and ndim >= 2 and _bias_looks_stacked(path, leaves):
      evidence.append(path)
  return evidence


def _stacked_kernels(default_plans, leaves: dict, evidence) -> list[str]:
  """Default-selected paths of 3+ axes, not known as stacked, whose leading
  axis and top-level name match the stack ``evidence``."""
  lengths = {tuple(leaves[p].shape)[0] for p in evidence}
  tops = {p.split("/")[0] for p in evidence}
  return [p.path for p in default_plans if not p.stack_ndim
          and len(leaves[p.path].shape) >= 3 and leaves[p.path].shape[0] in lengths
          and p.path.split("/")[0] in tops]


def _shown(paths, leaves: dict, limit: int) -> str:
  """The first ``limit`` paths with their shapes, and how many more."""
  return ", ".join(f"{p!r} {tuple(leaves[p].shape)}" for p in paths[:limit]) + (
      f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _stack_message(default_plans, leaves: dict) -> Optional[str]:
  """The warning about default-selected kernels that look like stacks of
  layers, or None."""
  evidence = _stack_evidence(leaves)
  stacked = _stacked_kernels(default_plans, leaves, evidence) if evidence else []
  if not stacked:
    return None
  return (
      f"leaves that look like stacks of layers (a leading layer axis, as "
      f"nn.scan / nnx.vmap make): {_shown(evidence, leaves, 4)}; the kernels "
      f"{_shown(stacked, leaves, 4)} would each be quantized as ONE layer (one set of "
      "statistics for all the layers in it). Pass the trace (it finds the scan): Selection(order=ec2t.forward_order"
      "(fn, params, *example_args)), or Rule(pattern, stack_axes=(0,))")


def _unnamed_message(default_plans, leaves: dict) -> Optional[str]:
  """The warning about default-selected leaves not named like matmul
  weights, or None."""
  unnamed = [p.path for p in default_plans
             if p.path.rsplit("/", 1)[-1] not in _KERNEL_NAMES]
  if not unnamed:
    return None
  return (
      f"leaves selected by shape alone whose names do not say they are matmul "
      f"weights: {_shown(unnamed, leaves, 6)}; a class token (1, 1, d) or a position embedding "
      "(1, N, d) is added to the activations, never multiplied, and should not "
      "be ternarized. Pass the trace, which selects only leaves that enter a "
      "matrix multiply or a convolution: Selection(order=ec2t.forward_order(fn, "
      "params, *example_args)), or skip them with Rule(pattern, mode='skip')")


def _warn_untraced(default_plans, leaves: dict) -> None:
  """Without a trace the default judges by shape and name; warns (naming the
  leaves) where that may be wrong: stacks of layers (norm scales or biases
  with a leading layer axis) and selected leaves whose names do not say
  they are matmul weights (class tokens, position embeddings)."""
  messages = [m for m in (_stack_message(default_plans, leaves),
                          _unnamed_message(default_plans, leaves)) if m]
  if messages:
    warnings.warn("Selection without a trace (the default judges leaves by shape "
                  "and name): " + "; ".join(messages), stacklevel=4)


def layer_ranks(selection: "Selection", params) -> dict[str, np.ndarray]:
  """Selected path -> forward rank of each of its layers (flat over slices).

  The selected leaves in forward order, each slice of a stacked leaf a layer
  of its own. Consecutive stacked leaves with the same stack shape (the
  kernels of one scanned block) interleave as the unrolled model would run
  them: slice 0 of each, then slice 1 of each, ...

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import Selection, Rule
    >>> from ec2t_jax._src.core.selection import layer_ranks  # internal
    >>> params = {"a": {"kernel": jnp.ones((2, 2))},
    ...           "b": {"kernel": jnp.ones((3, 2, 2))},
    ...           "c": {"kernel": jnp.ones((3, 2, 2))}}
    >>> ranks = layer_ranks(Selection([Rule("^[bc]/", stack_axes=(0,)),
    ...                                Rule("^a/")]), params)
    >>> {k: v.tolist() for k, v in ranks.items()}
    {'a/kernel': [0], 'b/kernel': [1, 3, 5], 'c/kernel': [2, 4, 6]}
  """
  plans = selection.plan(params)
  flat, _ = jax.tree_util.tree_flatten_with_path(pure_tree(params))
  paths = [path_to_str(p) for p, _ in flat]
  selected = [i for i, plan in enumerate(plans) if plan is not None]
  ordered = selection._forward_sorted(selected, params, flat, paths)  # pylint: disable=protected-access
  stack = lambda i: tuple(np.shape(flat[i][1]))[:plans[i].stack_ndim]
  ranks, base, k = {}, 0, 0
  while k < len(ordered):
    run = [ordered[k]]
    while (stack(run[0]) and k + len(run) < len(ordered)
           and stack(ordered[k + len(run)]) == stack(run[0])):
      run.append(ordered[k + len(run)])
    n = int(np.prod(stack(run[0])))
    for j, i in enumerate(run):
      ranks[paths[i]] = base + j + len(run) * np.arange(n)
    base += n * len(run)
    k += len(run)
  return ranks


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
  """A table of every leaf: path, shape, dtype, mode, gamma and why (and the
  output axis, ``-1`` = the last, when some selected leaf's is another).

  Example:
    >>> from ec2t_jax import Rule, describe_selection
    >>> from ec2t_jax.models import small_cnn_example
    >>> params = small_cnn_example().params  # a small CNN (fixture)
    >>> print(describe_selection(params, [Rule("Conv_0", mode="ecp")]))
    path            shape         dtype    mode     gamma   selected by
    Conv_0/bias     (4,)          float32  ecp      global  rule 0: Conv_0
    Conv_0/kernel   (3, 3, 1, 4)  float32  ecp      global  rule 0: Conv_0
    Conv_1/bias     (8,)          float32  -        -       -
    Conv_1/kernel   (3, 3, 4, 8)  float32  ternary  global  default
    Dense_0/bias    (16,)         float32  -        -       -
    Dense_0/kernel  (8, 16)       float32  ternary  global  default
    Dense_1/bias    (10,)         float32  -        -       -
    Dense_1/kernel  (16, 10)      float32  -        -       -
  """
  plans = as_selection(selection).plan(params)
  flat, _ = jax.tree_util.tree_flatten_with_path(pure_tree(params))
  # The output-axis column only where some leaf's is not the last axis.
  axes = any(plan is not None and plan.output_axis != -1 for plan in plans)
  rows = [("path", "shape", "dtype", "mode", "gamma") + (("out axis",) if axes else ())
          + ("selected by",)]
  for (path, leaf), plan in zip(flat, plans):
    axis = (str(plan.output_axis) if plan else "-",) if axes else ()
    rows.append((
        path_to_str(path), str(tuple(getattr(leaf, "shape", ()))),
        str(getattr(leaf, "dtype", type(leaf).__name__)),
        plan.mode if plan else "-",
        ("global" if plan.gamma is None else f"{plan.gamma:g}") if plan else "-",
        *axis, plan.source if plan else "-"))
  widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
  return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
                   for r in rows)
