"""Small pytree utilities shared by the modules: path names, NNX unwrapping."""

from __future__ import annotations

import jax


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
