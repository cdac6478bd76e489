"""The registry of record codecs: name -> :class:`RecordCodec`, in the writer's preference order.

Adding a codec is one module defining a :class:`RecordCodec` (see
:mod:`record_codecs.protocol`) and one :func:`register` line below; the
container derives everything else from the registry (which codecs a version
may hold, which it writes, which are ternary or range-coded, the capacity
check, the dtype rules, the decoder). When two candidates give streams of the
same length, the one registered first wins.

Example:
  >>> from ec2t_jax._src.export.record_codecs import codecs_for_version  # internal
  >>> [c.name for c in codecs_for_version(1)]
  ['raw', 'zs', 'tb', 'te', 'sb', 'se']
"""

from __future__ import annotations

from ec2t_jax._src.export.record_codecs import channel_codebook
from ec2t_jax._src.export.record_codecs import codebook
from ec2t_jax._src.export.record_codecs import dense
from ec2t_jax._src.export.record_codecs import filter_ternary
from ec2t_jax._src.export.record_codecs import sparse
from ec2t_jax._src.export.record_codecs import ternary
from ec2t_jax._src.export.record_codecs.protocol import Leaf, LeafRecord, RecordCodec

_REGISTRY: dict[str, RecordCodec] = {}


def register(codec: RecordCodec) -> RecordCodec:
  """Adds ``codec`` to the registry (after the ones already there).

  Raises:
    ValueError: if a codec of that name is already registered.
  """
  if codec.name in _REGISTRY:
    raise ValueError(f"record codec {codec.name!r} is already registered")
  _REGISTRY[codec.name] = codec
  return codec


def get(name: str) -> RecordCodec:
  """The codec named ``name`` (``KeyError`` if none)."""
  return _REGISTRY[name]


def codecs_for_version(version: int) -> tuple[RecordCodec, ...]:
  """The codecs a file of format ``version`` may hold, in preference order."""
  return tuple(c for c in _REGISTRY.values() if version in c.versions)


def names(version: int, **flags: bool) -> tuple[str, ...]:
  """Names of the codecs of ``version`` whose flags (``ternary=True``, ...) match."""
  return tuple(c.name for c in codecs_for_version(version)
               if all(getattr(c, k) == v for k, v in flags.items()))


def all_names(**flags: bool) -> tuple[str, ...]:
  """Names of every registered codec (any version) whose flags match."""
  return tuple(c.name for c in _REGISTRY.values()
               if all(getattr(c, k) == v for k, v in flags.items()))


register(dense.RAW)
register(dense.ZS)
register(ternary.TB)
register(ternary.TE)
register(ternary.TC)
register(sparse.SB)
register(sparse.SE)
register(sparse.SC)
register(filter_ternary.TF)
register(codebook.CB)
register(channel_codebook.FC)
