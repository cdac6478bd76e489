r"""Plots training curves and per-layer EC2T sparsity of a run to PNG.

Reads ``<workdir>/metrics.jsonl`` (written by ``mnist_lenet.py`` and
``cifar_resnet.py``) and draws three panels along the epochs of all phases:
loss (train and validation), validation accuracy, and the sparsity of every
ternarized layer (phase 1 learns it, phase 2 keeps it)::

  python examples/plot_curves.py --workdir=runs/mnist_lenet5
  # -> runs/mnist_lenet5/curves.png
"""

from __future__ import annotations

import os

from absl import app
from absl import flags

from common.cli import UserError, report_user_errors
from common.metrics import read_jsonl

_PHASE_COLORS = {"fp": "tab:gray", "ec2t_phase1": "tab:blue", "ec2t_phase2": "tab:green"}


def define_flags(fv: flags.FlagValues) -> None:
  """Defines this script's flags on ``fv``."""
  flags.DEFINE_string("workdir", None, "Run folder holding metrics.jsonl.", flag_values=fv)
  flags.DEFINE_string("output", None, "PNG path (default: <workdir>/curves.png).",
                      flag_values=fv)


def _draw_phases(ax_loss, ax_acc, records: list[dict]) -> None:
  """Train and validation loss, validation accuracy: one colour per phase."""
  for phase, color in _PHASE_COLORS.items():
    idx = [i for i, r in enumerate(records) if r.get("phase") == phase]
    if not idx:
      continue
    train = [(i, records[i]["train_loss"]) for i in idx if "train_loss" in records[i]]
    if train:
      ax_loss.plot(*zip(*train), ".-", color=color, label=f"{phase} train")
    ax_loss.plot(idx, [records[i]["val_loss"] for i in idx], "--", color=color,
                 label=f"{phase} val")
    ax_acc.plot(idx, [100 * records[i]["val_accuracy"] for i in idx], "o-", color=color,
                label=phase)


def _draw_sparsity(ax, records: list[dict]) -> None:
  """Sparsity per layer and of all ternarized layers."""
  layers = sorted({k for r in records for k in r.get("layer_sparsity", {})})
  for layer in layers:
    pts = [(i, 100 * r["layer_sparsity"][layer]) for i, r in enumerate(records)
           if layer in r.get("layer_sparsity", {})]
    ax.plot(*zip(*pts), "o-", markersize=3, label=layer)
  totals = [(i, 100 * r["sparsity"]) for i, r in enumerate(records) if "sparsity" in r]
  if totals:
    ax.plot(*zip(*totals), "k-", linewidth=2.5, label="all ternarized")


def plot(records: list[dict], output: str, title: str = "") -> str:
  """Draws loss, accuracy and per-layer sparsity panels; returns the PNG path.

  Args:
    records: Per-epoch records as in ``metrics.jsonl`` (``phase``, ``epoch``,
      ``train_loss``, ``val_loss``, ``val_accuracy``, ``layer_sparsity``...).
    output: Where to write the PNG.
    title: Figure title.

  Returns:
    ``output``.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  if not records:
    raise UserError("no records to plot")
  xs = list(range(len(records)))  # one point per evaluated epoch, phases one after the other
  fig, (ax_loss, ax_acc, ax_sparsity) = plt.subplots(1, 3, figsize=(15, 4.2))
  _draw_phases(ax_loss, ax_acc, records)
  _draw_sparsity(ax_sparsity, records)
  for ax, label in ((ax_loss, "cross-entropy"), (ax_acc, "validation accuracy (%)"),
                    (ax_sparsity, "sparsity (%)")):
    ax.set_xlabel("evaluation (epochs of all phases in order)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  ax_loss.set_yscale("log")
  ax_sparsity.set_xlim(0, max(xs) + 0.5)
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  fig.savefig(output, dpi=110)
  plt.close(fig)
  return output


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  fv = flags.FLAGS
  if not fv.workdir:
    raise UserError("--workdir is required")
  path = os.path.join(fv.workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise UserError(f"{path} not found: is --workdir the folder of a run?")
  output = plot(read_jsonl(path), fv.output or os.path.join(fv.workdir, "curves.png"),
                title=os.path.basename(os.path.normpath(fv.workdir)))
  print(f"wrote {output}")


if __name__ == "__main__":
  define_flags(flags.FLAGS)
  app.run(report_user_errors(main))
