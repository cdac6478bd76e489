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

Names. The slice names cannot meet a real leaf's name: :func:`split_stacked`
refuses a tree where a leaf to split, ``kernel``, has a sibling whose name
starts with ``kernel[`` (a real leaf ``kernel[3]`` would otherwise be
overwritten by a slice, or stacked back into ``kernel`` on load), and
:func:`restack` (``ValueError``) / :func:`restack_file` (``ExportFormatError``)
refuse a file whose record does not match its tree exactly: the record is not a list of ``[keys, depth]``, the
stacked name is also a leaf, the slice names are not exactly ``key[i]`` (or
``key[i,j]``) for every index of one stack shape, or the slices are not arrays
of one dtype and one shape (``np.stack`` would promote them silently).

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

import math
import re
from collections.abc import Mapping
from typing import Any, Callable, Optional

import numpy as np

from ec2t_jax._src.export.errors import ExportFormatError

METADATA_KEY = "ec2t_stacked_leaves"
MAX_STACK_NDIM = 32  # a record's depth (the container's MAX_NDIM)
_INDEX = re.compile(r"\[(0|[1-9][0-9]*)((?:,(?:0|[1-9][0-9]*))*)\]")


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

  Raises:
    ValueError: a leaf to split has a sibling named ``key[...]`` (the slices'
      names), naming both.
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
          _refuse_slice_names(node, key, path)
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


def _refuse_slice_names(parent: Mapping, key: str, path: str) -> None:
  clash = [k for k in parent if isinstance(k, str) and k != key and k.startswith(key + "[")]
  if clash:
    where = path[:-len(key)]
    raise ValueError(
        f"leaf {where + clash[0]!r:.120} has the name the export gives a slice of the stacked "
        f"leaf {path!r:.120} (stored as {key}[0], {key}[1], ...); rename that leaf or "
        f"keep {path!r:.120} whole with full_precision")


def array_signature(piece) -> Optional[tuple]:
  """``(dtype, shape)`` of a numpy array that may be stacked, else ``None``."""
  if isinstance(piece, np.ndarray) and piece.dtype != object:
    return piece.dtype, piece.shape
  return None


def _index(name: str, key: str) -> Optional[tuple[int, ...]]:
  match = _INDEX.fullmatch(name, len(key)) if name.startswith(key) else None
  if match is None:
    return None
  return (int(match.group(1)),) + tuple(int(i) for i in match.group(2).split(",")[1:])


def _entry(entry) -> tuple[list, str, int]:
  """``(parent keys, key, depth)`` of one record entry, its types checked."""
  if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)
          and entry[0] and isinstance(entry[0][-1], str)):
    raise ValueError("not [[keys..., name], depth]")
  keys, depth = entry
  if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in keys):
    raise ValueError("a key is neither a string nor an integer")
  if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= MAX_STACK_NDIM:
    raise ValueError(f"depth {depth!r} is not an integer in [1, {MAX_STACK_NDIM}]")
  return keys[:-1], keys[-1], depth


def restack(tree, split, stack=np.stack, signature: Callable = array_signature):
  """Inverse of :func:`split_stacked`: stacks ``key[i]`` back into ``key``.

  Args:
    tree: the loaded tree (nested dicts / lists).
    split: :func:`split_stacked`'s record (from the file's metadata).
    stack: how slices become one leaf (``np.stack``; :func:`load_ternary`
      keeps them as a list).
    signature: ``piece -> (dtype, shape)`` or ``None`` for a piece that may
      not be stacked (default: numpy arrays of a non-object dtype).

  Raises:
    ValueError: ``split`` does not match the tree (a corrupt file; see the
      module docstring).
  """
  if not isinstance(split, list):
    raise ValueError(f"stacked-leaf record {split!r:.120} is a {type(split).__name__}, "
                     "not a list")
  for entry in split:
    try:
      _restack_one(tree, entry, stack, signature)
    except (KeyError, TypeError, ValueError, IndexError) as e:
      raise ValueError(f"stacked-leaf record {entry!r:.120} does not match the tree "
                       f"({type(e).__name__}: {e})") from None
  return tree


def _restack_one(tree, entry, stack, signature) -> None:
  """Stacks the slices of one :func:`split_stacked` record back into their leaf, in place."""
  parents, key, depth = _entry(entry)
  parent = tree
  for k in parents:
    parent = parent[k]
  if not isinstance(parent, dict):
    raise ValueError(f"the parent is a {type(parent).__name__}, not a dict")
  if key in parent:
    raise ValueError(f"the stacked name {key!r} is also a leaf")
  slices = {k: _index(k, key) for k in parent if isinstance(k, str) and k.startswith(key + "[")}
  if not slices or None in slices.values() or {len(i) for i in slices.values()} != {depth}:
    raise ValueError(f"slice names {sorted(slices)[:4]!r:.120} are not {key}[i] "
                     f"with {depth} index(es)")
  shape = tuple(max(i[a] for i in slices.values()) + 1 for a in range(depth))
  if len(slices) != math.prod(shape):  # Python ints: no overflow
    raise ValueError(f"{len(slices)} slices, stack shape {shape}")
  pieces = [parent[key + suffix] for suffix, _ in _suffixes(shape)]
  _check_slices(pieces, signature)
  _replace_slices(parent, slices, key, _stack_nested(pieces, shape, stack))


def _check_slices(pieces: list, signature: Callable) -> None:
  """Raises ``ValueError`` unless every slice is an array of one dtype and shape."""
  signatures = {signature(p) for p in pieces}
  if None in signatures:
    kinds = sorted({type(p).__name__ for p in pieces if signature(p) is None})
    raise ValueError(f"a slice is not an array ({', '.join(kinds)})")
  if len(signatures) > 1:
    raise ValueError("slices of different dtypes or shapes: "
                     + ", ".join(sorted(f"{d}{list(s)}" for d, s in signatures))[:120])


def _replace_slices(parent: dict, slices, key, value) -> None:
  """``parent`` with ``slices`` replaced by ``key: value`` where the first slice was."""
  items = list(parent.items())
  first = next(i for i, (k, _) in enumerate(items) if k in slices)
  rebuilt = [(k, v) for k, v in items[:first] if k not in slices] + [(key, value)]
  rebuilt += [(k, v) for k, v in items[first:] if k not in slices]
  parent.clear()
  parent.update(rebuilt)


def restack_file(tree, meta: Mapping, stack=np.stack, signature: Callable = array_signature,
                 where: str = "corrupt file"):
  """:func:`restack` with the record of a file's ``meta`` (none: ``tree`` as it is).

  Raises:
    ExportFormatError: the record does not match the tree (``where``: the
      message's prefix).
  """
  user = meta.get("user") if isinstance(meta, Mapping) else None
  if not isinstance(user, Mapping) or METADATA_KEY not in user:
    return tree
  try:
    return restack(tree, user[METADATA_KEY], stack, signature)
  except ValueError as e:
    raise ExportFormatError(f"{where}: {e}") from None


def _stack_nested(pieces: list, shape: tuple, stack):
  if len(shape) == 1:
    return stack(pieces)
  step = int(np.prod(shape[1:]))
  return stack([_stack_nested(pieces[i * step:(i + 1) * step], shape[1:], stack)
                for i in range(shape[0])])
