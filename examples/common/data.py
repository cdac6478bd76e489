"""Datasets for the examples: tfds splits, one shard per process, deterministic batches.

The global data order does not depend on how many processes read it. A split is
cut into ``num_shards`` even parts (``tfds.even_splits``); process ``p`` of ``P``
loads only the shards ``p * num_shards / P ... (p + 1) * num_shards / P - 1``.
Global batch ``b`` of epoch ``e`` is the concatenation, over shards ``k``, of
``per_shard_batch`` examples of shard ``k`` taken in the order of a permutation
seeded by ``(seed, epoch, k)``. So with the same ``num_shards`` one process with
eight devices and two processes with four see identical global batches, and any
step of any epoch can be rebuilt from its number alone (exact ``--resume``).

Images stay ``uint8`` on the host; normalisation and augmentation run on the
accelerator inside the jitted step (:mod:`common.augment`).

Example:
  >>> from common.data import dataset_spec
  >>> spec = dataset_spec("mnist")
  >>> spec.num_classes, spec.image_shape
  (10, (28, 28, 1))
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np

from common.cli import UserError


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the examples need to know about a tfds image-classification dataset.

  Attributes:
    name: tfds name.
    num_classes: Number of labels.
    image_shape: ``(H, W, C)``.
    mean: Per-channel mean of the pixels scaled to [0, 1].
    std: Per-channel standard deviation of the pixels scaled to [0, 1].
    flip: Whether ``--augment`` flips images horizontally (not for digits).
    crop_padding: Zero padding of ``--augment``'s random crop (random shifts of up
      to this many pixels).
  """

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  flip: bool = True
  crop_padding: int = 4


# Normalisation constants as used by the EC2T reference code.
_CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
_CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
DATASETS = {
    "mnist": DatasetSpec("mnist", 10, (28, 28, 1), (0.1307,), (0.3081,), flip=False,
                         crop_padding=2),
    "cifar10": DatasetSpec("cifar10", 10, (32, 32, 3), _CIFAR_MEAN, _CIFAR_STD),
    "cifar100": DatasetSpec("cifar100", 100, (32, 32, 3), _CIFAR_MEAN, _CIFAR_STD),
}


def dataset_spec(name: str) -> DatasetSpec:
  """Returns the :class:`DatasetSpec` of ``name``; :class:`UserError` if unknown."""
  if name not in DATASETS:
    raise UserError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
  return DATASETS[name]


@dataclasses.dataclass(frozen=True)
class Shard:
  """One shard of a split held in host memory.

  Attributes:
    index: Shard number in ``[0, num_shards)``.
    images: ``uint8 [N, H, W, C]``.
    labels: ``int32 [N]``.
  """

  index: int
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


def shards_of_process(num_shards: int, process_index: int, process_count: int) -> range:
  """Shard numbers read by one process (a contiguous block).

  Example:
    >>> from common.data import shards_of_process
    >>> list(shards_of_process(4, process_index=1, process_count=2))
    [2, 3]
  """
  if num_shards % process_count:
    raise UserError(f"--data_shards={num_shards} must be a multiple of the number of "
                    f"processes ({process_count})")
  per_process = num_shards // process_count
  return range(process_index * per_process, (process_index + 1) * per_process)


def _ensure_prepared(tfds, name: str, data_dir: str | None, download: bool) -> None:
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared():
    return
  where = builder.data_dir_root if hasattr(builder, "data_dir_root") else data_dir
  if not download:
    raise UserError(
        f"dataset {name!r} is not in {where} and downloading is off (--nodownload). "
        f"Point --data_dir (or TFDS_DATA_DIR) at a folder holding {name}/, "
        "or allow the download with --download.")
  try:
    builder.download_and_prepare()
  except Exception as error:  # network errors come in many types
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise UserError(
        f"dataset {name!r} is not in {where} and could not be downloaded ({first_line}). "
        "Without internet, point --data_dir (or TFDS_DATA_DIR) at a prepared tfds folder."
    ) from None


def load_shards(name: str, split: str, shard_indices: Sequence[int], num_shards: int, *,
                data_dir: str | None = None, download: bool = True,
                mock_examples: int = 0) -> list[Shard]:
  """Loads some of the ``num_shards`` even parts of a tfds split into memory.

  Args:
    name: tfds dataset name (``mnist``, ``cifar10``, ``cifar100``).
    split: tfds split string, slicing allowed (``"train[:55000]"``, ``"test"``).
    shard_indices: Which parts to load (usually :func:`shards_of_process`).
    num_shards: Number of even parts the split is cut into.
    data_dir: tfds data folder (``None``: ``$TFDS_DATA_DIR`` or tfds' default).
    download: Whether tfds may download a dataset that is not prepared.
    mock_examples: If > 0, ignore the real data and use
      ``tfds.testing.mock_data`` with this many random examples per shard (for
      smoke tests and CI; tfds ignores slicing in mock mode).

  Returns:
    One :class:`Shard` per requested index.

  Raises:
    UserError: unknown dataset, data not available, or an invalid split.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy import)
  spec = dataset_spec(name)
  mocking = (tfds.testing.mock_data(num_examples=mock_examples) if mock_examples
             else contextlib.nullcontext())
  with mocking:
    if not mock_examples:
      _ensure_prepared(tfds, name, data_dir, download)
    try:
      parts = tfds.even_splits(split, n=num_shards)
    except ValueError as error:
      raise UserError(f"invalid split {split!r}: {error}") from None
    shards = []
    for index in shard_indices:
      try:
        dataset = tfds.load(name, split=parts[index], data_dir=data_dir, shuffle_files=False,
                            download=False)
        batches = list(tfds.as_numpy(dataset.batch(8192)))
      except (ValueError, KeyError, AssertionError) as error:
        raise UserError(f"cannot read split {split!r} of {name!r}: {error}") from None
      if not batches:
        raise UserError(f"split {split!r} of {name!r} has no examples for shard {index} "
                        f"of {num_shards}")
      images = np.concatenate([b["image"] for b in batches]).astype(np.uint8)
      labels = np.concatenate([b["label"] for b in batches]).astype(np.int32)
      if images.shape[1:] != spec.image_shape:
        raise UserError(f"{name}: expected images of shape {spec.image_shape}, "
                        f"got {images.shape[1:]}")
      shards.append(Shard(index, images, labels))
  return shards


class TrainBatches:
  """Random-access training batches: ``batch(step)`` depends only on ``step``.

  Args:
    shards: This process's shards.
    per_shard_batch: Examples taken from each shard per step.
    steps_per_epoch: Steps per epoch (the same on every process; see
      :func:`common.parallel.global_min`).
    seed: Base seed of the per-epoch, per-shard permutations.

  Example:
    >>> import numpy as np
    >>> from common.data import Shard, TrainBatches
    >>> shard = Shard(0, np.zeros((10, 2, 2, 1), np.uint8), np.arange(10, dtype=np.int32))
    >>> batches = TrainBatches([shard], per_shard_batch=4, steps_per_epoch=2, seed=0)
    >>> batches.batch(0)["label"].shape
    (4,)
  """

  def __init__(self, shards: Sequence[Shard], per_shard_batch: int, steps_per_epoch: int,
               seed: int):
    self._shards = list(shards)
    self.per_shard_batch = per_shard_batch
    self.steps_per_epoch = steps_per_epoch
    self._seed = seed
    self._orders: dict[int, list[np.ndarray]] = {}

  def _order(self, epoch: int) -> list[np.ndarray]:
    if epoch not in self._orders:
      self._orders = {epoch: [np.random.default_rng([self._seed, epoch, s.index]).permutation(len(s))
                              for s in self._shards]}
    return self._orders[epoch]

  def position(self, step: int) -> tuple[int, int]:
    """``(epoch, step_in_epoch)`` of a step counted from the start of training."""
    return divmod(step, self.steps_per_epoch)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The local part of global batch ``step``: ``{"image": uint8, "label": int32}``."""
    epoch, index = self.position(step)
    lo, hi = index * self.per_shard_batch, (index + 1) * self.per_shard_batch
    picks = [order[lo:hi] for order in self._order(epoch)]
    return {"image": np.concatenate([s.images[p] for s, p in zip(self._shards, picks)]),
            "label": np.concatenate([s.labels[p] for s, p in zip(self._shards, picks)])}


def eval_batches(shards: Sequence[Shard], per_shard_batch: int, num_batches: int,
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Local evaluation batches in order, padded, with a ``mask`` of real examples.

  Every process yields ``num_batches`` batches (the global maximum, see
  :func:`num_eval_batches`) so that collectives line up; padding has mask 0.

  Yields:
    ``{"image", "label", "mask"}`` with ``per_shard_batch * len(shards)`` rows.
  """
  for b in range(num_batches):
    images, labels, masks = [], [], []
    for shard in shards:
      img = shard.images[b * per_shard_batch:(b + 1) * per_shard_batch]
      lab = shard.labels[b * per_shard_batch:(b + 1) * per_shard_batch]
      pad = per_shard_batch - len(lab)
      images.append(np.pad(img, ((0, pad),) + ((0, 0),) * (img.ndim - 1)))
      labels.append(np.pad(lab, (0, pad)))
      masks.append(np.arange(per_shard_batch) < len(lab))
    yield {"image": np.concatenate(images), "label": np.concatenate(labels),
           "mask": np.concatenate(masks).astype(np.float32)}


def num_eval_batches(largest_shard: int, per_shard_batch: int) -> int:
  """Batches needed to cover the largest shard."""
  return math.ceil(largest_shard / per_shard_batch)


def per_shard_batch_size(global_batch: int, num_shards: int) -> int:
  """``global_batch / num_shards``, with a clear error when it does not divide."""
  if global_batch % num_shards:
    raise UserError(f"batch size {global_batch} must be a multiple of --data_shards={num_shards}")
  return global_batch // num_shards


def describe(shards: Sequence[Shard]) -> str:
  """``"55000 examples in shards [0, 1]"``-style summary for logs."""
  return f"{sum(map(len, shards))} examples in shards {[s.index for s in shards]}"
