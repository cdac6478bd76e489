"""Per-layer introspection of a quantized model: ``ec2t.summary``.

Examples build their model, params or optimizer state with the fixture
:func:`ec2t_jax.models.small_cnn_example`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, NamedTuple, Optional

import jax
import numpy as np

from ec2t_jax._src import core
from ec2t_jax._src.core import state_access
from ec2t_jax._src.core.trees import path_to_str


def value_entropy(values) -> float:
  """Zeroth-order entropy of an array's values, in bits per element.

  .. math:: H = -\\sum_v P_v \\log_2 P_v

  over the distinct values ``v`` with their frequencies ``P_v``. For a
  ternary layer it equals :func:`~ec2t_jax.ternary_entropy` of its assignment.

  Example:
    >>> import numpy as np
    >>> from ec2t_jax import value_entropy
    >>> value_entropy(np.array([0.5, -0.2, 0.0, 0.0]))
    1.5
  """
  _, counts = np.unique(np.asarray(values).ravel(), return_counts=True)
  p = counts / counts.sum()
  return float(-(p * np.log2(p)).sum())


class LayerSummary(NamedTuple):
  """One selected leaf.

  ``sparsity`` is the fraction of zeros of the quantized value; ``entropy``
  the zeroth-order entropy of its values in bits/weight (of its ``codes()``
  where the leaf state has them, e.g. per-filter ternary grids); ``levels``
  the number of distinct values (codes); ``stats`` the method's own scalars (EC2T:
  ``w_n``, ``w_p``, ``lam``), also readable as attributes (``row.w_p``).
  """
  path: str
  shape: tuple[int, ...]
  mode: str
  sparsity: float
  entropy: float
  levels: int
  stats: dict

  def __getattr__(self, name):
    try:
      return self.stats[name]
    except KeyError:
      raise AttributeError(name) from None


@dataclasses.dataclass(frozen=True)
class Summary:
  """Per-layer rows plus totals; ``str()`` is a table, ``to_dict()`` is data.

  Totals: ``numel`` (selected weights), ``zeros``, ``sparsity`` (zeros over
  selected weights) and ``entropy`` (numel-weighted mean bits/weight).
  ``nonfinite_count`` and ``invalid_hyper_count`` count the skipped steps
  (see :class:`~ec2t_jax.QuantizerState`); ``off_grid_count`` the updates
  that found the params off the method's grid (:meth:`off_grid_message`). ``budget``: with a
  :class:`~ec2t_jax.Budget`, its ``kind``, ``target``, ``reached`` (the
  last assignment's size in the budget's units) and the controller's
  ``multiplier``; else None.
  """
  layers: tuple[LayerSummary, ...]
  step: int
  phase: int
  method: str = ""
  nonfinite_count: int = 0
  invalid_hyper_count: int = 0
  budget: Optional[dict] = None
  off_grid_count: int = 0

  @property
  def frozen(self) -> bool:
    return self.phase >= 1

  def off_grid_message(self) -> str:
    """What an ``off_grid_count > 0`` means and the fix ("" when it is 0)."""
    if not self.off_grid_count:
      return ""
    name = self.method or "the quantizer"
    return (f"params off the grid: {self.off_grid_count} of {self.step} updates found the "
            f"params holding other values than the {name} state (the rows above describe "
            "the state, not the params): something changed them after the quantizer's "
            "update, e.g. a transformation placed after it in the chain. Put the quantizer "
            "last: optax.chain(inner_optimizer, quantizer), e.g. "
            "optax.chain(optax.adam(1e-3), ec2t.ternarize_transform())")

  @property
  def totals(self) -> dict:
    numel = sum(math.prod(l.shape) for l in self.layers)
    zeros = sum(round(l.sparsity * math.prod(l.shape)) for l in self.layers)
    bits = sum(l.entropy * math.prod(l.shape) for l in self.layers)
    return {"numel": numel, "zeros": zeros,
            "sparsity": zeros / numel if numel else 0.0,
            "entropy": bits / numel if numel else 0.0}

  def to_dict(self) -> dict:
    return {"step": self.step, "phase": self.phase, "frozen": self.frozen,
            "nonfinite_count": self.nonfinite_count,
            "invalid_hyper_count": self.invalid_hyper_count,
            "off_grid_count": self.off_grid_count,
            "budget": self.budget,
            "layers": [l._asdict() for l in self.layers],
            "totals": self.totals}

  def __str__(self) -> str:
    stat_names = list(dict.fromkeys(k for l in self.layers for k in l.stats))
    header = ("path", "shape", "mode", "sparsity", *stat_names, "levels",
              "bits/w")
    fmt = lambda v: "" if v is None else f"{v:.4g}"
    rows = [header] + [
        (l.path, "x".join(map(str, l.shape)), l.mode, f"{l.sparsity:.1%}",
         *(fmt(l.stats.get(k)) for k in stat_names), str(l.levels),
         f"{l.entropy:.3f}") for l in self.layers]
    t = self.totals
    rows.append(("total", str(t["numel"]), "", f"{t['sparsity']:.1%}",
                 *([""] * (len(stat_names) + 1)), f"{t['entropy']:.3f}"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    lines = ["  ".join(v.ljust(w) if c == 0 else v.rjust(w)
                       for c, (v, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(-1, "-" * len(lines[0]))
    phase = ("phase 2 (assignment frozen)" if self.phase == 1
             else f"phase {self.phase + 1}")
    skipped = (f"skipped steps: {self.nonfinite_count} with non-finite updates,"
               f" {self.invalid_hyper_count} with invalid hyperparameters")
    off_grid = self.off_grid_message()
    return (f"{self.method} summary at step {self.step}, {phase}\n" + "\n".join(lines)
            + "\n" + skipped + self._budget_line()
            + (f"\nWARNING: {off_grid}" if off_grid else ""))

  def _budget_line(self) -> str:
    if not self.budget:
      return ""
    b = self.budget
    fmt = (lambda v: f"{v:,.0f} bytes") if b["kind"] == "bytes" else (lambda v: f"{v:.4g}")
    unreachable = core.budget.unreachable_message(b)
    return (f"\nbudget: {b['kind']} target {fmt(b['target'])}, reached {fmt(b['reached'])}"
            f" (multiplier {b['multiplier']:.4g})"
            + ("" if unreachable is None else f"\nbudget: {unreachable}"))


def _scalar(x: Any):
  x = np.asarray(x)
  return x.item() if x.size == 1 else float(np.mean(x))


def summary(opt_state) -> Summary:
  """Summarises every selected leaf of a method's optimizer state.

  A stacked leaf (layers along leading axes) gives one row per slice, named
  ``path[i]`` (``blocks/c_fc/kernel[3]``).

  Warns (``UserWarning``) when some update found the params off the method's
  grid (``off_grid_count > 0``: a transformation placed after the quantizer),
  with the fix; the table says so too.

  Args:
    opt_state: an optimizer state holding a :class:`QuantizerState` (any of
      the library's methods), or an ``nnx.Optimizer``.

  Returns:
    A :class:`Summary`: ``print(s)`` for a table, ``s.layers`` / ``s.totals``
    / ``s.to_dict()`` as data.

  Example:
    >>> import ec2t_jax as ec2t
    >>> from ec2t_jax.models import small_cnn_example
    >>> opt_state = small_cnn_example().opt_state  # a small CNN (fixture)
    >>> print(ec2t.summary(opt_state))  # doctest: +ELLIPSIS
    EC2T summary at step 0, phase 1
    path ...
    Conv_1/kernel   3x3x4x8  ternary ...
    Dense_0/kernel     8x16  ternary ...
    skipped steps: 0 with non-finite updates, 0 with invalid hyperparameters
  """
  state = state_access.find_quantizer_state(opt_state)
  states, treedef = core.flat_leaf_states(state.resolved_leaves())
  paths, _ = jax.tree_util.tree_flatten_with_path(
      treedef.unflatten([0] * len(states)))
  layers, methods = [], []
  for (path, _), state_of_leaf in zip(paths, states):
    if state_of_leaf is None:
      continue
    for suffix, leaf in _layers(state_of_leaf):
      layers.append(_row(path_to_str(path) + suffix, leaf, methods))
  budget = getattr(state, "budget", None)
  budget = None if budget is None else budget.describe()
  unreachable = core.budget.unreachable_message(budget)
  if unreachable is not None:  # the host's warning (the state holds the flag)
    warnings.warn(f"size budget: {unreachable}", UserWarning, stacklevel=2)
  result = Summary(tuple(layers), int(state.count), int(state.phase),
                   ", ".join(dict.fromkeys(methods)), int(state.nonfinite_count),
                   int(state.invalid_hyper_count), budget, int(state.off_grid_count))
  if result.off_grid_count:
    warnings.warn(result.off_grid_message(), stacklevel=2)
  return result


def _layers(leaf):
  """``(suffix, state)`` per layer: one per slice of a stacked leaf."""
  if isinstance(leaf, core.StackedLeaf):
    return list(leaf.slices())
  return [("", leaf)]


def _row(path: str, leaf, methods: list) -> LayerSummary:
  value = np.asarray(leaf.value(np.float32))
  codes = np.asarray(leaf.codes()) if hasattr(leaf, "codes") else value
  described = leaf.describe()
  methods.append(described.get("method", type(leaf).__name__))
  stats = {k: v for k, v in described.items() if k not in ("method", "mode")}
  return LayerSummary(
      path=path, shape=tuple(value.shape),
      mode=described.get("mode", methods[-1]),
      sparsity=float(np.mean(value == 0)), entropy=value_entropy(codes),
      levels=int(np.unique(codes).size),
      stats={k: _scalar(v) for k, v in stats.items()})
