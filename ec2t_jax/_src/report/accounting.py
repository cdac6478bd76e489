"""The paper's storage and operation accounting (MicroNet rules), and energy.

Examples build their model, params or optimizer state with the fixture
:func:`ec2t_jax.models.small_cnn_example`.

Storage ("scoring parameters", 1 parameter = 32 bits). Per weight layer, with
``n`` weights, ``nnz`` non-zeros, ``M`` output rows and ``b = 16`` bits per
stored value (half precision):

* bitmask rule: ``nnz * b / 32 + n / 32`` (the mask only if there are zeros);
* ternary layers also compete with (the smallest wins, each rounded up):
  CSR ``(17 nnz + 16 (M + 1) + 32) / 32``, CER ``(16 nnz + 32 (M + 1) + 32) / 32``,
  ternary scheme 1 ``(2 n + 32) / 32`` and scheme 2 ``(n + nnz + 32) / 32``
  (two bitmasks + two 16-bit centroids);
* all-zero output filters are dropped, and with them the matching input
  channels of the next layer (the reference takes them from the *previous
  layer in the list*, also across residual connections; ``dead_inputs="own"``
  drops only input slices that are all zero in the layer itself);
* batch norm folds into one 16-bit bias per (live) output channel; a dense
  layer's bias counts 16 bits per output.

Operations. A conv with output ``H x W x M``, ``N`` input channels, kernel
``K x K`` and density ``sigma``; a dense layer is the case ``H = W = K = 1``:

.. math::
   \\text{ternary: } 2 H W M \\text{ mults}, \\quad
   \\text{else: } H W M \\sigma N K^2 \\text{ mults}; \\qquad
   H W M (\\sigma N K^2 - 1) \\text{ adds}

"With dead channels" applies these formulas to the whole layer, "without" to
the layer after dropping dead channels. Since the layer-average formula charges
``-1`` addition to every output, an all-zero filter counts ``-H W`` additions,
so the count without dead channels can show slightly *more* additions (by
``H W`` per dropped filter) while it has fewer multiplications.

MicroNet FLOPs weight each multiplication by ``mul_bits / 32`` and each
addition by ``add_bits / 32``; ternary accumulations may use a tree adder
whose operands grow from 16 bits by one bit per level (capped at 32). A model
whose quantized layers take 8-bit inputs (``activation_bits=8``, BitNet's
W1.58A8, e.g. ``models.GPT(..., activation_bits=8)``) adds int8 operands:
its tree adder starts at 8 bits, and the report reads "ternary x int8". One
addition per output for the bias, one multiplication per output for a ReLU,
one addition per output for a residual add (the reference script keeps only
the *last* block's residual adds: ``skip_adds="last"``).

Energy uses the Horowitz 45 nm table: FP32 mult 3.7 pJ, add 0.9 pJ; FP16
mult 1.1 pJ, add 0.4 pJ.

:data:`PAPER_RULES` reproduces the numbers published for ResNet-20
(45.2/63.9/73.2% sparsity, 13.4K/11.8K/11.0K scoring params, 11.1M/8.5M/6.6M
FLOPs): the reference's ResNet-20 counting with ternary formats, CER/CSR and
the tree adder switched on (its published script leaves them off for this
model).

Example:
  >>> import numpy as np
  >>> from ec2t_jax.report import trace_geometry
  >>> from ec2t_jax._src.report.accounting import score_layers  # internal
  >>> from ec2t_jax.models import small_cnn_example
  >>> ex = small_cnn_example()  # a small CNN (fixture): ex.model, ex.params, ex.x
  >>> layers = trace_geometry(lambda p, x: ex.model.apply({"params": p}, x), ex.params, ex.x[:1])
  >>> flat_weights = {f"{name}/{leaf}": np.asarray(value)
  ...                 for name, layer in ex.params.items() for leaf, value in layer.items()}
  >>> scores = score_layers(flat_weights, layers)
  >>> len(scores)
  4
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, NamedTuple, Optional, Sequence

import numpy as np

from ec2t_jax._src.report import leaf_statistics
from ec2t_jax._src.report.geometry import LayerGeometry

ENERGY_PJ = {"fp32": {"mult": 3.7, "add": 0.9}, "fp16": {"mult": 1.1, "add": 0.4}}
_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


@dataclasses.dataclass(frozen=True)
class CountingRules:
  """How storage and FLOPs are counted (MicroNet rules; defaults = the paper).

  Attributes:
    value_bits: bits per stored non-ternary value, bias and centroid.
    mul_bits: bits of a multiplication (a 32-bit one counts 1 FLOP).
    add_bits: bits of an addition.
    tree_adder: ternary accumulations by a tree adder.
    compressed_formats: CSR, CER and ternary scheme 2 compete for ternary layers
      (scheme 1 always does).
    dead_channels: drop all-zero output filters (and matching inputs).
    dead_inputs: ``"previous"`` (reference) or ``"own"``, see the module doc.
    skip_adds: ``"last"`` (reference script) or ``"all"`` residual adds.
    ternary_rules: count ternary layers as ternary (2 mults per output,
      ternary formats, tree adder); False counts them like any sparse 16-bit
      layer, as the published script's ResNet-20 branch does.
    activation_bits: bits of the quantized layers' inputs (None: ``value_bits``
      floats; 8: int8 per-token activations, the tree adder's operands).
  """
  value_bits: int = 16
  mul_bits: int = 16
  add_bits: int = 32
  tree_adder: bool = True
  compressed_formats: bool = True
  dead_channels: bool = True
  dead_inputs: str = "previous"
  skip_adds: str = "last"
  ternary_rules: bool = True
  activation_bits: Optional[int] = None

  def __post_init__(self):
    bits = self.activation_bits
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int)
                             or not 1 <= bits <= 32):
      raise ValueError(f"activation_bits must be None or an int in [1, 32], got {bits!r}")
    if self.dead_inputs not in ("previous", "own"):
      raise ValueError(f"dead_inputs must be 'previous' or 'own', got {self.dead_inputs!r}")
    if self.skip_adds not in ("last", "all"):
      raise ValueError(f"skip_adds must be 'last' or 'all', got {self.skip_adds!r}")


PAPER_RULES = CountingRules()
EXACT_RULES = CountingRules(dead_inputs="own", skip_adds="all")


class OpCount(NamedTuple):
  """Multiplications and additions (plain counts)."""
  mults: float
  adds: float

  def energy_pj(self, precision: str) -> float:
    table = ENERGY_PJ[precision]
    return self.mults * table["mult"] + self.adds * table["add"]


class LayerScore(NamedTuple):
  """Accounting of one weight layer.

  Attributes:
    path: weight leaf.
    ternary: whether it was counted as ternary.
    format: the winning storage format.
    scoring_params: weight storage + bias (MicroNet parameters of 32 bits).
    formats: every candidate format's size in scoring params.
    dead_out: indices of all-zero output filters.
    dead_in: input channels dropped.
    live_in, live_out: channels left.
    density: non-zero fraction after dropping dead channels.
    ops_dead: plain op counts of the full layer.
    ops_live: plain op counts without dead channels.
    ops_dense: dense float op counts (every weight, no sparsity).
    flop_mults, flop_adds: MicroNet-weighted FLOPs (incl. bias, ReLU, residual).
  """
  path: str
  ternary: bool
  format: str
  scoring_params: float
  formats: dict
  dead_out: tuple
  dead_in: tuple
  live_in: int
  live_out: int
  density: float
  ops_dead: OpCount
  ops_live: OpCount
  ops_dense: OpCount
  flop_mults: float
  flop_adds: float


def is_statistic(path: str) -> bool:
  """Batch-norm running statistics and counters (not parameters in the paper's count)."""
  parts = path.replace(".", "/").split("/")
  return parts[-1] in _STATISTICS or "batch_stats" in parts or parts[-1] in ("mean", "var")


def paper_sparsity(flat: Mapping[str, np.ndarray]) -> tuple[int, int]:
  """``(zeros, total)`` over all parameters but batch-norm statistics.

  The reference counts ``named_parameters()``: conv and dense weights, biases
  and batch-norm scale/shift; running statistics and counters are buffers.
  """
  zeros = total = 0
  for path, array in flat.items():
    if is_statistic(path) or np.asarray(array).dtype.kind not in "fc" and \
        np.asarray(array).dtype.name != "bfloat16":
      continue
    a = np.asarray(array)
    total += a.size
    zeros += int(a.size - np.count_nonzero(a))
  return zeros, total


def tree_adder_bits(vector_length: float, operand_bits: int = 16) -> float:
  """Bit-weighted additions of a tree adder summing ``vector_length`` operands.

  Level ``l`` adds pairs of ``operand_bits + l``-bit numbers (capped at 32), as
  the reference counts it (``vector_length`` may be fractional: the layer's
  mean non-zeros per output).
  """
  remaining = vector_length - 1
  base, bits = operand_bits, 0.0
  while remaining > 1:
    pairs = remaining // 2
    bits += pairs * base
    remaining = math.ceil(remaining / 2)
    base = min(base + 1, 32)
  return bits


def arithmetic(rules: CountingRules) -> str:
  """What a quantized layer multiplies: ``"ternary x int8"`` with 8-bit activations,
  ``"ternary x float16"`` with the paper's 16-bit values.

  Example:
    >>> from ec2t_jax._src.report.accounting import CountingRules, arithmetic  # internal
    >>> arithmetic(CountingRules(activation_bits=8)), arithmetic(CountingRules())
    ('ternary x int8', 'ternary x float16')
  """
  if rules.activation_bits is None:
    return f"ternary x float{rules.value_bits}"
  return f"ternary x int{rules.activation_bits}"


def _oi_view(weights: np.ndarray, layer: LayerGeometry) -> Optional[np.ndarray]:
  """Weights as ``[out, in, rest]`` (None when the layout is unknown)."""
  w = np.asarray(weights)
  if layer.in_axis < 0 or layer.out_axis < 0 or w.ndim < 2:
    return None
  moved = np.moveaxis(w, (layer.out_axis, layer.in_axis), (0, 1))
  return moved.reshape(moved.shape[0], moved.shape[1], -1)


def _ops(layer: LayerGeometry, ternary: bool, live_out: int, nnz: int) -> OpCount:
  outputs = layer.positions * live_out
  if live_out == 0:
    return OpCount(0.0, 0.0)
  vector = nnz / live_out
  mults = 2.0 * outputs if ternary else vector * outputs
  return OpCount(float(mults), float(max(vector - 1.0, 0.0) * outputs))


def _dead_channels(view: Optional[np.ndarray], layer: LayerGeometry, rules: CountingRules,
                   previous_dead: tuple) -> tuple[tuple, tuple]:
  """``(dead_out, dead_in)``: all-zero output filters and the input channels dropped."""
  if view is None or not rules.dead_channels or layer.kind != "conv":
    return (), ()
  dead_out = tuple(int(o) for o in np.flatnonzero(~view.any(axis=(1, 2))))
  if rules.dead_inputs == "previous":
    dead_in = tuple(i for i in previous_dead if i < view.shape[1])
  else:
    dead_in = tuple(int(i) for i in np.flatnonzero(~view.any(axis=(0, 2))))
  return dead_out, dead_in


class _Live(NamedTuple):
  numel: int
  nnz: int
  full_nnz: int
  out: int
  inputs: int


def _live_counts(w: np.ndarray, view: Optional[np.ndarray], layer: LayerGeometry,
                 dead_out: tuple, dead_in: tuple) -> _Live:
  """Elements and non-zeros left after dropping dead channels (no copy of the weights)."""
  full_nnz = int(np.count_nonzero(w))
  if view is None:
    return _Live(w.size, full_nnz, full_nnz, layer.out_channels, layer.in_channels)
  live_out, live_in = view.shape[0] - len(dead_out), view.shape[1] - len(dead_in)
  # Dead output filters hold only zeros: only the dropped input slices remove non-zeros.
  nnz = full_nnz - sum(int(np.count_nonzero(view[:, i, :])) for i in dead_in)
  return _Live(live_out * live_in * view.shape[2], nnz, full_nnz, live_out, live_in)


def _storage_formats(live: _Live, ternary: bool, rules: CountingRules) -> dict:
  """Every candidate storage format's size in scoring params (see the module docstring)."""
  vb, numel, nnz = rules.value_bits, live.numel, live.nnz
  formats = {"bitmask": nnz * vb / 32 + (numel / 32 if nnz < numel else 0.0)}
  if ternary:
    formats["ternary1"] = math.ceil((2 * numel + 2 * vb) / 32)
    if rules.compressed_formats:
      formats["csr"] = math.ceil((nnz * (vb + 1) + (live.out + 1) * vb + 2 * vb) / 32)
      formats["cer"] = math.ceil((nnz * vb + 2 * (live.out + 1) * vb + 2 * vb) / 32)
      formats["ternary2"] = math.ceil((numel + nnz + 2 * vb) / 32)
  return formats


def _flops(layer: LayerGeometry, ternary: bool, live: _Live, ops_live: OpCount,
           residual: bool, rules: CountingRules) -> tuple[float, float]:
  """MicroNet-weighted ``(mults, adds)``: the layer, its bias, ReLU and residual add."""
  outputs = layer.positions * live.out
  flop_mults = ops_live.mults * rules.mul_bits / 32
  if ternary and rules.tree_adder and live.out:
    operand_bits = rules.activation_bits or rules.value_bits
    flop_adds = (tree_adder_bits(live.nnz / live.out, operand_bits) * layer.positions
                 * live.out / 32)
  else:
    flop_adds = ops_live.adds * rules.add_bits / 32
  if layer.bias:
    flop_adds += outputs * rules.add_bits / 32
  if layer.activation == "relu":
    flop_mults += outputs * rules.mul_bits / 32
  if residual:
    flop_adds += outputs * rules.add_bits / 32
  return float(flop_mults), float(flop_adds)


def _score_layer(layer: LayerGeometry, w: np.ndarray, ternary: bool, residual: bool,
                 previous_dead: tuple, rules: CountingRules) -> LayerScore:
  view = _oi_view(w, layer)
  dead_out, dead_in = _dead_channels(view, layer, rules, previous_dead)
  live = _live_counts(w, view, layer, dead_out, dead_in)
  formats = _storage_formats(live, ternary, rules)
  best = min(formats, key=formats.get)
  bias_params = (live.out if layer.kind == "conv" else layer.out_channels) if layer.bias else 0
  scoring = formats[best] + bias_params * rules.value_bits / 32
  ops_live = _ops(layer, ternary, live.out, live.nnz)
  ops_dead = _ops(layer, ternary, layer.out_channels, live.full_nnz)
  dense_vector = w.size / max(layer.out_channels, 1)
  dense_outputs = layer.positions * layer.out_channels
  ops_dense = OpCount(float(dense_vector * dense_outputs),
                      float((dense_vector - 1) * dense_outputs))
  density = live.nnz / live.numel if live.numel else 0.0
  flop_mults, flop_adds = _flops(layer, ternary, live, ops_live, residual, rules)
  return LayerScore(layer.path, ternary, best, float(scoring), formats, dead_out, dead_in,
                    live.inputs, live.out, density, ops_dead, ops_live, ops_dense,
                    flop_mults, flop_adds)


def score_layers(flat: Mapping[str, np.ndarray], layers: Sequence[LayerGeometry],
                 rules: CountingRules = PAPER_RULES, *,
                 ternary: Optional[Mapping[str, bool]] = None) -> list[LayerScore]:
  """Scores every layer of ``layers`` with its weights from ``flat``.

  Args:
    flat: ``{path: array}``.
    layers: the geometry, in forward order (order matters for the reference's
      dead-input rule and ``skip_adds="last"``).
    rules: :class:`CountingRules`.
    ternary: ``{path: whether the leaf is ternary}`` if already known (the
      report computes it once); leaves it lacks are examined here.

  Returns:
    One :class:`LayerScore` per layer.

  Raises:
    KeyError: if a layer's weight leaf is missing from ``flat``.
  """
  residual = [i for i, layer in enumerate(layers) if layer.residual_add]
  counted_residual = set(residual[-1:] if rules.skip_adds == "last" else residual)
  ternary = ternary or {}
  previous_dead: tuple = ()
  out = []
  for index, layer in enumerate(layers):
    if layer.path not in flat:
      raise KeyError(f"geometry names {layer.path!r}, which is not a leaf of the tree")
    w = np.asarray(flat[layer.path])
    is_ternary = ternary.get(layer.path)
    if is_ternary is None:
      is_ternary = leaf_statistics.leaf_statistics(w).ternary
    score = _score_layer(layer, w, rules.ternary_rules and is_ternary,
                         index in counted_residual, previous_dead, rules)
    previous_dead = score.dead_out
    out.append(score)
  return out


def covered_leaves(layers: Sequence[LayerGeometry], flat: Mapping[str, np.ndarray]) -> set[str]:
  """Leaves accounted for by the layers: weights, their own biases, folded norms."""
  covered = set()
  for layer in layers:
    covered.add(layer.path)
    covered.update(layer.folded)
    for old, new in ((".weight", ".bias"), ("/kernel", "/bias")):
      if layer.path.endswith(old):
        bias = layer.path[: -len(old)] + new
        if bias in flat:
          covered.add(bias)
  return covered
