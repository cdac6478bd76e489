"""Convert PyTorch state dicts to Flax Linen ``params`` and ``batch_stats``.

A PyTorch ``state_dict`` maps dotted names to tensors in PyTorch layouts. This
module turns it into the two Flax variable collections, by name:

==============================  ===============================  ===========================
PyTorch key                      Flax path                        layout change
==============================  ===============================  ===========================
``conv1.weight`` (4-D)           ``params/conv1/kernel``          OIHW -> HWIO
``linear.weight`` (2-D)          ``params/linear/kernel``         [out, in] -> [in, out]
``bn1.weight`` (1-D)             ``params/bn1/scale``             --
``*.bias``                       ``params/*/bias``                --
``bn1.running_mean``             ``batch_stats/bn1/mean``         --
``bn1.running_var``              ``batch_stats/bn1/var``          --
``bn1.num_batches_tracked``      dropped                          --
==============================  ===============================  ===========================

Dotted module names become nested Flax scopes, and a purely numeric component
(a ``Sequential`` index) is joined to its parent with ``_``:
``layer1.0.conv1.weight`` -> ``layer1_0/conv1/kernel``,
``layer2.0.shortcut.0.weight`` -> ``layer2_0/shortcut_0/kernel``. The models in
:mod:`ec2t_jax.models.resnet` use exactly these names, so the official EC2T
ResNet-20 checkpoint converts without a hand-written table.

Batch-norm semantics match (PyTorch ``momentum=0.1`` is Flax ``momentum=0.9``;
both use ``eps=1e-5`` and the biased batch variance for normalisation). PyTorch
stores the *unbiased* running variance; Flax uses the stored value as is, exactly
as PyTorch does in eval mode, so inference is identical.

Example:
  >>> import numpy as np
  >>> from ec2t_jax.models import convert_state_dict
  >>> sd = {"fc.weight": np.zeros((3, 5), np.float32), "fc.bias": np.zeros(3, np.float32)}
  >>> params, batch_stats = convert_state_dict(sd)
  >>> params["fc"]["kernel"].shape, batch_stats
  ((5, 3), {})
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

__all__ = [
    "CheckpointMismatchError",
    "convert_state_dict",
    "to_state_dict",
    "load_state_dict",
    "load_torch_checkpoint",
    "flax_path",
]

_NUMERIC = re.compile(r"^\d+$")
_DROPPED_SUFFIXES = ("num_batches_tracked",)


class CheckpointMismatchError(ValueError):
  """The converted variables do not match the target model (names or shapes)."""


def flax_path(torch_key: str, ndim: int) -> tuple[str, tuple[str, ...]] | None:
  """Maps one PyTorch state-dict key to ``(collection, path)`` in Flax, or ``None`` if dropped.

  Args:
    torch_key: e.g. ``"layer1.0.bn2.running_var"``.
    ndim: Rank of the tensor (decides ``weight`` -> ``kernel`` or ``scale``).

  Returns:
    e.g. ``("batch_stats", ("layer1_0", "bn2", "var"))``.

  Example:
    >>> from ec2t_jax.models.torch_convert import flax_path  # internal
    >>> flax_path("layer1.0.conv1.weight", 4)
    ('params', ('layer1_0', 'conv1', 'kernel'))
  """
  *modules, leaf = torch_key.split(".")
  if leaf in _DROPPED_SUFFIXES:
    return None
  scopes: list[str] = []
  for part in modules:
    if _NUMERIC.match(part) and scopes:
      scopes[-1] = f"{scopes[-1]}_{part}"
    else:
      scopes.append(part)
  if leaf == "weight":
    return "params", (*scopes, "kernel" if ndim >= 2 else "scale")
  if leaf == "bias":
    return "params", (*scopes, "bias")
  if leaf == "running_mean":
    return "batch_stats", (*scopes, "mean")
  if leaf == "running_var":
    return "batch_stats", (*scopes, "var")
  raise ValueError(f"don't know how to convert state-dict entry {torch_key!r} "
                   "(expected weight, bias, running_mean, running_var or num_batches_tracked)")


def _to_flax_layout(array: np.ndarray) -> np.ndarray:
  if array.ndim == 4:  # conv: [out, in, kh, kw] -> [kh, kw, in, out]
    return np.transpose(array, (2, 3, 1, 0))
  if array.ndim == 3:  # conv1d: [out, in, k] -> [k, in, out]
    return np.transpose(array, (2, 1, 0))
  if array.ndim == 2:  # linear: [out, in] -> [in, out]
    return array.T
  return array


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def convert_state_dict(state_dict: Mapping[str, Any], target: Mapping[str, Any] | None = None,
                       ) -> tuple[dict, dict]:
  """Converts a PyTorch state dict into Flax ``(params, batch_stats)``.

  Args:
    state_dict: Name -> array (numpy arrays, or anything ``np.asarray`` accepts,
      e.g. CPU torch tensors).
    target: Optional Flax variables of the destination model (``model.init(...)``
      output or its ``jax.eval_shape``). When given, every target leaf must be
      produced with the same shape and every converted entry must be used;
      otherwise :class:`CheckpointMismatchError` lists the differences.

  Returns:
    ``(params, batch_stats)`` as nested dicts of float32 numpy arrays
    (``batch_stats`` is ``{}`` for models without batch norm).

  Raises:
    CheckpointMismatchError: if ``target`` is given and does not match.
  """
  collections: dict[str, dict] = {"params": {}, "batch_stats": {}}
  for key, value in state_dict.items():
    array = np.asarray(value)
    mapped = flax_path(key, array.ndim)
    if mapped is None:
      continue
    collection, path = mapped
    _set(collections[collection], path, _to_flax_layout(array).astype(np.float32))
  if target is not None:
    _check_against(collections, target)
  return collections["params"], collections["batch_stats"]


def _flat_shapes(tree: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(dict(tree))[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(leaf))
          for path, leaf in leaves}


def _check_against(converted: Mapping[str, Any], target: Mapping[str, Any]) -> None:
  got = _flat_shapes({c: converted[c] for c in ("params", "batch_stats") if converted.get(c)})
  want = _flat_shapes({c: target[c] for c in ("params", "batch_stats") if c in target})
  missing = sorted(set(want) - set(got))
  unused = sorted(set(got) - set(want))
  wrong = sorted(k for k in set(got) & set(want) if got[k] != want[k])
  if missing or unused or wrong:
    lines = [f"checkpoint does not match the model: {len(missing)} missing, "
             f"{len(unused)} unexpected, {len(wrong)} with wrong shape"]
    lines += [f"  missing:    {k} {want[k]}" for k in missing[:10]]
    lines += [f"  unexpected: {k} {got[k]}" for k in unused[:10]]
    lines += [f"  shape:      {k} checkpoint {got[k]} vs model {want[k]}" for k in wrong[:10]]
    raise CheckpointMismatchError("\n".join(lines))


def _torch_key(path: tuple[str, ...], collection: str) -> tuple[str, bool]:
  """Inverse of :func:`flax_path`: returns ``(torch_key, is_kernel)``."""
  *scopes, leaf = path
  modules = []
  for scope in scopes:
    base, _, index = scope.rpartition("_")
    modules.extend([base, index] if base and index.isdigit() else [scope])
  name = {("params", "kernel"): "weight", ("params", "scale"): "weight",
          ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
          ("batch_stats", "var"): "running_var"}.get((collection, leaf))
  if name is None:
    raise ValueError(f"no PyTorch name for {collection}/{'/'.join(path)}")
  return ".".join([*modules, name]), leaf == "kernel"


def _to_torch_layout(array: np.ndarray) -> np.ndarray:
  if array.ndim == 4:
    return np.transpose(array, (3, 2, 0, 1))
  if array.ndim == 3:
    return np.transpose(array, (2, 1, 0))
  if array.ndim == 2:
    return array.T
  return array


def to_state_dict(params: Mapping[str, Any], batch_stats: Mapping[str, Any] | None = None,
                  ) -> dict[str, np.ndarray]:
  """Flax ``params`` (+ ``batch_stats``) -> a PyTorch-style state dict (inverse of :func:`convert_state_dict`).

  ``np.savez(path, **to_state_dict(params, batch_stats))`` writes a file that
  :func:`load_torch_checkpoint` reads back, and that PyTorch loads with
  ``model.load_state_dict({k: torch.from_numpy(v) for k, v in np.load(path).items()},
  strict=False)`` (``num_batches_tracked`` is not written).

  Example:
    >>> import numpy as np
    >>> from ec2t_jax.models import to_state_dict
    >>> params = {"layer1_0": {"conv1": {"kernel": np.zeros((3, 3, 16, 32))}}}
    >>> {k: v.shape for k, v in to_state_dict(params).items()}
    {'layer1.0.conv1.weight': (32, 16, 3, 3)}
  """
  state = {}
  for collection, tree in (("params", params), ("batch_stats", batch_stats or {})):
    for path, leaf in jax.tree_util.tree_flatten_with_path(dict(tree))[0]:
      keys = tuple(str(getattr(k, "key", k)) for k in path)
      name, is_kernel = _torch_key(keys, collection)
      array = np.asarray(leaf)
      state[name] = _to_torch_layout(array) if is_kernel else array
  return state


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a state dict from ``.npz`` (keys = PyTorch names) or, if torch is installed, ``.pt``/``.pth``.

  PyTorch checkpoints that wrap the state dict (``{"state_dict": ...}``) and
  ``DataParallel`` prefixes (``module.``) are unwrapped.

  Args:
    path: File to read.

  Returns:
    Name -> numpy array.
  """
  path = os.fspath(path)
  if path.endswith(".npz"):
    with np.load(path) as data:
      state = {k: data[k] for k in data.files}
  else:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as error:
      raise ValueError(f"{path}: reading PyTorch files needs torch; convert to .npz with "
                       "np.savez(path, **{k: v.numpy() for k, v in state_dict.items()})") from error
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    state = loaded.get("state_dict", loaded) if isinstance(loaded, Mapping) else loaded
    state = {k: v.detach().cpu().numpy() for k, v in state.items()}
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}
  return state


def load_torch_checkpoint(path: str | os.PathLike, target: Mapping[str, Any] | None = None,
                          ) -> tuple[dict, dict]:
  """:func:`load_state_dict` followed by :func:`convert_state_dict`.

  Example:
    >>> # params, batch_stats = load_torch_checkpoint(
    >>> #     "../shared/data/ec2t-reference/resnet20_fp.npz", target=variables)
  """
  return convert_state_dict(load_state_dict(path), target)
