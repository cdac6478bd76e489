"""The final one-screen report: full precision vs EC2T ternary.

Sizes are computed from the EC2T summary: a ternarized layer stored as 2-bit
codes plus two 16-bit centroids ("2-bit packed"), or at its zeroth-order
entropy plus the centroids ("entropy bound", what an ideal entropy coder
reaches); every other parameter stays float32.

Example:
  >>> from common.report import model_sizes
  >>> sizes = model_sizes(total_params=1000, layers=[(800, 1.0)])
  >>> round(sizes["ratio_entropy"], 3)
  0.226
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ec2t_jax._src.core.budget import unreachable_message


def model_sizes(total_params: int, layers: Sequence[tuple[int, float]]) -> dict[str, float]:
  """Bits of the model in float32, 2-bit packed and at the entropy bound.

  Args:
    total_params: All parameters of the model.
    layers: ``(numel, entropy_bits_per_weight)`` of each ternarized layer.

  Returns:
    ``float32_bits``, ``packed_bits``, ``entropy_bits`` and their ratios to float32.
  """
  ternary = sum(n for n, _ in layers)
  other_bits = 32 * (total_params - ternary)
  packed = other_bits + sum(2 * n + 32 for n, _ in layers)
  entropy = other_bits + sum(n * h + 32 for n, h in layers)
  float32 = 32 * total_params
  return {"float32_bits": float32, "packed_bits": packed, "entropy_bits": entropy,
          "ratio_packed": packed / float32, "ratio_entropy": entropy / float32}


def _kib(bits: float) -> str:
  return f"{bits / 8 / 1024:,.1f} KiB"


def budget_rows(budget: dict | None) -> list[tuple[str, str, str]]:
  """The size budget's rows: target, reached size and the controller's multiplier, and a
  line saying so when the target is not reachable (``BudgetState.unreachable``)."""
  if not budget:
    return []
  fmt = (lambda v: f"{v:,.0f} bytes") if budget["kind"] == "bytes" else (lambda v: f"{v:.4g}")
  rows = [(f"size budget ({budget['kind']})", "",
           f"target {fmt(budget['target'])}, reached {fmt(budget['reached'])}, "
           f"multiplier {budget['multiplier']:.3f}")]
  unreachable = unreachable_message(budget)
  if unreachable is not None:
    rows.append(("size budget", "", unreachable))
  return rows


def _knobs(r: dict[str, Any], method: str) -> str:
  """EC2T's gamma or budget; another method's options that differ from their defaults."""
  if method == "ec2t":
    return f"{r['budget']['kind']} budget" if r.get("budget") else f"gamma={r['gamma']:g}"
  from common import methods  # pylint: disable=g-import-not-at-top
  try:
    defaults = methods.option_defaults(method)
  except Exception:  # pylint: disable=broad-except  (a method no longer registered)
    defaults = {}
  return ", ".join(f"{k}={v}" for k, v in r.get("method_options", {}).items()
                   if k not in defaults or defaults[k] != v)


def _size_rows(r: dict[str, Any], ternary: bool) -> list[tuple[str, str, str]]:
  sizes = r["sizes"]
  rows = []
  if ternary:
    rows.append(("model size, 2-bit packed", _kib(sizes["float32_bits"]),
                 f"{_kib(sizes['packed_bits'])}  ({sizes['ratio_packed']:.3f}x float32)"))
  rows.append(("model size, entropy bound", "" if ternary else _kib(sizes["float32_bits"]),
               f"{_kib(sizes['entropy_bits'])}  ({sizes['ratio_entropy']:.3f}x float32)"))
  if r.get("export_bytes"):
    rows.append(("exported file (ec2t.export)", "", f"{r['export_bytes']:,} bytes"))
  return rows + budget_rows(r.get("budget"))


def _time_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
  fp_s, ec2t_s = r.get("fp_seconds_per_epoch"), r.get("ec2t_seconds_per_epoch")
  rows = []
  if r.get("posttrain_seconds") is not None:
    rows.append(("post-training time", "-", f"{r['posttrain_seconds']:.2f} s"))
  if fp_s and ec2t_s:
    rows.append(("train time per epoch", f"{fp_s:.2f} s", f"{ec2t_s:.2f} s  ({ec2t_s / fp_s:.2f}x)"))
  elif ec2t_s:
    rows.append(("train time per epoch", "-", f"{ec2t_s:.2f} s"))
  return rows


def format_report(results: dict[str, Any]) -> str:
  """Renders the results dict of :func:`common.pipeline.run` as a short table."""
  r = results
  fp, tern = r["fp_test_accuracy"], r["ternary_test_accuracy"]
  method = r.get("method", "ec2t")
  name = "EC2T" if method == "ec2t" else method.upper() if len(method) <= 4 else method
  ternary = r.get("ternary", True)  # False: more levels or full-precision survivors
  kind = "ternarized" if ternary else "compressed"
  rows = [
      ("", "full precision", f"{name} ternary" if ternary else name),
      ("test accuracy", f"{100 * fp:.2f}%", f"{100 * tern:.2f}%  ({100 * (tern - fp):+.2f} pts)"),
      (f"{kind} layers", "-", f"{r['ternary_layers']} layers, {r['ternary_weights']:,} weights"),
      (f"sparsity of {kind} layers", "-", f"{100 * r['sparsity']:.1f}%"),
      (f"bits/weight, {kind} (entropy)", "32", f"{r['bits_per_weight']:.3f}"),
  ] + _size_rows(r, ternary) + _time_rows(r)
  widths = [max(len(row[c]) for row in rows) for c in range(3)]
  knobs = _knobs(r, method)
  title = f" {name}: {r['model']} on {r['dataset']}" + (f", {knobs} " if knobs else " ")
  lines = [title.center(sum(widths) + 4, "=")]
  lines += [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c}" for a, b, c in rows]
  lines.append("=" * (sum(widths) + 4))
  return "\n".join(lines)
