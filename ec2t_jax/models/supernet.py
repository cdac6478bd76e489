r"""Function-preserving super-networks: a pretrained CIFAR ResNet scaled up in width and depth.

EC2T's first step scales a pretrained model up (compound scaling, EfficientNet
style) and ternarizes the bigger one. :func:`transfer_to_supernet` starts that
super-network from the pretrained weights so that it computes **the same
function**; it need not be retrained in full precision from scratch.

**Wider (Net2WiderNet).** Every channel of the wide network is a copy of a
channel of the base network, given by a map ``m: wide channel -> base channel``
that covers every base channel. A producer (conv output channel ``o`` and its
batch norm) copies base channel ``m(o)``: kernel, scale, bias, running mean and
variance. A consumer (the next conv's or the classifier's input channel ``i``)
takes base input ``m(i)`` divided by the number of copies of ``m(i)``:

.. math:: K'_{\cdot,\cdot,i,o} = K_{\cdot,\cdot,m_{in}(i),m_{out}(o)} / |m_{in}^{-1}(m_{in}(i))|

so every wide pre-activation equals the base pre-activation of its source
channel. Batch norm is per channel, so copied channels have equal batch
statistics too: the function is kept with running *and* batch statistics.

**Option-A shortcuts** constrain the maps of the residual streams. Entering
stage ``s``, the shortcut puts the previous stream at channels
``[P, P + C_{s-1})`` of the new one (``P = (C_s - C_{s-1}) // 2``) and zeros
elsewhere (``p``, ``c`` for the base network). So wide channel ``P + i`` must
copy base channel ``p + m_{s-1}(i)``, and the other ``C_s - C_{s-1}`` wide
channels must copy the base's zero-padded channels (where the base shortcut also
adds zero). This needs ``C_s - C_{s-1} >= c_s - c_{s-1}`` at every stage
change; :func:`transfer_to_supernet` checks it. Option-B shortcuts (1x1 conv +
batch norm) are ordinary producer/consumer layers.

**Deeper (Net2DeeperNet).** Each stage gets identity blocks: the block's
second batch norm has scale 0 and bias 0, so its branch adds exactly zero and
``relu(0 + x) = x`` (``x`` is a ReLU output); its convolutions keep the fresh
initialisation of the target model, so gradients flow once the scale moves.
The pretrained blocks keep their order and are spread evenly among the new
ones (block 0 of a stage, which changes the resolution, stays first).

**Noise.** Copies of a channel receive identical gradients, so they would stay
copies. ``noise`` adds ``noise * std(K) * N(0, 1)`` to every transferred
kernel ``K`` (0 keeps the function exactly).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from ec2t_jax.models import cifar_resnet, scale_pretrained_resnet
  >>> base = cifar_resnet(8)
  >>> variables = jax.jit(base.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  >>> supernet, wide = scale_pretrained_resnet(base, variables, depth_multiplier=1.4,
  ...                                          width_multiplier=1.2, noise=0.0)
  >>> supernet.blocks_per_stage, supernet.stage_features
  ((2, 2, 2), (16, 40, 80))
  >>> x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))  # any image size
  >>> bool(jnp.allclose(jax.jit(base.apply)(variables, x),
  ...                   jax.jit(supernet.apply)(wide, x), atol=1e-4))
  True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ec2t_jax.models.resnet import CifarResNet, cifar_resnet

__all__ = ["cifar_resnet_from_params", "scale_pretrained_resnet", "transfer_to_supernet"]


def _stages(params: Mapping[str, Any]) -> list[list[str]]:
  """Block names per stage, in order (``layer1_0, layer1_1, ...``)."""
  stages: dict[int, list[tuple[int, str]]] = {}
  for name in params:
    if name.startswith("layer") and "_" in name:
      stage, block = name[len("layer"):].split("_", 1)
      if stage.isdigit() and block.isdigit():
        stages.setdefault(int(stage), []).append((int(block), name))
  return [[name for _, name in sorted(stages[s])] for s in sorted(stages)]


def cifar_resnet_from_params(params: Mapping[str, Any], dtype: Any = jnp.float32) -> CifarResNet:
  """The :class:`CifarResNet` whose parameters have the shapes of ``params``.

  Reads blocks per stage, stage widths, classes and the shortcut option from a
  params tree (e.g. a converted PyTorch state dict).

  Args:
    params: The ``params`` collection of a CIFAR ResNet.
    dtype: Computation dtype of the returned module.

  Returns:
    An uninitialised :class:`CifarResNet`.

  Raises:
    ValueError: if ``params`` is not a CIFAR ResNet's (no ``conv1``, ``linear`` or blocks).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from ec2t_jax.models import cifar_resnet, cifar_resnet_from_params
    >>> v = jax.eval_shape(lambda: cifar_resnet(32).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    >>> cifar_resnet_from_params(v["params"]).blocks_per_stage
    (5, 5, 5)
  """
  stages = _stages(params)
  if "conv1" not in params or "linear" not in params or not stages:
    raise ValueError("params: not a CIFAR ResNet (expected conv1, layer<s>_<b> blocks and "
                     f"linear), got top-level names {sorted(params)}")
  shortcut = "B" if any("shortcut_0" in params[b] for s in stages for b in s) else "A"
  return CifarResNet(
      blocks_per_stage=tuple(len(s) for s in stages),
      stage_features=tuple(int(np.shape(params[s[0]]["conv2"]["kernel"])[-1]) for s in stages),
      num_classes=int(np.shape(params["linear"]["kernel"])[-1]), shortcut=shortcut, dtype=dtype)


def _cyclic_map(wide: int, base: int) -> np.ndarray:
  """Wide channel ``j`` copies base channel ``j mod base``: every base channel at least once."""
  return np.arange(wide) % base


def _stream_maps(base: CifarResNet, target: CifarResNet) -> list[np.ndarray]:
  """The channel map of each stage's residual stream (see the module docstring)."""
  maps = [_cyclic_map(target.stage_features[0], base.stage_features[0])]
  for s in range(1, len(base.stage_features)):
    c_prev, c = base.stage_features[s - 1], base.stage_features[s]
    wide_prev, wide = target.stage_features[s - 1], target.stage_features[s]
    if base.shortcut == "B":
      maps.append(_cyclic_map(wide, c))
      continue
    if c == c_prev and wide == wide_prev:  # the shortcut only subsamples: same channels.
      maps.append(maps[-1])
      continue
    if wide - wide_prev < c - c_prev or (wide == wide_prev) != (c == c_prev):
      raise ValueError(
          f"target.stage_features={tuple(target.stage_features)} cannot hold the base "
          f"{tuple(base.stage_features)} with option-A shortcuts: stage {s + 1} must add at "
          f"least {c - c_prev} zero-padded channels to stage {s} (it adds {wide - wide_prev})")
    p, big_p = (c - c_prev) // 2, (wide - wide_prev) // 2
    base_padded = np.concatenate([np.arange(p), np.arange(p + c_prev, c)])
    mapping = np.empty(wide, np.int64)
    mapping[big_p:big_p + wide_prev] = p + maps[-1]
    free = np.concatenate([np.arange(big_p), np.arange(big_p + wide_prev, wide)])
    mapping[free] = base_padded[np.arange(free.size) % base_padded.size]
    maps.append(mapping)
  return maps


class _Widener:
  """Copies producers and divides consumers along channel maps, adding optional noise."""

  def __init__(self, noise: float, rng: np.random.Generator):
    self.noise = noise
    self.rng = rng

  def kernel(self, kernel, in_map: np.ndarray, out_map: np.ndarray) -> np.ndarray:
    kernel = np.asarray(kernel, np.float32)
    counts = np.bincount(in_map, minlength=kernel.shape[-2]).astype(np.float32)
    wide = kernel[..., in_map, :][..., out_map] / counts[in_map][:, None]
    if self.noise:
      wide = wide + self.noise * np.std(kernel) * self.rng.standard_normal(wide.shape,
                                                                             np.float32)
    return wide.astype(np.float32)

  @staticmethod
  def channels(tree: Mapping[str, Any], out_map: np.ndarray) -> dict[str, np.ndarray]:
    """A batch norm's (or bias') per-channel leaves, copied along ``out_map``."""
    return {k: np.asarray(v, np.float32)[out_map] for k, v in tree.items()}


def _check_target(base: CifarResNet, target: CifarResNet) -> None:
  for field in ("num_classes", "shortcut"):
    if getattr(target, field) != getattr(base, field):
      raise ValueError(f"target.{field}={getattr(target, field)!r} differs from the base "
                       f"network's {getattr(base, field)!r}")
  if len(target.stage_features) != len(base.stage_features) or len(
      target.blocks_per_stage) != len(base.blocks_per_stage):
    raise ValueError(f"target has {len(target.stage_features)} stages, the base network "
                     f"{len(base.stage_features)}")
  for s, (wide, c) in enumerate(zip(target.stage_features, base.stage_features)):
    if wide < c:
      raise ValueError(f"target.stage_features={tuple(target.stage_features)}: stage {s + 1} "
                       f"has {wide} channels, fewer than the base network's {c}")
  for s, (deep, n) in enumerate(zip(target.blocks_per_stage, base.blocks_per_stage)):
    if deep < n:
      raise ValueError(f"target.blocks_per_stage={tuple(target.blocks_per_stage)}: stage "
                       f"{s + 1} has {deep} blocks, fewer than the base network's {n}")


def _block_positions(base_blocks: int, target_blocks: int) -> list[int]:
  """Where the pretrained blocks go among ``target_blocks``: spread evenly, block 0 first."""
  return [round(k * target_blocks / base_blocks) for k in range(base_blocks)]


def transfer_to_supernet(base: CifarResNet, variables: Mapping[str, Any], target: CifarResNet,
                         *, noise: float = 0.01, key: jax.Array | int = 0) -> dict[str, Any]:
  """Variables of ``target`` (wider / deeper) that compute the function of ``base``.

  See the module docstring for the construction. With ``noise=0`` the logits
  of ``target`` equal those of ``base`` up to float32 rounding, with running
  batch-norm statistics (``train=False``) and with batch statistics
  (``train=True``).

  Args:
    base: The pretrained network (e.g. :func:`cifar_resnet_from_params` of a
      converted checkpoint).
    variables: Its ``{"params": ..., "batch_stats": ...}``.
    target: The super-network: same stages, classes and shortcut option, at
      least as many blocks per stage and channels per stage.
    noise: Relative symmetry-breaking noise ``>= 0`` added to the transferred
      kernels (``noise * std(K) * N(0, 1)``); 0 keeps the function exactly.
    key: PRNG key (or int seed) of the noise and of the fresh convolutions of
      the inserted blocks.

  Returns:
    ``{"params": ..., "batch_stats": ...}`` of ``target`` as float32 numpy arrays.

  Raises:
    ValueError: naming the argument, if ``noise < 0`` or ``target`` cannot hold
      ``base`` (fewer channels or blocks, different classes or shortcuts, or an
      option-A stage that adds fewer zero-padded channels than the base).
  """
  if not noise >= 0:
    raise ValueError(f"noise must be >= 0, got {noise!r}")
  _check_target(base, target)
  maps = _stream_maps(base, target)
  key = jax.random.key(key) if isinstance(key, int) else key
  init_key, noise_key = jax.random.split(key)
  # Parameter shapes do not depend on the image size: initialise on a small one.
  image_shape = (1, 8, 8, int(np.shape(variables["params"]["conv1"]["kernel"])[-2]))
  fresh = jax.tree.map(np.asarray, target.init(init_key, jnp.zeros(image_shape, jnp.float32)))
  rng = np.random.default_rng(np.asarray(jax.random.key_data(noise_key)).ravel().tolist())
  widen = _Widener(float(noise), rng)
  params_in, stats_in = variables["params"], variables.get("batch_stats", {})
  params, stats = fresh["params"], fresh["batch_stats"]
  image_map = np.arange(image_shape[-1])

  params["conv1"] = {"kernel": widen.kernel(params_in["conv1"]["kernel"], image_map, maps[0])}
  params["bn1"] = widen.channels(params_in["bn1"], maps[0])
  stats["bn1"] = widen.channels(stats_in["bn1"], maps[0])
  stream = maps[0]
  for s, (base_names, deep) in enumerate(zip(_stages(params_in), target.blocks_per_stage)):
    positions = _block_positions(len(base_names), deep)
    for b in range(deep):
      name = f"layer{s + 1}_{b}"
      if b not in positions:  # identity block: the branch adds zero.
        params[name]["bn2"] = {"scale": np.zeros_like(params[name]["bn2"]["scale"]),
                               "bias": np.zeros_like(params[name]["bn2"]["bias"])}
        continue
      old = base_names[positions.index(b)]
      hidden = _cyclic_map(target.stage_features[s], base.stage_features[s])
      out, block_in, block_params = maps[s], stream, params_in[old]
      params[name] = {
          "conv1": {"kernel": widen.kernel(block_params["conv1"]["kernel"], block_in, hidden)},
          "bn1": widen.channels(block_params["bn1"], hidden),
          "conv2": {"kernel": widen.kernel(block_params["conv2"]["kernel"], hidden, out)},
          "bn2": widen.channels(block_params["bn2"], out)}
      stats[name] = {"bn1": widen.channels(stats_in[old]["bn1"], hidden),
                     "bn2": widen.channels(stats_in[old]["bn2"], out)}
      if "shortcut_0" in block_params:
        params[name]["shortcut_0"] = {
            "kernel": widen.kernel(block_params["shortcut_0"]["kernel"], block_in, out)}
        params[name]["shortcut_1"] = widen.channels(block_params["shortcut_1"], out)
        stats[name]["shortcut_1"] = widen.channels(stats_in[old]["shortcut_1"], out)
      stream = out
  counts = np.bincount(stream).astype(np.float32)
  linear = np.asarray(params_in["linear"]["kernel"], np.float32)
  params["linear"] = {
      "kernel": (linear[stream] / counts[stream][:, None]).astype(np.float32),
      "bias": np.asarray(params_in["linear"]["bias"], np.float32)}
  return {"params": params, "batch_stats": stats}


def scale_pretrained_resnet(base: CifarResNet, variables: Mapping[str, Any], *,
                            depth_multiplier: float = 1.4, width_multiplier: float = 1.2,
                            noise: float = 0.01, key: jax.Array | int = 0,
                            ) -> tuple[CifarResNet, dict[str, Any]]:
  """Compound-scales a pretrained CIFAR ResNet and transfers its function.

  Blocks per stage become ``ceil(n * depth_multiplier)`` and widths
  ``round8(c * width_multiplier)``, as in :func:`cifar_resnet`; the defaults
  are the paper's per-step factors (d = 1.4, w = 1.2; pass ``alpha**phi`` and
  ``beta**phi`` for a compound coefficient ``phi``).

  Args:
    base: The pretrained network.
    variables: Its ``{"params": ..., "batch_stats": ...}``.
    depth_multiplier: ``>= 1``.
    width_multiplier: ``>= 1``.
    noise: See :func:`transfer_to_supernet`.
    key: See :func:`transfer_to_supernet`.

  Returns:
    ``(supernet, supernet_variables)``.

  Raises:
    ValueError: naming the argument, for multipliers below 1 or widths that
      cannot hold the base network.
  """
  for name, value in (("depth_multiplier", depth_multiplier),
                      ("width_multiplier", width_multiplier)):
    if not (math.isfinite(value) and value >= 1.0):
      raise ValueError(f"{name} must be >= 1 (a super-network is at least as big as the "
                       f"pretrained one), got {value!r}")
  blocks = tuple(math.ceil(n * depth_multiplier - 1e-9) for n in base.blocks_per_stage)
  widths = tuple(base.stage_features)
  if width_multiplier != 1.0:
    widths = tuple(max(c, 8 * int(round(c * width_multiplier / 8))) for c in widths)
  target = base.clone(blocks_per_stage=blocks, stage_features=widths)
  try:
    return target, transfer_to_supernet(base, variables, target, noise=noise, key=key)
  except ValueError as error:
    if str(error).startswith("target.stage_features"):
      raise ValueError(f"width_multiplier={width_multiplier!r} gives widths {widths} that "
                       f"cannot hold {tuple(base.stage_features)}: {error}") from None
    raise
