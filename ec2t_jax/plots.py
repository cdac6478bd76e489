"""Plots of EC2T layers (matplotlib, PNG): weight histograms with decision boundaries, per-layer bars.

Figures are built with :class:`matplotlib.figure.Figure` directly (no
``pyplot``), so nothing changes the global backend; ``savefig`` renders with
Agg.

Decision boundaries come from the training step's own pure functions:
``lambda`` and ``I`` from ``ternary.entropy_constrained_lambda``, the
thresholds ``b_n, b_p`` from ``ternary.zero_boundaries`` (formula there);
``gamma = 0`` gives the midpoints ``-w_n / 2`` and ``w_p / 2``.

Example:
  >>> import numpy as np
  >>> from ec2t_jax.plots import save_figure, weight_histogram
  >>> latent = np.random.default_rng(0).normal(0.0, 0.2, 1000)  # a layer's latent weights
  >>> fig = weight_histogram(latent, 0.2, 0.25, gammas=(0.0, 0.15))
  >>> save_figure(fig, "layer.png")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

DEFAULT_GAMMAS = (0.0, 0.125, 0.15, 0.175)


class Boundaries(NamedTuple):
  """Where the assignment switches: ``(negative, positive)`` thresholds and the lambda."""
  negative: float
  positive: float
  lam: float


def decision_boundaries(weights, w_n: float, w_p: float, gamma: float,
                        size_decay: float = 1.0) -> Boundaries:
  """EC2T's zero-cluster boundaries of one layer for one ``gamma``.

  Uses :mod:`ec2t_jax._src.methods.ec2t.ternary` for the probabilities (with EC2T's guards)
  and ``lambda_max``, exactly as the training step does.

  Args:
    weights: latent weights of the layer.
    w_n, w_p: centroid magnitudes.
    gamma: the global knob.
    size_decay: the layer's size-decay factor.

  Returns:
    :class:`Boundaries`; weights strictly between them are assigned zero.
  """
  from ec2t_jax._src.methods.ec2t import ternary  # JAX only when plotting boundaries
  w = np.asarray(weights, np.float32)
  lam, info = ternary.entropy_constrained_lambda(w, w_n, w_p, gamma=gamma,
                                                 size_decay=size_decay)
  negative, positive = ternary.zero_boundaries(w_n, w_p, lam, info)
  return Boundaries(float(negative), float(positive), float(lam))


def weight_histogram(weights, w_n: float, w_p: float, *, gammas: Sequence[float] = DEFAULT_GAMMAS,
                     size_decay: float = 1.0, bins: int = 120, ax=None,
                     title: Optional[str] = None):
  """Histogram of a layer's (latent) weights with centroids and decision boundaries.

  Args:
    weights: the layer's latent or pretrained weights.
    w_n, w_p: centroid magnitudes (drawn at ``-w_n`` and ``w_p``).
    gammas: one pair of boundaries per gamma.
    size_decay: the layer's size-decay factor.
    bins: histogram bins.
    ax: a matplotlib Axes to draw into (default: a new Figure).
    title: axes title.

  Returns:
    The Figure drawn into.
  """
  if ax is None:
    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    ax = fig.add_subplot()
  else:
    fig = ax.figure
  w = np.asarray(weights, np.float32).reshape(-1)
  ax.hist(w, bins=bins, color="0.7", edgecolor="none")
  ax.axvline(-w_n, color="tab:blue", lw=2, label=f"-w_n = {-w_n:.3g}")
  ax.axvline(w_p, color="tab:red", lw=2, label=f"w_p = {w_p:.3g}")
  colors = ["k", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:cyan"]
  for i, gamma in enumerate(gammas):
    b = decision_boundaries(w, w_n, w_p, gamma, size_decay)
    zeros = np.mean((w > b.negative) & (w < b.positive))
    color = colors[i % len(colors)]
    ax.axvline(b.negative, color=color, ls="--", lw=1)
    ax.axvline(b.positive, color=color, ls="--", lw=1,
               label=f"gamma={gamma:g}: {zeros:.0%} zero")
  ax.set_xlabel("weight")
  ax.set_ylabel("count")
  ax.legend(fontsize="x-small", loc="upper right")
  if title:
    ax.set_title(title, fontsize="small")
  return fig


def layer_bars(report: dict, *, ternary_only: bool = False):
  """Per-layer sparsity and entropy bars from a :func:`ec2t_jax.report.build_report` dict.

  Top: sparsity. Bottom: zeroth-order entropy and achieved bits/weight of the
  ternary layers (``log2 3`` and 2 bits drawn for reference).

  Returns:
    The Figure.
  """
  layers = [l for l in report["layers"] if l["ternary"] or not ternary_only]
  names = [l["path"] for l in layers]
  x = np.arange(len(layers))
  fig = Figure(figsize=(max(6.0, 0.35 * len(layers) + 2), 6.0), dpi=100)
  top, bottom = fig.subplots(2, 1, sharex=True)
  top.bar(x, [l["sparsity"] for l in layers],
          color=["tab:blue" if l["ternary"] else "0.6" for l in layers])
  top.set_ylabel("sparsity")
  top.set_ylim(0, 1)
  top.set_title(f"{report['source']}: sparsity {report['sparsity']:.1%} "
                "(grey: not ternary)", fontsize="small")
  entropy = [l["entropy_bits"] if l["entropy_bits"] is not None else np.nan for l in layers]
  achieved = [l["bits_per_weight"] if l["ternary"] and l["bits_per_weight"] is not None
              else np.nan for l in layers]
  bottom.bar(x - 0.2, entropy, width=0.4, label="zeroth-order entropy")
  bottom.bar(x + 0.2, achieved, width=0.4, label="achieved (packed)")
  bottom.axhline(np.log2(3), color="0.5", ls=":", lw=1, label="log2 3")
  bottom.set_ylabel("bits / weight")
  bottom.set_ylim(0, 2)
  bottom.legend(fontsize="x-small")
  bottom.set_xticks(x)
  bottom.set_xticklabels(names, rotation=90, fontsize="x-small")
  fig.tight_layout()
  return fig


class FrontPoint(NamedTuple):
  """One trained model on the accuracy-sparsity plane (see :func:`accuracy_sparsity_front`)."""
  method: str
  label: str
  sparsity: float
  accuracy: float


def _plot_method(ax, mine: Sequence[FrontPoint], method: str, color: str) -> None:
  """One method's points joined in order of sparsity, each labelled with its knob."""
  mine = sorted(mine, key=lambda p: p.sparsity)
  xs = [100 * p.sparsity for p in mine]
  ys = [100 * p.accuracy for p in mine]
  ax.plot(xs, ys, marker="o", color=color, label=method)
  for p, x, y in zip(mine, xs, ys):
    ax.annotate(p.label, (x, y), fontsize="xx-small", xytext=(3, 3), textcoords="offset points")


def _dominates(q: FrontPoint, p: FrontPoint) -> bool:
  """``q`` is at least as accurate and as sparse as ``p``, and better in one."""
  return (q.accuracy >= p.accuracy and q.sparsity >= p.sparsity
          and (q.accuracy > p.accuracy or q.sparsity > p.sparsity))


def pareto_front(points: Sequence[FrontPoint]) -> list[FrontPoint]:
  """The points no other point beats in both accuracy and sparsity.

  Example:
    >>> from ec2t_jax.plots import pareto_front, FrontPoint
    >>> [p.label for p in pareto_front([FrontPoint("a", "x", 0.5, 0.99),
    ...                                 FrontPoint("a", "y", 0.4, 0.98)])]
    ['x']
  """
  return [p for p in points if not any(_dominates(q, p) for q in points)]


def accuracy_sparsity_front(points: Sequence[FrontPoint], *, reference: Optional[float] = None,
                            title: Optional[str] = None):
  """Test accuracy against sparsity, one colour and line per method.

  Each method's points are joined in order of sparsity and labelled with their
  knob (``point.label``); the models no other model beats in both accuracy and
  sparsity (the Pareto front over all methods) are ringed.

  Args:
    points: the models, as :class:`FrontPoint` (accuracy and sparsity as fractions).
    reference: full-precision accuracy, drawn as a dashed line.
    title: axes title.

  Returns:
    The Figure.

  Example:
    >>> from ec2t_jax.plots import accuracy_sparsity_front, FrontPoint
    >>> fig = accuracy_sparsity_front([FrontPoint("ttq", "t=0.05", 0.4, 0.985)])
  """
  fig = Figure(figsize=(7.0, 4.5), dpi=100)
  ax = fig.subplots()
  methods = list(dict.fromkeys(p.method for p in points))
  for i, method in enumerate(methods):
    _plot_method(ax, [p for p in points if p.method == method], method, f"C{i % 10}")
  front = pareto_front(points)
  ax.scatter([100 * p.sparsity for p in front], [100 * p.accuracy for p in front], s=150,
             facecolors="none", edgecolors="k", lw=1, label="Pareto front")
  if reference is not None:
    ax.axhline(100 * reference, color="0.5", ls="--", lw=1, label="full precision")
  ax.set_xlabel("sparsity of the quantized layers (%)")
  ax.set_ylabel("test accuracy (%)")
  ax.legend(fontsize="x-small", loc="lower left")
  if title:
    ax.set_title(title, fontsize="small")
  fig.tight_layout()
  return fig


def save_figure(fig, path, dpi: int = 100) -> Path:
  """Writes ``fig`` as PNG to ``path`` (parent directories created)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, format="png", dpi=dpi)
  return path


def write_report_plots(report: dict, out_dir, *, source=None, latent=None,
                       keys: Sequence[str] = ("params",),
                       gammas: Sequence[float] = DEFAULT_GAMMAS) -> list[Path]:
  """Writes ``layer_bars.png`` and, with latent weights, ``histograms.png``.

  Args:
    report: :func:`ec2t_jax.report.build_report`'s dict.
    out_dir: directory for the PNGs.
    source: unused (kept for the CLI's call signature).
    latent: path or tree of latent / pretrained weights with the same leaf
      names as the report's ternary layers (e.g. ``resnet20_fp.npz`` for the
      official EC2T checkpoints); their histograms get the ternary model's
      centroids and the boundaries for ``gammas``.
    keys: checkpoint entries when ``latent`` is a checkpoint.
    gammas: gammas for the boundaries.

  Returns:
    The written paths.
  """
  del source
  out_dir = Path(out_dir)
  written = [save_figure(layer_bars(report), out_dir / "layer_bars.png")]
  if latent is None:
    return written
  from ec2t_jax._src.export import sources
  from ec2t_jax._src.methods.ec2t import ternary
  tree = sources.load_tree(latent, keys=tuple(keys)).tree if isinstance(latent, (str, Path)) \
      else latent
  flat = sources.flat_arrays(tree)
  layers = [l for l in report["layers"] if l["ternary"] and l["path"] in flat]
  if not layers:
    raise ValueError("the latent weights share no leaf name with the report's ternary layers")
  decay = ternary.layer_size_decay([l["numel"] for l in layers])
  cols = min(3, len(layers))
  rows = -(-len(layers) // cols)
  fig = Figure(figsize=(5.0 * cols, 3.0 * rows), dpi=80)
  axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
  for ax, layer, delta in zip(axes, layers, decay):
    weight_histogram(flat[layer["path"]], layer["w_n"], layer["w_p"], gammas=gammas,
                     size_decay=delta, ax=ax, title=f"{layer['path']} (delta={delta:.2f})")
  for ax in axes[len(layers):]:
    ax.set_visible(False)
  fig.tight_layout()
  written.append(save_figure(fig, out_dir / "histograms.png"))
  return written
