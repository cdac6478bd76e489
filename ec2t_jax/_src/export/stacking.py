"""Stacked layers in packed files: one record per slice, the stack restored on load.

A leaf that stacks layers along its leading axis (``nn.scan`` / ``nnx.vmap``
blocks, shape ``(L, ...)``) holds a different ternary grid per layer, so as a
whole it has up to ``2L + 1`` values and no ternary codec fits it.
:func:`split_stacked` replaces such a leaf, in its parent dict, by one leaf
per slice named ``kernel[0]``, ``kernel[1]``, ... (each then gets its own
ternary record) and returns what it split; :func:`restack` undoes it exactly
(``np.stack`` of the slices: same dtype, same bits), so :func:`load` gives
back the stacked tree bitwise. What was split is stored in the file's user
metadata under :data:`METADATA_KEY`.

A leaf is split when it has at least 3 axes and more than three distinct
values while every slice along axis 0 has at most three (applied again to the
slices for stacks of stacks).

Example:
  >>> import numpy as np
  >>> from ec2t_jax._src.export.stacking import split_stacked, restack  # internal
  >>> stacked = np.stack([np.array([[0.5, 0.0], [-0.25, 0.5]], np.float32),
  ...                     np.array([[0.0, 0.75], [-0.5, 0.0]], np.float32)])
  >>> tree, split = split_stacked({"blocks": {"kernel": stacked}})
  >>> sorted(tree["blocks"]), split
  (['kernel[0]', 'kernel[1]'], [[['blocks', 'kernel'], 1]])
  >>> np.array_equal(restack(tree, split)["blocks"]["kernel"], stacked)
  True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

METADATA_KEY = "ec2t_stacked_leaves"


def _distinct_at_most(array: np.ndarray, k: int) -> bool:
  flat = np.ascontiguousarray(array).reshape(-1)
  bits = flat.view(np.dtype(f"u{flat.dtype.itemsize}"))
  return np.unique(bits[:64]).size <= k and np.unique(bits).size <= k


def _slices(array: np.ndarray) -> int:
  """How many leading axes to split ``array`` along (0: keep whole)."""
  if array.ndim < 3 or array.dtype.kind != "f" and array.dtype.name != "bfloat16":
    return 0
  if array.shape[0] == 0 or _distinct_at_most(array, 3):
    return 0
  if all(_distinct_at_most(s, 3) for s in array):
    return 1
  deeper = [_slices(s) for s in array]
  return 1 + min(deeper) if min(deeper) > 0 else 0


def _suffixes(shape: tuple) -> list[tuple[str, tuple]]:
  return [("[" + ",".join(map(str, index)) + "]", index) for index in np.ndindex(*shape)]


def split_stacked(tree, keep=()) -> tuple[Any, list]:
  """Splits the stacked ternary leaves of nested dicts into per-slice leaves.

  Args:
    tree: nested dicts / lists of numpy arrays (:func:`trees.unflatten`'s
      output).
    keep: ``/``-joined paths never split.

  Returns:
    ``(tree, split)``: the tree with ``key`` replaced by ``key[i]`` (or
    ``key[i,j]``) in its parent dict, and ``[[path_keys, depth], ...]`` (JSON)
    for :func:`restack`.
  """
  split: list = []

  def walk(node, prefix):
    if isinstance(node, Mapping):
      out = {}
      for key, child in node.items():
        path = "/".join(map(str, prefix + (key,)))
        depth = (_slices(child) if isinstance(child, np.ndarray) and path not in keep
                 else 0)
        if depth and isinstance(key, str):
          for suffix, index in _suffixes(child.shape[:depth]):
            out[key + suffix] = child[index]
          split.append([list(prefix) + [key], depth])
        else:
          out[key] = walk(child, prefix + (key,))
      return out
    if isinstance(node, (list, tuple)):
      return type(node)(walk(c, prefix + (i,)) for i, c in enumerate(node))
    return node

  return walk(tree, ()), split


def restack(tree, split, stack=np.stack):
  """Inverse of :func:`split_stacked`: stacks ``key[i]`` back into ``key``.

  Args:
    tree: the loaded tree (nested dicts / lists).
    split: :func:`split_stacked`'s record (from the file's metadata).
    stack: how slices become one leaf (``np.stack``; :func:`load_ternary`
      keeps them as a list).

  Raises:
    ValueError: ``split`` does not match the tree (a corrupt file).
  """
  for entry in split or ():
    try:
      _restack_one(tree, entry, stack)
    except (KeyError, TypeError, ValueError, IndexError) as e:
      raise ValueError(f"stacked-leaf record {entry!r:.120} does not match the tree "
                       f"({type(e).__name__}: {e})") from None
  return tree


def _restack_one(tree, entry, stack) -> None:
  """Stacks the slices of one :func:`split_stacked` record back into their leaf, in place."""
  keys, depth = entry
  *parents, key = keys
  parent = tree
  for k in parents:
    parent = parent[k]
  slices = [k for k in parent if isinstance(k, str) and k.startswith(key + "[")]
  shape = tuple(max(int(i) for i in names) + 1 for names in
                zip(*(k[len(key) + 1:-1].split(",") for k in slices)))
  if len(shape) != depth or len(slices) != int(np.prod(shape)):
    raise ValueError(f"{len(slices)} slices, stack shape {shape}")
  pieces = [parent[key + suffix] for suffix, _ in _suffixes(shape)]
  _replace_slices(parent, slices, key, _stack_nested(pieces, shape, stack))


def _replace_slices(parent: dict, slices: list, key, value) -> None:
  """``parent`` with ``slices`` replaced by ``key: value`` where the first slice was."""
  items = list(parent.items())
  first = next(i for i, (k, _) in enumerate(items) if k in slices)
  rebuilt = [(k, v) for k, v in items[:first] if k not in slices] + [(key, value)]
  rebuilt += [(k, v) for k, v in items[first:] if k not in slices]
  parent.clear()
  parent.update(rebuilt)


def _stack_nested(pieces: list, shape: tuple, stack):
  if len(shape) == 1:
    return stack(pieces)
  step = int(np.prod(shape[1:]))
  return stack([_stack_nested(pieces[i * step:(i + 1) * step], shape[1:], stack)
                for i in range(shape[0])])
