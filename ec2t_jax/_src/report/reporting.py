"""Building the size / sparsity / operation / energy report of a model (data and text).

Public through :mod:`ec2t_jax.report`; the counting rules are in
:mod:`ec2t_jax._src.report.accounting`, feature-map sizes in :mod:`ec2t_jax._src.report.geometry`.

A layer whose weights hold NaN or infinity is flagged (``"nonfinite"`` count in
its entry, a ``warnings`` line in the report and ``NONFINITE`` in the text
table): such a layer is never counted as ternary, and the flag says why.

Example:
  >>> from ec2t_jax.report import build_report
  >>> r = build_report("resnet20_ec2t_spars64.npz")  # doctest: +SKIP
  >>> round(r["sparsity"], 3), round(r["scoring_params"]), round(r["flops"] / 1e6, 1)  # doctest: +SKIP
  (0.639, 11810, 8.5)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple, Sequence, Union

import numpy as np

from ec2t_jax._src.report import accounting
from ec2t_jax._src.export import container
from ec2t_jax._src.export import sources
from ec2t_jax._src.export import stacking
from ec2t_jax._src.core import trees
from ec2t_jax._src.report.accounting import PAPER_RULES, CountingRules
from ec2t_jax._src.report.geometry import LayerGeometry, cifar_resnet_geometry, load_geometry
from ec2t_jax._src.report.leaf_statistics import (LeafStatistics, channel_code_entropy_bits,
                                                  leaf_statistics)

GeometryLike = Union[None, str, Path, Sequence[LayerGeometry]]


def _leaf_geometry(path: str, array: np.ndarray) -> LayerGeometry:
  """Stand-in geometry for a weight leaf when the architecture is unknown."""
  return LayerGeometry(path, "leaf", 0, array.shape[0] if array.ndim else 1, (1, 1), (0, 0),
                       in_axis=-1, out_axis=-1, bias=False, activation=None)


def _resolve_geometry(geometry: GeometryLike, flat, image_size: int):
  if geometry is None or (isinstance(geometry, str) and geometry == "none"):
    return None, None
  if isinstance(geometry, str) and geometry == "auto":
    layers = cifar_resnet_geometry({k: v.shape for k, v in flat.items()}, image_size=image_size)
    return layers, (f"CIFAR ResNet, built-in description ({image_size}x{image_size} input)"
                    if layers else None)
  if isinstance(geometry, (str, Path)):
    return load_geometry(geometry), f"geometry file {geometry}"
  return list(geometry), f"given geometry ({len(geometry)} layers)"


class _Source(NamedTuple):
  tree: Any
  kind: str
  name: str
  info: container.PackedInfo
  measured: str


def _per_slice(tree):
  """One layer per slice of a stacked leaf (``nn.scan`` blocks), as in the file."""
  leaves, structure = trees.flatten(tree)
  tree, _ = stacking.split_stacked(trees.unflatten([a for _, a in leaves], structure))
  return tree


def _load_source(source, keys, max_bytes, float16) -> _Source:
  """The tree (stacked leaves split per slice) and its packed-file header (a
  tree is packed in memory to measure it)."""
  if isinstance(source, (str, Path)):
    loaded = sources.load_tree(source, keys=keys, max_bytes=max_bytes)
    if loaded.info is not None:
      return _Source(_per_slice(loaded.tree), loaded.kind, loaded.path, loaded.info, "file")
    tree, kind, name = _per_slice(loaded.tree), loaded.kind, loaded.path
  else:
    tree, kind, name = _per_slice(source), "tree", "<tree>"
  info = container.read_info(container.pack(tree, float16=float16))
  return _Source(tree, kind, name, info, "in-memory pack")


def _layer_geometry(geometry: GeometryLike, flat, image_size: int):
  """``(layers to score, known geometry or None, architecture, notes)``."""
  layers_geo, architecture = _resolve_geometry(geometry, flat, image_size)
  if layers_geo is not None:
    return layers_geo, layers_geo, architecture, []
  notes = ["no architecture: storage counted per leaf without dead channels; "
           "op counts omitted (pass a geometry, see trace_geometry)"]
  geo = [_leaf_geometry(p, a) for p, a in flat.items()
         if a.ndim >= 2 and not accounting.is_statistic(p)]
  return geo, None, architecture, notes


def _other_leaves(flat, geo, layers_geo, rules: CountingRules):
  """Leaves outside the geometry (counted at ``value_bits`` each): names, elements, note."""
  covered = accounting.covered_leaves(geo, flat)
  other = [p for p in flat if p not in covered and not accounting.is_statistic(p)]
  other_numel = sum(flat[p].size for p in other)
  notes = []
  if other and layers_geo is not None:
    notes.append(f"{len(other)} leaves outside the geometry counted at {rules.value_bits} "
                 f"bits each: {', '.join(other[:5])}{' ...' if len(other) > 5 else ''}")
  return other, other_numel, notes


def _ternary_outside(flat, other, layers_geo):
  """Ternary leaves the geometry does not describe (a ternarized class token or
  position embedding): each gets a row of its own (stand-in geometry, no
  operation counts), so every quantized leaf is shown."""
  if layers_geo is None:
    return [], {}
  statistics = {p: leaf_statistics(flat[p]) for p in other if flat[p].size >= 2}
  extra = [_leaf_geometry(p, flat[p]) for p, s in statistics.items() if s.ternary]
  return extra, {g.path: statistics[g.path] for g in extra}


def _nonfinite_warning(path: str, stats: LeafStatistics) -> str:
  return (f"layer {path} has {stats.nonfinite:,} non-finite weights (NaN or inf) of "
          f"{stats.numel:,}: not counted as ternary; its sizes and op counts are not meaningful")


def _layer_entry(score, w: np.ndarray, stats: LeafStatistics, record, layer_geo) -> dict:
  """One row of the report's ``layers``."""
  entry = {
      "path": score.path, "shape": list(w.shape), "numel": int(w.size),
      "ternary": stats.ternary, "nonfinite": stats.nonfinite,
      "sparsity": stats.zeros / max(w.size, 1),
      "w_n": stats.w_n, "w_p": stats.w_p,
      "entropy_bits": (channel_code_entropy_bits(w) if record and record.codec == "fc"
                       else stats.entropy_bits()),  # fc: H0 of the per-channel codes
      "bits_per_weight": record.bits_per_weight if record else None,
      "bytes": record.nbytes if record else None,
      "codec": record.codec if record else None,
      "format": score.format, "scoring_params": score.scoring_params,
      "dead_out_channels": len(score.dead_out), "dead_in_channels": len(score.dead_in),
  }
  if layer_geo is not None:
    entry.update(out_hw=list(layer_geo.out_hw),
                 mults=score.ops_live.mults, adds=score.ops_live.adds,
                 mults_with_dead=score.ops_dead.mults, adds_with_dead=score.ops_dead.adds)
  return entry


class _TernaryTotals(NamedTuple):
  """Sums over the ternary layers."""
  zeros: int = 0
  numel: int = 0
  entropy_bytes: float = 0.0
  payload: float = 0.0
  paper: float = 0.0
  bitmask: float = 0.0

  def add(self, score, w: np.ndarray, stats: LeafStatistics, record) -> "_TernaryTotals":
    n, z = w.size, stats.zeros
    return _TernaryTotals(
        self.zeros + z, self.numel + n, self.entropy_bytes + n * stats.entropy_bits() / 8,
        self.payload + (record.nbytes if record else 0),
        self.paper + score.formats[score.format] * 4,
        self.bitmask + (n + 7) // 8 + (n - z + 7) // 8 + 3 * w.dtype.itemsize)


def _layer_entries(scores, flat, statistics, records, layers_geo):
  """``(layers, warnings, ternary totals)`` of the scored layers."""
  by_path: dict = {}
  for g in layers_geo or ():
    by_path.setdefault(g.path, g)
  layers, warnings, totals = [], [], _TernaryTotals()
  for score in scores:
    w, stats, record = flat[score.path], statistics[score.path], records.get(score.path)
    if stats.nonfinite:
      warnings.append(_nonfinite_warning(score.path, stats))
    layers.append(_layer_entry(score, w, stats, record, by_path.get(score.path)))
    if stats.ternary:
      totals = totals.add(score, w, stats, record)
  return layers, warnings, totals


def _operations(scores) -> dict:
  """FLOPs, op counts and energy of the scored layers (only with a known geometry)."""
  def total(field):
    return accounting.OpCount(sum(getattr(s, field).mults for s in scores),
                              sum(getattr(s, field).adds for s in scores))
  live, dead, dense = total("ops_live"), total("ops_dead"), total("ops_dense")
  mults = sum(s.flop_mults for s in scores)
  adds = sum(s.flop_adds for s in scores)
  return dict(
      flops=mults + adds, flops_detail={"mults": mults, "adds": adds},
      ops={"with_dead_channels": dead._asdict(), "without_dead_channels": live._asdict(),
           "dense_float": dense._asdict()},
      energy_uj={"ternary_fp16": live.energy_pj("fp16") / 1e6,
                 "ternary_fp32": live.energy_pj("fp32") / 1e6,
                 "dense_fp32": dense.energy_pj("fp32") / 1e6})


def build_report(source, *, geometry: GeometryLike = "auto",
                 rules: CountingRules = PAPER_RULES, image_size: int = 32,
                 keys: Sequence[str] = ("params",), float16: bool = False,
                 max_bytes: int = container.DEFAULT_MAX_BYTES) -> dict:
  """Builds the report of a packed file, a checkpoint, an ``.npz`` or a tree.

  Memory: beyond the decoded arrays, each leaf is read in chunks
  (:mod:`~ec2t_jax._src.report.leaf_statistics`), never copied whole.

  Args:
    source: path (packed file, ``.npz``, orbax checkpoint directory) or a tree.
    geometry: ``"auto"`` (recognise CIFAR ResNets), ``None``/``"none"``, a
      JSON file from :func:`save_geometry` or a list of :class:`LayerGeometry`.
    rules: counting rules (default: the paper's).
    image_size: input resolution for the built-in ResNet description.
    keys: checkpoint entries to read.
    float16: for non-packed sources, measure the packed size with float16
      non-ternary leaves.
    max_bytes: largest input file / decoded size accepted (default 4 GiB).

  A leaf stacking ternary layers (``nn.scan`` blocks) is reported per slice,
  ``blocks/c_fc/kernel[3]``, as the packed file stores it.

  Returns:
    A JSON-able dict; top-level keys include ``sparsity``, ``scoring_params``,
    ``flops``, ``bytes``, ``layers`` and ``warnings`` (one line per layer
    with non-finite weights; its entry's ``nonfinite`` counts them).

  Example:
    >>> import numpy as np
    >>> from ec2t_jax.report import build_report
    >>> tree = {"fc": {"kernel": np.array([[0.5, 0.0], [-0.5, 0.5]], np.float32)}}
    >>> r = build_report(tree, geometry="none")
    >>> r["sparsity"], r["layers"][0]["ternary"], r["layers"][0]["w_n"]
    (0.25, True, 0.5)
  """
  src = _load_source(source, keys, max_bytes, float16)
  flat = sources.flat_arrays(src.tree)
  geo, layers_geo, architecture, notes = _layer_geometry(geometry, flat, image_size)
  statistics = {g.path: leaf_statistics(flat[g.path]) for g in geo if g.path in flat}
  scores = accounting.score_layers(flat, geo, rules,
                                   ternary={p: s.ternary for p, s in statistics.items()})
  other, other_numel, other_notes = _other_leaves(flat, geo, layers_geo, rules)
  extra_scores, other, other_numel = _score_outside(flat, other, other_numel, other_notes,
                                                    statistics, layers_geo, rules)
  scoring = (sum(s.scoring_params for s in [*scores, *extra_scores])
             + other_numel * rules.value_bits / 32)
  records = {r.path: r for r in src.info.records}
  layers, warnings, ternary_totals = _layer_entries([*scores, *extra_scores], flat,
                                                    statistics, records, layers_geo)
  zeros, total = accounting.paper_sparsity(flat)
  report: dict[str, Any] = {
      "source": src.name, "kind": src.kind, "architecture": architecture,
      "rules": dataclasses.asdict(rules),
      "arithmetic": accounting.arithmetic(rules),
      "sparsity": zeros / total if total else 0.0,
      "sparsity_detail": {"zeros": zeros, "parameters": total,
                          "ternary_zeros": ternary_totals.zeros,
                          "ternary_weights": ternary_totals.numel},
      "params": total,
      "scoring_params": scoring,
      "scoring_params_basis": "geometry" if layers_geo is not None else "per leaf",
      "flops": None, "flops_detail": None, "ops": None, "energy_uj": None,
      "bytes": _bytes_entry(src, flat, scoring, ternary_totals),
      "layers": layers,
      "other_leaves": {"count": len(other), "numel": int(other_numel)},
      "notes": notes + other_notes,
      "warnings": warnings,
  }
  if layers_geo is not None:
    report.update(_operations(scores))
  return report


def _score_outside(flat, other, other_numel, other_notes, statistics, layers_geo, rules):
  """Scores the ternary leaves outside the geometry and takes them out of ``other``."""
  extra, extra_statistics = _ternary_outside(flat, other, layers_geo)
  if not extra:
    return [], other, other_numel
  statistics.update(extra_statistics)
  extra_scores = accounting.score_layers(
      flat, extra, rules, ternary={p: True for p in extra_statistics})
  other = [p for p in other if p not in extra_statistics]
  other_numel -= sum(flat[p].size for p in extra_statistics)
  other_notes.append(f"{len(extra)} ternary leaves outside the geometry (no operation "
                     f"counts): {', '.join(g.path for g in extra[:5])}"
                     f"{' ...' if len(extra) > 5 else ''}")
  return extra_scores, other, other_numel


def _bytes_entry(src, flat, scoring, ternary_totals) -> dict:
  """The report's ``bytes`` entry: file, header, payload and the reference sizes."""
  info = src.info
  return {
      "file": info.total_bytes, "measured": src.measured,
      "header": info.total_bytes - info.payload_bytes, "payload": info.payload_bytes,
      "float32": sum(4 * a.size for a in flat.values()), "paper_rule": scoring * 4,
      "ternary": {"payload": ternary_totals.payload,
                  "entropy_bound": ternary_totals.entropy_bytes,
                  "paper_rule": ternary_totals.paper, "bitmask": ternary_totals.bitmask},
  }


def _fmt(x, spec):
  width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0)
  return f"{'-':>{width}}" if x is None else format(x, spec)


def format_report(report: dict) -> str:
  """Renders :func:`build_report`'s dict as a readable table."""
  lines = [f"{report['source']} ({report['kind']})",
           f"architecture: {report['architecture'] or 'unknown'}", ""]
  # Full paths (never cut: paths that differ only in the middle, such as
  # encoder/layer/{0,1,2}/attention/.../kernel, must stay apart).
  width = max([28] + [len(layer["path"]) for layer in report["layers"]])
  header = (f"{'layer':<{width}} {'shape':<16} {'sparsity':>8} {'w_n':>8} {'w_p':>8} "
            f"{'H0':>6} {'bits/w':>6} {'bytes':>7} {'codec':>5} {'dead':>5}")
  lines += [header, "-" * len(header)]
  for layer in report["layers"]:
    lines.append(
        f"{layer['path']:<{width}} {'x'.join(map(str, layer['shape'])):<16} "
        f"{layer['sparsity']:>8.1%} {_fmt(layer['w_n'], '8.4f')} {_fmt(layer['w_p'], '8.4f')} "
        f"{_fmt(layer['entropy_bits'], '6.3f')} {_fmt(layer['bits_per_weight'], '6.3f')} "
        f"{_fmt(layer['bytes'], '7d')} {layer['codec'] or '-':>5} {layer['dead_out_channels']:>5}"
        + ("  NONFINITE" if layer.get("nonfinite") else ""))
  b = report["bytes"]
  t = b["ternary"]
  lines += [
      "",
      f"sparsity (zeros / all {report['params']:,} parameters, as the paper counts): "
      f"{report['sparsity']:.2%}",
      f"bytes ({b['measured']}): {b['file']:,}  (header {b['header']:,}, payload {b['payload']:,})",
      f"  float32: {b['float32']:,} B ({b['float32'] / max(b['file'], 1):.1f}x the file)",
      f"  paper's storage rule: {report['scoring_params']:,.1f} scoring params x 4 B = "
      f"{b['paper_rule']:,.0f} B (the file is {b['file'] / max(b['paper_rule'], 1):.2f}x that; "
      f"the rule folds batch norm into 16-bit biases and counts other values at 16 bits)",
      f"  ternary layers: {t['payload']:,.0f} B packed, {t['entropy_bound']:,.0f} B = numel x H0, "
      f"{t['bitmask']:,.0f} B as two bitmasks, {t['paper_rule']:,.0f} B by the paper's best format",
  ]
  if report["flops"] is not None:
    ops = report["ops"]
    lines += [
        f"MicroNet FLOPs: {report['flops'] / 1e6:.2f}M "
        f"(mults {report['flops_detail']['mults'] / 1e6:.2f}M, "
        f"adds {report['flops_detail']['adds'] / 1e6:.2f}M)",
        f"ops (paper's formulas, {report['arithmetic']}): "
        f"{ops['with_dead_channels']['mults'] / 1e6:.3f}M mults + "
        f"{ops['with_dead_channels']['adds'] / 1e6:.3f}M adds with dead channels; "
        f"{ops['without_dead_channels']['mults'] / 1e6:.3f}M + "
        f"{ops['without_dead_channels']['adds'] / 1e6:.3f}M without; dense float "
        f"{ops['dense_float']['mults'] / 1e6:.2f}M + {ops['dense_float']['adds'] / 1e6:.2f}M",
        f"energy per inference (45 nm): {report['energy_uj']['ternary_fp16']:.2f} uJ (FP16), "
        f"{report['energy_uj']['ternary_fp32']:.2f} uJ (FP32) vs dense FP32 "
        f"{report['energy_uj']['dense_fp32']:.2f} uJ",
    ]
  lines += [f"note: {n}" for n in report["notes"]]
  lines += [f"WARNING: {w}" for w in report.get("warnings", [])]
  return "\n".join(lines)


