"""Per-layer introspection of a ternarized model: ``ec2t.summary``."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import numpy as np

from ec2t_jax._src import state_access
from ec2t_jax._src import ternary
from ec2t_jax._src.trees import path_to_str


class LayerSummary(NamedTuple):
  """One selected leaf.

  ``sparsity`` is the fraction of zeros; ``entropy`` the zeroth-order entropy
  of the assignment in bits/weight; ``lam`` the lambda of the last assignment.
  """
  path: str
  shape: tuple[int, ...]
  mode: str
  sparsity: float
  w_n: float
  w_p: float
  lam: float
  entropy: float


@dataclasses.dataclass(frozen=True)
class Summary:
  """Per-layer rows plus totals; ``str()`` is a table, ``to_dict()`` is data.

  Totals: ``numel`` (selected weights), ``zeros``, ``sparsity`` (zeros over
  selected weights) and ``entropy`` (numel-weighted mean bits/weight).
  """
  layers: tuple[LayerSummary, ...]
  step: int
  frozen: bool

  @property
  def totals(self) -> dict:
    numel = sum(math.prod(l.shape) for l in self.layers)
    zeros = sum(round(l.sparsity * math.prod(l.shape)) for l in self.layers)
    bits = sum(l.entropy * math.prod(l.shape) for l in self.layers)
    return {"numel": numel, "zeros": zeros,
            "sparsity": zeros / numel if numel else 0.0,
            "entropy": bits / numel if numel else 0.0}

  def to_dict(self) -> dict:
    return {"step": self.step, "frozen": self.frozen,
            "layers": [l._asdict() for l in self.layers],
            "totals": self.totals}

  def __str__(self) -> str:
    header = ("path", "shape", "mode", "sparsity", "w_n", "w_p", "lambda",
              "bits/w")
    rows = [header] + [
        (l.path, "x".join(map(str, l.shape)), l.mode, f"{l.sparsity:.1%}",
         f"{l.w_n:.4g}", f"{l.w_p:.4g}", f"{l.lam:.3g}", f"{l.entropy:.3f}")
        for l in self.layers]
    t = self.totals
    rows.append(("total", str(t["numel"]), "", f"{t['sparsity']:.1%}", "", "",
                 "", f"{t['entropy']:.3f}"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    lines = ["  ".join(v.ljust(w) if c == 0 else v.rjust(w)
                       for c, (v, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(-1, "-" * len(lines[0]))
    phase = "phase 2 (assignment frozen)" if self.frozen else "phase 1"
    return f"EC2T summary at step {self.step}, {phase}\n" + "\n".join(lines)


def summary(opt_state) -> Summary:
  """Summarises every ternarized (or ECP) leaf of an EC2T optimizer state.

  Args:
    opt_state: an optimizer state holding a :class:`TernarizeState`, or an
      ``nnx.Optimizer``.

  Returns:
    A :class:`Summary`: ``print(s)`` for a table, ``s.layers`` / ``s.totals``
    / ``s.to_dict()`` as data.

  Example:
    >>> print(ec2t.summary(opt_state))
  """
  state = state_access.find_ternarize_state(opt_state)
  flat, treedef = jax.tree_util.tree_flatten_with_path(state.latent)
  fields = [treedef.flatten_up_to(t) for t in
            (state.w_n, state.w_p, state.assignment, state.lam, state.ecp)]
  layers = []
  for (path, latent), (w_n, w_p, a, lam, ecp) in zip(flat, zip(*fields)):
    a = np.asarray(a)
    layers.append(LayerSummary(
        path=path_to_str(path), shape=tuple(latent.shape),
        mode="ecp" if bool(ecp) else "ternary",
        sparsity=float(np.mean(a == 0)), w_n=float(w_n), w_p=float(w_p),
        lam=float(lam), entropy=float(ternary.ternary_entropy(a))))
  return Summary(tuple(layers), int(state.count), bool(state.frozen))
