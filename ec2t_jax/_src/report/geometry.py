"""Layer geometry for operation counts: which weights are convs, and on what feature maps.

Examples build their model, params or optimizer state with the fixture
:func:`ec2t_jax.models.small_cnn_example`.

Counting operations needs, per weight layer, its output feature-map size,
which a parameter tree alone does not hold. Two sources:

* :func:`cifar_resnet_geometry` - a description of the CIFAR ResNets
  (ResNet-20/32/44/56 and compound-scaled ones) recognised from parameter
  names, PyTorch style (``layer1.0.conv1.weight``, OIHW, as in the official
  EC2T checkpoints) or Flax style (``layer1_0/conv1/kernel``, HWIO, as
  :mod:`ec2t_jax.models.resnet` names them);
* :func:`trace_geometry` - for any model: traces ``fn(params, *inputs)`` with
  :func:`jax.make_jaxpr` and reads every ``conv_general_dilated`` /
  ``dot_general`` whose kernel comes from a parameter leaf (followed through
  nested jaxprs by :mod:`ec2t_jax._src.core.tracing`); a bias/BN shift, a ReLU or
  a residual add that follows a layer is attributed to it.

Either result saves to JSON (:func:`save_geometry`) for the report command
(``python -m ec2t_jax.report PATH --geometry FILE``).

Example:
  >>> import jax.numpy as jnp
  >>> from ec2t_jax.report import save_geometry, trace_geometry
  >>> from ec2t_jax.models import small_cnn_example
  >>> ex = small_cnn_example()  # a small CNN (fixture): ex.model, ex.params
  >>> fn = lambda p, x: ex.model.apply({"params": p}, x)
  >>> layers = trace_geometry(fn, ex.params, jnp.zeros((1, 8, 8, 1)))
  >>> [(layer.kind, layer.out_hw) for layer in layers]
  [('conv', (8, 8)), ('conv', (8, 8)), ('dense', (1, 1)), ('dense', (1, 1))]
  >>> save_geometry("geometry.json", layers)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import numpy as np

from ec2t_jax._src.core import tracing
from ec2t_jax._src.core import trees


class LayerGeometry(NamedTuple):
  """One weight layer (conv or dense) as the op counts see it.

  Attributes:
    path: path of the weight leaf (``/``-joined, or the ``.npz`` key).
    kind: ``"conv"`` or ``"dense"``.
    in_channels: input channels (features) ``N``.
    out_channels: output channels (features) ``M``.
    kernel: spatial kernel size ``(K_h, K_w)``; ``(1, 1)`` for dense.
    out_hw: output feature-map size ``(H, W)``; ``(1, 1)`` for a dense layer
      on a vector (positions per example in general).
    stride: spatial stride (informational).
    in_axis: axis of the weight leaf indexing input channels.
    out_axis: axis of the weight leaf indexing output channels.
    groups: feature groups (1 = ordinary conv).
    bias: a per-output-channel bias (own, or folded batch norm) follows.
    activation: ``"relu"`` or ``None``.
    residual_add: the layer's output goes into a residual addition.
    folded: paths of leaves folded into this layer's bias (batch norm).
  """
  path: str
  kind: str
  in_channels: int
  out_channels: int
  kernel: tuple[int, int]
  out_hw: tuple[int, int]
  stride: int = 1
  in_axis: int = 1
  out_axis: int = 0
  groups: int = 1
  bias: bool = True
  activation: Optional[str] = "relu"
  residual_add: bool = False
  folded: tuple[str, ...] = ()

  @property
  def positions(self) -> int:
    """Output positions per example, ``H * W``."""
    return self.out_hw[0] * self.out_hw[1]


# ----------------------------------------------------------------- CIFAR ResNets

_STEM = re.compile(r"^(?P<pre>.*?)conv1(?P<sep>[./])(?P<leaf>weight|kernel)$")
_BLOCK = re.compile(
    r"^(?P<pre>.*?)layer(?P<stage>\d+)[._](?P<block>\d+)[./](?P<name>conv\d+|shortcut[._]0)"
    r"[./](?P<leaf>weight|kernel)$")
_HEAD = re.compile(r"^(?P<pre>.*?)(?:linear|fc)[./](?P<leaf>weight|kernel)$")
_NORM_WORDS = ("running_mean", "running_var", "num_batches_tracked")


def _folded_norm(paths: Sequence[str], module: str, norm: str, sep: str) -> tuple[str, ...]:
  """Leaves of batch norm ``module{sep}norm``, allowing one leading collection
  component such as ``params/`` or ``batch_stats/``."""
  rel = f"{module}{sep}{norm}{sep}" if module else f"{norm}{sep}"
  pattern = re.compile(r"^(?:[^/.]+[./])?" + re.escape(rel) + r"[^/.]+$")
  return tuple(p for p in paths if pattern.match(p))


def cifar_resnet_geometry(shapes: dict[str, Sequence[int]], *,
                          image_size: int = 32) -> Optional[list[LayerGeometry]]:
  """Describes a CIFAR ResNet from its parameter names and shapes.

  Recognises a stem ``conv1``, blocks ``layer{s}.{b}.conv{k}`` (PyTorch) or
  ``layer{s}_{b}/conv{k}`` (Flax), optional 1x1 shortcut convs and the
  classifier ``linear`` (or ``fc``). Stage ``s`` works on ``image_size /
  2**(s-1)`` feature maps; in block 0 of every stage after the first, ``conv1``
  and the shortcut have stride 2. The last conv of a block feeds the residual
  add; each conv's batch norm (``bn{k}``, ``shortcut.1``) folds into its bias.

  Args:
    shapes: ``{path: shape}`` of the parameter leaves.
    image_size: input resolution (32 for CIFAR).

  Returns:
    The layers in forward order, or ``None`` if the names do not fit.
  """
  paths = list(shapes)
  stem = [p for p in paths if _STEM.match(p) and not _BLOCK.match(p) and "layer" not in p]
  head = [p for p in paths if _HEAD.match(p)]
  blocks = [(m, p) for p in paths if (m := _BLOCK.match(p))]
  if len(stem) != 1 or len(head) != 1 or not blocks:
    return None
  torch_style = stem[0].endswith(".weight")
  layers = [_conv(shapes, stem[0], torch_style, image_size, 1, False)]
  layers += _block_convs(shapes, blocks, torch_style, image_size)
  dense = _dense_head(shapes, head[0], torch_style)
  if dense.in_channels != layers[-1].out_channels:
    return None
  return _fold_norms(layers, paths, torch_style) + [dense]


def _conv(shapes, path: str, torch_style: bool, size: int, stride: int,
          residual: bool) -> LayerGeometry:
  """A conv layer of a CIFAR ResNet from its kernel's shape (OIHW or HWIO)."""
  shape = tuple(shapes[path])
  if len(shape) != 4:
    raise ValueError(f"{path}: expected a 4-d conv kernel, got shape {shape}")
  if torch_style:
    out_c, in_c, kh, kw = shape
    in_axis, out_axis = 1, 0
  else:
    kh, kw, in_c, out_c = shape
    in_axis, out_axis = 2, 3
  return LayerGeometry(path, "conv", in_c, out_c, (kh, kw), (size, size), stride,
                       in_axis, out_axis, residual_add=residual)


def _block_convs(shapes, blocks, torch_style: bool, image_size: int) -> list[LayerGeometry]:
  """The residual blocks' convs in forward order (stride 2 where a stage starts)."""
  order = sorted(blocks, key=lambda mp: (int(mp[0]["stage"]), int(mp[0]["block"]),
                                         mp[0]["name"].startswith("shortcut"), mp[0]["name"]))
  last_conv = {(m["stage"], m["block"]): path for m, path in order}
  layers = []
  for m, path in order:
    stage, block = int(m["stage"]), int(m["block"])
    size = max(1, image_size // 2 ** (stage - 1))
    shortcut = m["name"].startswith("shortcut")
    stride = 2 if stage > 1 and block == 0 and (m["name"] == "conv1" or shortcut) else 1
    residual = path == last_conv[(m["stage"], m["block"])] and m["name"].startswith("conv")
    layer = _conv(shapes, path, torch_style, size, stride, residual)
    layers.append(layer._replace(activation=None) if shortcut else layer)
  return layers


def _dense_head(shapes, path: str, torch_style: bool) -> LayerGeometry:
  """The classifier (``linear`` / ``fc``) from its kernel's shape."""
  shape = tuple(shapes[path])
  if len(shape) != 2:
    raise ValueError(f"{path}: expected a 2-d dense kernel, got shape {shape}")
  if torch_style:
    (out_f, in_f), in_axis, out_axis = shape, 1, 0
  else:
    (in_f, out_f), in_axis, out_axis = shape, 0, 1
  return LayerGeometry(path, "dense", in_f, out_f, (1, 1), (1, 1), 1, in_axis,
                       out_axis, bias=True, activation=None)


def _fold_norms(layers, paths, torch_style: bool) -> list[LayerGeometry]:
  """Each conv with the batch norm after it (``bn{k}``, ``shortcut.1``) folded into its bias."""
  sep = "." if torch_style else "/"
  folded = []
  for layer in layers:
    block = _BLOCK.match(layer.path)
    if block is None:
      module, norm = "", "bn1"
    else:
      module = f"layer{block['stage']}{sep if torch_style else '_'}{block['block']}"
      name = block["name"]
      norm = (name[:-1] + "1") if name.startswith("shortcut") else "bn" + name[4:]
    folded.append(layer._replace(folded=_folded_norm(paths, module, norm, sep)))
  return folded


# ---------------------------------------------------------------------- tracing


class _Tracer:
  """Reads layers off a jaxpr walk (:func:`tracing.walk`): which parameter leaves
  and whether data reach each operand of every equation."""

  def __init__(self, leaf_paths, leaf_shapes, batch):
    self.paths, self.shapes, self.batch = leaf_paths, leaf_shapes, batch
    self.layers: list[dict] = []

  def _weight_leaf(self, provenance, operand_shape) -> Optional[int]:
    size = math.prod(operand_shape)
    candidates = [i for i in provenance if math.prod(self.shapes[i]) == size
                  and len(self.shapes[i]) >= 2]
    if not candidates:
      return None
    exact = [i for i in candidates if tuple(self.shapes[i]) == tuple(operand_shape)]
    return (exact or candidates)[0]

  def visit(self, eqn, ins):
    name = eqn.primitive.name
    if name in ("conv_general_dilated", "dot_general") and len(ins) >= 2:
      self._layer(eqn, ins)
    elif name in ("add", "sub", "mul") and self.layers and len(ins) == 2:
      self._after(eqn, ins, residual=name == "add" and ins[0][1] and ins[1][1])
    elif name == "max" and self.layers and len(ins) == 2 and _max_with_zero(eqn, ins):
      self._mark("activation", "relu", eqn)

  def _mark(self, key, value, eqn):
    layer = self.layers[-1]
    if tuple(eqn.outvars[0].aval.shape) == layer["out_shape"]:
      layer[key] = value

  def _after(self, eqn, ins, residual):
    """An elementwise op on the latest layer's output: residual add, bias or BN."""
    layer = self.layers[-1]
    if not (ins[0][1] or ins[1][1]) or tuple(eqn.outvars[0].aval.shape) != layer["out_shape"]:
      return
    if residual:
      layer["residual_add"] = True
      return
    params = [p for p, d in ins if not d]
    leaves = frozenset().union(*params) if params else frozenset()
    if eqn.primitive.name != "mul":
      layer["bias"] = True
    layer["folded"] = tuple(dict.fromkeys(layer["folded"] + tuple(
        self.paths[i] for i in sorted(leaves) if len(self.shapes[i]) <= 1)))

  def _layer(self, eqn, ins):
    rhs_prov, rhs_data = ins[1]
    rhs_shape = tuple(eqn.invars[1].aval.shape)
    leaf = self._weight_leaf(rhs_prov, rhs_shape) if not rhs_data else None
    if leaf is None:
      return
    same_layout = tuple(self.shapes[leaf]) == rhs_shape
    if eqn.primitive.name == "conv_general_dilated":
      layer = _conv_layer(eqn, rhs_shape, same_layout)
    else:
      layer = _dense_layer(eqn, rhs_shape, same_layout, self.batch)
    layer.update(path=self.paths[leaf], out_shape=tuple(eqn.outvars[0].aval.shape), bias=False,
                 activation=None, residual_add=False, folded=())
    self.layers.append(layer)


def _max_with_zero(eqn, ins) -> bool:
  """Whether a ``max`` takes a literal zero (a ReLU)."""
  other = [v for v, (_, d) in zip(eqn.invars, ins) if not d]
  return any(tracing.is_literal(v) and np.all(np.asarray(v.val) == 0) for v in other)


def _first_two(sizes: tuple, merge_rest: bool) -> tuple:
  """Two spatial sizes: padded with 1s, or the first and the product of the rest (or cut)."""
  if len(sizes) < 2:
    return (sizes + (1, 1))[:2]
  return (sizes[0], math.prod(sizes[1:])) if merge_rest else sizes[:2]


def _conv_layer(eqn, rhs_shape: tuple, same_layout: bool) -> dict:
  """A conv's geometry from its ``conv_general_dilated`` equation."""
  dn = eqn.params["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  out_shape = tuple(eqn.outvars[0].aval.shape)
  kernel = _first_two(tuple(rhs_shape[d] for d in rhs_spec[2:]), merge_rest=False)
  out_hw = _first_two(tuple(out_shape[d] for d in out_spec[2:]), merge_rest=True)
  strides = eqn.params["window_strides"]
  return dict(kind="conv", in_channels=int(eqn.invars[0].aval.shape[lhs_spec[1]]),
              out_channels=int(rhs_shape[rhs_spec[0]]), kernel=tuple(map(int, kernel)),
              out_hw=tuple(map(int, out_hw)), stride=int(strides[0]) if strides else 1,
              in_axis=int(rhs_spec[1]) if same_layout else -1,
              out_axis=int(rhs_spec[0]) if same_layout else -1,
              groups=int(eqn.params.get("feature_group_count", 1)))


def _dense_layer(eqn, rhs_shape: tuple, same_layout: bool, batch: int) -> dict:
  """A dense layer's geometry from its ``dot_general`` equation."""
  (_, rc), _ = eqn.params["dimension_numbers"]
  in_f = math.prod(rhs_shape[d] for d in rc)
  out_f = math.prod(rhs_shape) // max(in_f, 1)
  positions = math.prod(eqn.outvars[0].aval.shape) // max(out_f * batch, 1)
  two_d = same_layout and len(rhs_shape) == 2 and len(rc) == 1
  return dict(kind="dense", in_channels=int(in_f), out_channels=int(out_f), kernel=(1, 1),
              out_hw=(max(int(positions), 1), 1), stride=1,
              in_axis=int(rc[0]) if two_d else -1, out_axis=int(1 - rc[0]) if two_d else -1,
              groups=1)


def trace_geometry(fn: Callable, params, *inputs, batch_size: Optional[int] = None,
                   **kwargs) -> list[LayerGeometry]:
  """Traces ``fn(params, *inputs)`` and describes every conv / dense layer.

  A layer is a ``conv_general_dilated`` or ``dot_general`` whose kernel operand
  derives from exactly one parameter leaf of the same size (through casts,
  reshapes, the ternarization...). Following it, an ``add``/``sub`` of a
  parameter or constant sets ``bias``, an ``add`` of two data tensors sets
  ``residual_add`` and ``max(x, 0)`` sets ``activation="relu"`` (all on the
  most recent layer with that output shape); the 0-d/1-d parameter leaves
  such ops use (bias, batch-norm scale and shift) are listed in ``folded``.
  Nothing is computed: only
  :func:`jax.make_jaxpr` runs.

  Args:
    fn: ``fn(params, *inputs, **kwargs)``, e.g.
      ``lambda p, x: model.apply({"params": p, "batch_stats": s}, x)`` (Linen)
      or ``lambda p, x: nnx.merge(graphdef, p, rest)(x)`` (NNX).
    params: the parameter tree (its leaves name the layers); arrays or
      ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape(model.init, ...)``).
    *inputs: example inputs (shapes matter, values do not).
    batch_size: examples per input batch (default: leading dim of the first input).
    **kwargs: forwarded to ``fn``.

  Returns:
    The layers in execution order; a leaf used by several layers appears
    once per use.
  """
  leaves, structure = trees.flatten(params, as_numpy=False)
  paths = [p for p, _ in leaves]
  shapes = [tuple(np.shape(a)) for _, a in leaves]
  if batch_size is None:
    first = jax.tree.leaves(inputs)
    batch_size = int(np.shape(first[0])[0]) if first and np.ndim(first[0]) else 1

  def flat_fn(flat_params, flat_inputs):
    tree = trees.unflatten(list(flat_params), structure)
    return fn(tree, *flat_inputs, **kwargs)

  closed = jax.make_jaxpr(flat_fn)([a for _, a in leaves], list(inputs))
  jaxpr = closed.jaxpr
  n = len(leaves)
  inputs = [tracing.Provenance(frozenset([i]), False) if i < n
            else tracing.Provenance(frozenset(), True) for i in range(len(jaxpr.invars))]
  tracer = _Tracer(paths, shapes, batch_size)
  tracing.walk(jaxpr, inputs, tracer.visit, control_flow=False)
  out = []
  for layer in tracer.layers:
    layer.pop("out_shape")
    out.append(LayerGeometry(**layer))
  return out


# ------------------------------------------------------------------------- JSON


def save_geometry(path, layers: Sequence[LayerGeometry]) -> None:
  """Writes layers as JSON (a list of objects with :class:`LayerGeometry`'s fields)."""
  data = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in layer._asdict().items()}
          for layer in layers]
  Path(path).write_text(json.dumps(data, indent=1) + "\n")


def load_geometry(path) -> list[LayerGeometry]:
  """Reads :func:`save_geometry`'s JSON.

  Raises:
    ValueError: if the file does not describe layers.
  """
  try:
    data = json.loads(Path(path).read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot read geometry JSON: {e}") from None
  if not isinstance(data, list):
    raise ValueError(f"{path}: geometry JSON must be a list of layers")
  layers = []
  for i, item in enumerate(data):
    try:
      item = dict(item)
      for key in ("kernel", "out_hw", "folded"):
        if key in item:
          item[key] = tuple(item[key])
      layers.append(LayerGeometry(**item))
    except (TypeError, ValueError) as e:
      raise ValueError(f"{path}: layer {i} is not a valid geometry entry: {e}") from None
  return layers
