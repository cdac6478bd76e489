"""Old public names kept for a while: each warns on use, naming its removal version.

As optax does (``optax/_src/deprecations.py``): a package lists its deprecated
names in a dict and serves them through a module ``__getattr__``, so the
warning is raised where the old name is used (``ec2t.ternarize``,
``from ec2t_jax import ternary_params``) and the object returned is the new
one, unchanged.

Example:
  >>> import warnings
  >>> import ec2t_jax as ec2t
  >>> with warnings.catch_warnings(record=True) as caught:
  ...   warnings.simplefilter("always")
  ...   alias = ec2t.ternary_params
  >>> alias is ec2t.quantized_params, caught[0].category.__name__
  (True, 'DeprecationWarning')
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, NamedTuple


class Deprecated(NamedTuple):
  """An old name: what replaces it and the version that removes it."""
  replacement: str
  value: Any
  removal: str

  def message(self, module: str, name: str) -> str:
    return (f"{module}.{name} is deprecated and will be removed in ec2t_jax {self.removal}; "
            f"use {module}.{self.replacement}")


def warn(message: str) -> None:
  """Raises the library's ``DeprecationWarning`` at the caller of the old name."""
  warnings.warn(message, DeprecationWarning, stacklevel=3)


def deprecation_getattr(module: str, deprecated: Mapping[str, Deprecated]
                        ) -> Callable[[str], Any]:
  """A module ``__getattr__`` serving ``deprecated`` names with a warning.

  Args:
    module: the module's ``__name__`` (for the messages).
    deprecated: old name -> :class:`Deprecated`.

  Returns:
    ``__getattr__(name)``: the new object after a ``DeprecationWarning``;
    ``AttributeError`` for any other unknown name.
  """

  def getattr_(name: str):
    entry = deprecated.get(name)
    if entry is None:
      raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warn(entry.message(module, name))
    return entry.value

  return getattr_
