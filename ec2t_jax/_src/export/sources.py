"""Reading parameter trees from files, and writing files atomically.

Three kinds of input are recognised by content, not by name:

* a **packed** ``.ec2t`` file (starts with :data:`container.MAGIC`);
* an ``.npz`` **state dict** (a zip archive, e.g. the official EC2T ResNet-20
  weights): a flat dict whose keys stay exactly as they are;
* an **orbax checkpoint** directory, as written by
  ``ocp.StandardCheckpointer().save(path, {"params": ..., ...})``, or a
  ``CheckpointManager`` step directory holding such an item, or the manager's
  root (its latest step is used). It is restored without a target and its
  ``params`` entry is taken (or the entries named by ``keys``).

Example:
  >>> from ec2t_jax.export import load_tree
  >>> loaded = load_tree("resnet20_ec2t_spars64.npz")  # doctest: +SKIP
  >>> loaded.kind, len(loaded.tree)  # doctest: +SKIP
  ('npz', 116)
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from ec2t_jax._src.core import trees
from ec2t_jax._src.export import container
from ec2t_jax._src.export import errors
from ec2t_jax._src.export import stacking

_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")


class LoadedTree(NamedTuple):
  """A tree read from a file.

  Attributes:
    tree: the parameter tree (numpy arrays).
    kind: ``"packed"``, ``"npz"`` or ``"checkpoint"``.
    path: the file or directory actually read.
    info: the :class:`container.PackedInfo` of a packed file, else ``None``.
  """
  tree: Any
  kind: str
  path: str
  info: Any = None


def _is_orbax_item(path: Path) -> bool:
  return path.is_dir() and (path / "_METADATA").exists()


def _find_orbax_item(path: Path) -> tuple[Path, bool]:
  """Returns (directory to restore, whether it is itself the ``params`` item)."""
  if _is_orbax_item(path):
    return path, False
  children = sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
  items = [p for p in children if _is_orbax_item(p)]
  if items:
    return _pick_item(path, items)
  steps = [p for p in children if p.name.isdigit()]
  if steps:  # a CheckpointManager root: take the latest step
    return _find_orbax_item(max(steps, key=lambda p: int(p.name)))
  raise ValueError(f"{path}: not an orbax checkpoint directory (no _METADATA file found)")


def _pick_item(path: Path, items: list[Path]) -> tuple[Path, bool]:
  """The ``params`` item, else the only one."""
  for item in items:
    if item.name == "params":
      return item, True
  if len(items) == 1:
    return items[0], False
  names = ", ".join(p.name for p in items)
  raise ValueError(f"{path}: several checkpoint items ({names}) and none is named 'params'")


def _restore_orbax(path: Path, keys: Sequence[str]):
  try:
    import orbax.checkpoint as ocp
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ValueError("reading orbax checkpoints needs orbax-checkpoint "
                     "(pip install orbax-checkpoint)") from e
  item, is_params = _find_orbax_item(path)
  restored = ocp.StandardCheckpointer().restore(item.resolve())
  if is_params:
    return restored, item
  if not isinstance(restored, dict):
    raise ValueError(f"{item}: checkpoint holds a {type(restored).__name__}, expected a dict "
                     "with a 'params' entry")
  missing = [k for k in keys if k not in restored]
  if missing:
    raise ValueError(f"{item}: checkpoint has no {missing[0]!r} entry (top-level keys: "
                     f"{', '.join(map(str, restored)) or 'none'}); save a dict such as "
                     "{'params': params, ...}")
  tree = restored[keys[0]] if len(keys) == 1 else {k: restored[k] for k in keys}
  return tree, item


def _npy_header(member, name: str):
  """Reads an ``.npy`` header: (shape, fortran_order, dtype)."""
  try:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
      return np.lib.format.read_array_header_1_0(member)
    if version == (2, 0):
      return np.lib.format.read_array_header_2_0(member)
  except (ValueError, OSError, EOFError, SyntaxError, TypeError) as e:
    raise ValueError(f"entry {name!r} has a corrupt .npy header: {e}") from None
  raise ValueError(f"entry {name!r}: .npy format version {version} is not supported")


def read_npz(data: bytes, *, max_bytes: int = container.DEFAULT_MAX_BYTES) -> dict[str, np.ndarray]:
  """Reads an uncompressed or deflated ``.npz`` without trusting its headers.

  Each entry's declared shape and dtype must match its stored size (which the
  zip directory bounds) and all entries together must fit in ``max_bytes``
  before any array is allocated; object arrays (pickles) are refused.

  Raises:
    ValueError: for anything malformed or too large, in one line.
  """
  try:
    archive = zipfile.ZipFile(io.BytesIO(data))
    entries = archive.infolist()
  except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
    raise ValueError(f"not a readable .npz archive: {e}") from None
  container.enforce_max_bytes(sum(info.file_size for info in entries), max_bytes,
                            prefix=".npz entries declare ")
  out = {}
  with archive:
    for info in entries:
      name = info.filename
      if not name.endswith(".npy"):
        raise ValueError(f"entry {name!r} is not an .npy array")
      try:
        with archive.open(info) as member:
          shape, fortran, dtype = _npy_header(member, name)
          if dtype.hasobject:
            raise ValueError(f"entry {name!r} holds Python objects (pickles are refused)")
          if len(shape) > container.MAX_NDIM:
            raise ValueError(f"entry {name!r} has {len(shape)} dimensions")
          nbytes = math.prod(shape) * dtype.itemsize
          stored = info.file_size - member.tell()
          if nbytes != stored:
            raise ValueError(f"entry {name!r} declares shape {shape} of {dtype} "
                             f"({nbytes:,} bytes) but stores {stored:,} bytes")
          array = np.empty(shape, dtype, order="F" if fortran else "C")
          view = memoryview(array.reshape(-1, order="A").view(np.uint8))
          if member.readinto(view) != nbytes or member.read(1):
            raise ValueError(f"entry {name!r} is truncated")
      except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError) as e:
        raise ValueError(f"entry {name!r} cannot be read: {e}") from None
      out[name[:-len(".npy")]] = array
  return out


def load_tree(path, *, keys: Sequence[str] = ("params",),
              max_bytes: int = container.DEFAULT_MAX_BYTES) -> LoadedTree:
  """Reads a parameter tree from a packed file, an ``.npz`` or an orbax checkpoint.

  Args:
    path: file or directory.
    keys: checkpoint entries to take (default the ``params`` entry); with more
      than one the tree is ``{key: entry}``. Ignored for files.
    max_bytes: largest file and largest decoded size accepted for packed files
      and ``.npz`` archives (default 4 GiB), checked before allocating.

  Returns:
    A :class:`LoadedTree` with numpy leaves.

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    errors.ExportFormatError: for a corrupted packed file.
    ValueError: for anything else that cannot be read.
  """
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such file or directory")
  if path.is_dir():
    tree, item = _restore_orbax(path, tuple(keys))
    tree = _to_numpy(tree)
    return LoadedTree(tree, "checkpoint", str(item))
  data = read_bounded(path, max_bytes)
  if data.startswith(container.MAGIC[:4]):
    info, arrays = container.unpack_leaves(data, max_bytes=max_bytes)
    tree = stacking.restack_file(trees.unflatten(arrays, info.structure), info.meta,
                                 where=f"{path}: corrupt file")
    return LoadedTree(tree, "packed", str(path), info)
  if zipfile.is_zipfile(io.BytesIO(data)):
    try:
      tree = read_npz(data, max_bytes=max_bytes)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None
    return LoadedTree(tree, "npz", str(path))
  raise ValueError(f"{path}: neither an ec2t packed file, an .npz archive nor an orbax "
                   "checkpoint directory")


def read_bounded(path, max_bytes: int = container.DEFAULT_MAX_BYTES) -> bytes:
  """A file's bytes, refused (before reading) if it is larger than ``max_bytes``.

  Raises:
    errors.ExportFormatError: if the file is larger than ``max_bytes``.
  """
  path = Path(path)
  container.enforce_max_bytes(path.stat().st_size, max_bytes, prefix=f"{path}: ")
  return path.read_bytes()


def _to_numpy(tree):
  leaves, structure = trees.flatten(tree)
  return trees.unflatten([np.asarray(x) for _, x in leaves], structure)


def flat_arrays(tree) -> dict[str, np.ndarray]:
  """``{path: array}`` with ``/``-joined paths (a flat dict keeps its keys).

  Raises:
    ValueError: if two leaves get the same name.
  """
  out = {}
  for name, array in trees.flatten(tree)[0]:
    if name in out:
      raise ValueError(f"two leaves are both named {name!r}")
    out[name] = array
  return out


def refuse_overwriting_input(source, out_path) -> None:
  """Refuses an output that is the input, after resolving links (``realpath``, ``samefile``).

  Called before anything is read or written, so the input survives.

  Raises:
    ValueError: if ``out_path`` names the same file as ``source``.
  """
  same = os.path.realpath(source) == os.path.realpath(out_path)
  if not same:
    try:
      same = os.path.samefile(source, out_path)  # hard links, bind mounts
    except OSError:  # one of them does not exist: nothing to overwrite
      same = False
  if same:
    raise ValueError(f"output {str(out_path)!r} is the input {str(source)!r}: refusing to "
                     "overwrite the input; choose another output path")


def atomic_write(path, data: bytes) -> None:
  """Writes ``data`` to ``path`` through a temporary file and ``os.replace``.

  A failure leaves an existing ``path`` untouched. The new file gets the mode
  of the file it replaces, else the usual ``0o666 & ~umask``.
  """
  with atomic_writer(path) as f:
    f.write(data)


@contextlib.contextmanager
def atomic_writer(path):
  """A binary file whose content replaces ``path`` only when the block ends without error.

  What the block writes goes to a temporary file beside ``path`` (flushed and
  fsynced, then ``os.replace``-d); an exception leaves an existing ``path``
  untouched and removes the temporary file. Mode as in :func:`atomic_write`.
  """
  path = Path(path)
  directory = path.parent if str(path.parent) else Path(".")
  try:
    mode = path.stat().st_mode & 0o7777
  except OSError:
    umask = os.umask(0)
    os.umask(umask)
    mode = 0o666 & ~umask
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise


def atomic_save_npz(path, arrays: dict[str, np.ndarray]) -> None:
  """Saves ``arrays`` as an uncompressed ``.npz`` at ``path``, atomically.

  Written entry by entry (as ``np.savez`` does) so that any key works, also
  ``file`` or ``allow_pickle``, which ``np.savez(**arrays)`` would take as its
  own arguments.
  """
  with atomic_writer(path) as f:  # streamed into the file: no copy of the archive in memory
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
      for key, array in arrays.items():
        with archive.open(f"{key}.npy", "w", force_zip64=True) as entry:
          np.lib.format.write_array(entry, np.asarray(array), allow_pickle=False)
