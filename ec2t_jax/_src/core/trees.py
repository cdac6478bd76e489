"""Trees: one naming and ordering convention for the whole library.

**Names.** A leaf is named by its path joined with ``/``: dict keys as
``str(key)``, list / tuple positions as their index (``layers/0/kernel``).
:func:`path_to_str` gives that name from a JAX key path (used by selection,
summary, state access) and :func:`flatten` gives the same names while walking
a tree itself (used by export and report); a flat ``.npz`` state dict is a
one-level dict, so its keys (``layer1.0.conv1.weight``) stay exactly as they
are.

**Order.** JAX orders dict keys by sorting them; :func:`flatten` keeps the
dict's insertion order instead, because the export format must restore *the
same* tree (Flax and NNX trees come back with their key order, an ``.npz``
with its keys in file order). Everything that pairs leaves of two trees goes
by name or by ``jax.tree`` order, never by mixing the two.

Restoring needs more than :func:`flax.traverse_util.flatten_dict`:
:func:`flatten` also records the types of dict keys (NNX's ``to_pure_dict()``
uses ``int`` keys for ``nnx.List`` items, Linen uses ``str``), lists and
tuples (orbax restores lists), ``None`` leaves and 0-d arrays, as a small
JSON-able value:

* a leaf: its index in the flat list (an ``int``);
* ``{"d": [[key, child], ...]}`` for a dict (``key`` a ``str`` or an ``int``);
* ``{"l": [child, ...]}`` for a list, ``{"t": [...]}`` for a tuple;
* ``{"n": 0}`` for ``None``.

It also unwraps NNX objects into plain arrays (:func:`pure_tree`).

Example:
  >>> import jax
  >>> import numpy as np
  >>> from ec2t_jax._src.core.trees import flatten, unflatten, path_to_str  # internal
  >>> leaves, structure = flatten({"a": {"k": np.ones(2)}, "b": [np.zeros(1)]})
  >>> [name for name, _ in leaves]
  ['a/k', 'b/0']
  >>> tree = unflatten([x for _, x in leaves], structure)
  >>> [path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  ['a/k', 'b/0']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

def path_to_str(path) -> str:
  """Joins a JAX key path into ``a/b/0/c``."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _nnx():
  try:
    from flax import nnx  # pylint: disable=g-import-not-at-top
    return nnx
  except ImportError:  # pragma: no cover
    return None


def pure_tree(tree):
  """Unwraps an ``nnx.Optimizer`` and NNX variables into plain arrays.

  Other pytrees are returned unchanged.
  """
  nnx = _nnx()
  if nnx is None:
    return tree
  if isinstance(tree, nnx.Optimizer):
    tree = tree.opt_state
  is_variable = lambda x: isinstance(x, nnx.Variable)
  if isinstance(tree, nnx.State) or any(
      is_variable(x) for x in jax.tree.leaves(tree, is_leaf=is_variable)):
    tree = nnx.as_pure(tree)
  return tree


def nnx_optimizer_type():
  """``nnx.Optimizer``, or a class nothing is an instance of without flax."""
  nnx = _nnx()
  return nnx.Optimizer if nnx is not None else type("_NoNnx", (), {})


Structure = Any  # int | dict (JSON-able), see the module docstring.


def as_mapping(node):
  """Plain nested-dict view of an ``nnx.State`` (or FrozenDict); else ``node``."""
  nnx = _nnx()
  if nnx is not None and isinstance(node, nnx.State):
    return nnx.to_pure_dict(node)
  to_pure = getattr(node, "to_pure_dict", None)
  if callable(to_pure) and not isinstance(node, dict):
    return to_pure()
  return node


def flatten(tree, *, as_numpy: bool = True) -> tuple[list[tuple[str, Any]], Structure]:
  """Flattens ``tree`` into ``[(path, array), ...]`` and a JSON-able structure.

  Args:
    tree: nested dicts / lists / tuples of arrays (numpy, JAX, Python scalars);
      ``flax.core.FrozenDict`` and ``nnx.State`` are accepted (the latter via
      ``to_pure_dict()``).
    as_numpy: convert leaves with :func:`numpy.asarray` (and check they are
      numeric); with False leaves are kept as they are (e.g.
      ``jax.ShapeDtypeStruct`` from ``jax.eval_shape``).

  Returns:
    ``(leaves, structure)``: ``leaves`` in depth-first, insertion order, each
    leaf converted with :func:`numpy.asarray`; ``structure`` for
    :func:`unflatten`.

  Raises:
    ValueError: for keys that are neither ``str`` nor ``int``, or for leaves
      that are not numeric arrays (e.g. strings or objects).
  """
  leaves: list[tuple[str, np.ndarray]] = []

  def walk(node, prefix: tuple) -> Structure:
    node = as_mapping(node)
    if node is None:
      return {"n": 0}
    if isinstance(node, Mapping):
      items = []
      for key, child in node.items():
        if isinstance(key, (bool, np.bool_)) or not isinstance(key, (str, int, np.integer)):
          raise ValueError(f"tree keys must be str or int, got {key!r} "
                           f"at {'/'.join(map(str, prefix)) or '<root>'}")
        key = key if isinstance(key, str) else int(key)
        items.append([key, walk(child, prefix + (key,))])
      return {"d": items}
    if isinstance(node, (list, tuple)):
      children = [walk(child, prefix + (i,)) for i, child in enumerate(node)]
      return {"l" if isinstance(node, list) else "t": children}
    if not as_numpy:
      leaves.append(("/".join(map(str, prefix)), node))
      return len(leaves) - 1
    array = np.asarray(node)
    if array.dtype.kind not in "biufc" and array.dtype.name != "bfloat16":
      raise ValueError(f"leaf {'/'.join(map(str, prefix))!r} is not a numeric "
                       f"array (dtype {array.dtype})")
    leaves.append(("/".join(map(str, prefix)), array))
    return len(leaves) - 1

  structure = walk(tree, ())
  return leaves, structure


def unflatten(leaves, structure: Structure):
  """Inverse of :func:`flatten`: rebuilds the tree from its leaves.

  Args:
    leaves: the arrays, in :func:`flatten`'s order.
    structure: the structure returned by :func:`flatten`.

  Returns:
    The nested dicts / lists / tuples with ``leaves`` in place.

  Raises:
    ValueError: if ``structure`` is malformed or refers to missing leaves.
  """
  used = set()

  def build(node):
    if isinstance(node, bool):
      raise ValueError("malformed tree structure: boolean node")
    if isinstance(node, int):
      if not 0 <= node < len(leaves) or node in used:
        raise ValueError(f"malformed tree structure: leaf index {node}")
      used.add(node)
      return leaves[node]
    if not isinstance(node, dict) or len(node) != 1:
      raise ValueError(f"malformed tree structure node: {node!r:.80}")
    (kind, body), = node.items()
    if kind == "n":
      return None
    if not isinstance(body, list):
      raise ValueError(f"malformed tree structure node: {node!r:.80}")
    if kind == "d":
      out = {}
      for item in body:
        if (not isinstance(item, list) or len(item) != 2
            or isinstance(item[0], bool) or not isinstance(item[0], (str, int))
            or item[0] in out):
          raise ValueError(f"malformed dict entry in tree structure: {item!r:.80}")
        out[item[0]] = build(item[1])
      return out
    if kind == "l":
      return [build(child) for child in body]
    if kind == "t":
      return tuple(build(child) for child in body)
    raise ValueError(f"unknown tree structure node kind {kind!r}")

  tree = build(structure)
  if len(used) != len(leaves):
    raise ValueError(f"tree structure uses {len(used)} of {len(leaves)} leaves")
  return tree


def leaf_paths(structure: Structure) -> list[str]:
  """The ``/``-joined path of every leaf, in leaf order, from a structure."""
  paths: dict[int, str] = {}

  def walk(node, prefix):
    if isinstance(node, int) and not isinstance(node, bool):
      paths[node] = "/".join(map(str, prefix))
    elif isinstance(node, dict) and len(node) == 1:
      (kind, body), = node.items()
      if kind == "d":
        for key, child in body:
          walk(child, prefix + (key,))
      elif kind in ("l", "t"):
        for i, child in enumerate(body):
          walk(child, prefix + (i,))

  walk(structure, ())
  return [paths[i] for i in sorted(paths)]
