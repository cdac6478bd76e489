"""Inference export: batch norm folded into a per-channel scale and shift, float16 elsewhere.

In eval mode a batch norm is an affine map per channel,

.. math:: y = \\gamma \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}} + \\beta
          = s x + t, \\qquad s = \\frac{\\gamma}{\\sqrt{\\sigma^2 + \\epsilon}},
          \\quad t = \\beta - s \\mu,

so an inference file keeps ``s`` and ``t`` (computed in float64, stored as
float32) instead of the four vectors and the step counter. The ternary kernels
stay exact (the packed format stores them bitwise); every other float leaf is
stored as float16, which is *lossy for those leaves only*.
``s`` is not multiplied into the ternary kernel, which would make it
per-channel and no longer ternary.

Two naming conventions are recognised:

* a PyTorch state dict (an ``.npz``): ``P.weight``, ``P.bias``,
  ``P.running_mean``, ``P.running_var`` (and ``P.num_batches_tracked``)
  become ``P.scale`` and ``P.shift``, at the position of the first of them;
* Flax variables ``{"params": ..., "batch_stats": ...}``: a module with
  ``mean`` / ``var`` in ``batch_stats`` gets ``scale = s`` and ``bias = t`` in
  ``params`` and leaves ``batch_stats``.

:func:`unfold_batch_norm` goes back to a model-ready tree whose batch norms
compute exactly ``s x + t``: ``mean = 0``, ``var = 1 - eps`` (so that
``sqrt(var + eps) = 1``), ``weight`` / ``scale = s``, ``bias = t``.

Example:
  >>> import numpy as np
  >>> from ec2t_jax.export import fold_batch_norm
  >>> state = {"bn.weight": np.array([2.0], np.float32), "bn.bias": np.array([1.0], np.float32),
  ...          "bn.running_mean": np.array([3.0], np.float32),
  ...          "bn.running_var": np.array([4.0 - 1e-5], np.float32)}
  >>> folded = fold_batch_norm(state)
  >>> {k: v.tolist() for k, v in folded.items()}
  {'bn.scale': [1.0], 'bn.shift': [-2.0]}
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

EPS = 1e-5  # PyTorch's and Flax's default batch-norm epsilon
_TORCH_PARTS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _affine(gamma, beta, mean, var, eps: float, dtype) -> tuple[np.ndarray, np.ndarray]:
  mean = np.asarray(mean, np.float64)
  scale = np.ones_like(mean) if gamma is None else np.asarray(gamma, np.float64)
  shift = np.zeros_like(mean) if beta is None else np.asarray(beta, np.float64)
  s = scale / np.sqrt(np.asarray(var, np.float64) + eps)
  return s.astype(dtype), (shift - s * mean).astype(dtype)


def _torch_groups(state: Mapping[str, Any]) -> set[str]:
  return {k[:-len(".running_mean")] for k in state
          if k.endswith(".running_mean") and k[:-len("mean")] + "var" in state}


def _is_flax_variables(tree) -> bool:
  return isinstance(tree, Mapping) and "params" in tree and "batch_stats" in tree


def fold_batch_norm(tree, *, eps: float = EPS):
  """Replaces every batch norm by its per-channel scale and shift (module docstring).

  Args:
    tree: a flat PyTorch-style state dict, or Flax ``{"params", "batch_stats"}``
      variables (other collections are kept).
    eps: the batch norms' epsilon.

  Returns:
    The same kind of tree with the batch norms folded; other leaves untouched.

  Raises:
    ValueError: if ``tree`` has no batch norm of either kind.
  """
  if _is_flax_variables(tree):
    return _fold_flax(tree, eps)
  if isinstance(tree, Mapping) and _torch_groups(tree):
    return _fold_torch(tree, eps)
  raise ValueError("no batch norm found to fold: expected a PyTorch state dict with "
                   "'*.running_mean' / '*.running_var' or Flax variables with 'batch_stats'")


def _fold_torch(state, eps):
  groups = _torch_groups(state)
  out = {}
  for key, value in state.items():
    prefix, _, part = key.rpartition(".")
    if prefix not in groups or part not in _TORCH_PARTS:
      out[key] = value
      continue
    if f"{prefix}.scale" in out:
      continue
    mean = state[f"{prefix}.running_mean"]
    dtype = np.result_type(np.asarray(mean).dtype, np.float32)
    s, t = _affine(state.get(f"{prefix}.weight"), state.get(f"{prefix}.bias"), mean,
                   state[f"{prefix}.running_var"], eps, dtype)
    out[f"{prefix}.scale"], out[f"{prefix}.shift"] = s, t
  return out


def _fold_flax(variables, eps):
  def walk(params, stats):
    out = {}
    for name, child in params.items():
      node = stats.get(name) if isinstance(stats, Mapping) else None
      if isinstance(child, Mapping) and isinstance(node, Mapping) and {"mean", "var"} <= set(node):
        dtype = np.result_type(np.asarray(node["mean"]).dtype, np.float32)
        s, t = _affine(child.get("scale"), child.get("bias"), node["mean"], node["var"], eps,
                       dtype)
        out[name] = {"scale": s, "bias": t}
      elif isinstance(child, Mapping):
        out[name] = walk(child, node if isinstance(node, Mapping) else {})
      else:
        out[name] = child
    return out

  rest = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
  return {"params": walk(variables["params"], variables["batch_stats"]), **rest}


def unfold_batch_norm(tree, *, eps: float = EPS, batch_norm_paths=None):
  """A model-ready tree from a folded one: batch norms that compute ``s x + t``.

  Args:
    tree: :func:`fold_batch_norm`'s output (as loaded back from a file).
    eps: the epsilon the model's batch norms use.
    batch_norm_paths: for Flax variables, the ``/``-joined module paths that
      are batch norms (a folded Flax tree cannot tell them from other modules
      with ``scale`` and ``bias``); ignored for PyTorch state dicts.

  Returns:
    PyTorch state dict with ``weight``, ``bias``, ``running_mean = 0``,
    ``running_var = 1 - eps``; or Flax variables with a ``batch_stats``
    collection holding ``mean = 0``, ``var = 1 - eps``.
  """
  if isinstance(tree, Mapping) and "params" in tree:
    return _unfold_flax(tree, eps, set(batch_norm_paths or ()))
  out = {}
  for key, value in tree.items():
    prefix, _, part = key.rpartition(".")
    if part == "scale" and f"{prefix}.shift" in tree:
      value = np.asarray(value)
      out[f"{prefix}.weight"] = value
      out[f"{prefix}.bias"] = np.asarray(tree[f"{prefix}.shift"])
      out[f"{prefix}.running_mean"] = np.zeros_like(value)
      out[f"{prefix}.running_var"] = np.full_like(value, 1.0 - eps)
    elif not (part == "shift" and f"{prefix}.scale" in tree):
      out[key] = value
  return out


def _unfold_flax(variables, eps, paths):
  stats: dict = {}
  for path in paths:
    node, target = variables["params"], stats
    parts = path.split("/")
    for name in parts:
      node = node[name]
    for name in parts[:-1]:
      target = target.setdefault(name, {})
    scale = np.asarray(node["scale"])
    target[parts[-1]] = {"mean": np.zeros_like(scale), "var": np.full_like(scale, 1.0 - eps)}
  return {**variables, "batch_stats": stats}
