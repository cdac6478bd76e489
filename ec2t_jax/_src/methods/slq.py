"""Single- and multiple-level quantization (Xu et al., AAAI 2018): the pure functions.

**SLQ as the official code runs it** (``yuhuixu1993/SLQ``,
``include/caffe/kmeans.hpp``), the defaults:

* ``k = 2^(b-1) + 1`` clusters (``b`` bits; 3 for ternary, 17 at 5 bits,
  :func:`num_clusters`), started at ``0, +-n_max, +-n_max/2, ...`` with
  ``n_max = 2^floor(log2 max|W|)``, the zero cluster pinned at 0 during 10
  Lloyd iterations (:func:`official_levels`, ``init="official"``);
* clusters are frozen **by index** (``freeze_order="index"``): stage ``s``
  freezes every weight whose nearest cluster has index ``< c_s`` (the zero
  cluster and the largest magnitudes first), with the cluster counts
  ``c = (5, 9, 13, 15, 17)`` at 5 bits (the code's ``T_vec < 5, < 9, ...``;
  :func:`official_cluster_counts` for other widths).

Where the official code needs hand edits between stages (it re-reads the
previous centroids from a file), the library re-clusters the levels not
frozen yet on the free weights (below).

**The library's earlier reading**, kept as options (``init="quantile"``,
``freeze_order="loss"``, ``portions``):

* A layer's weights are clustered by 1-D k-means (:func:`ec2t_jax.kmeans_1d`,
  quantile start, 30 iterations) into ``k`` clusters.
* The centroid nearest zero becomes exactly 0 (the pruned cluster); the others
  stay **float** centroids (``levels="float"``, the official code). The
  library's former variant, ``levels="power_of_two"``, rounds every other
  centroid to the nearest signed power of two (``3 * 2^(n-2) <= |c| <
  3 * 2^(n-1)`` gives ``2^n``, as in INQ; :func:`quantize_centroids`).
* **Re-clustering at each stage** (:func:`recluster_levels`): before a stage
  freezes more weights, the levels not frozen yet move to the k-means
  centroids of the free (retrained) weights, by Lloyd iterations started from
  the current levels; the levels of frozen clusters and the zero level stay,
  so the layer never holds more than ``k`` values.
* At each stage the free weights join their nearest level's cluster; a
  cluster's *quantization loss* is the mean of ``(w - level)^2`` over its
  free members. Clusters are frozen in ascending loss, whole clusters at a
  time, until the frozen fraction of the layer reaches the stage's portion;
  frozen weights take their level and stop training, the rest retrain (masked
  updates) and are re-assigned at the next stage. The last portion is 1, so
  every weight ends on one of the ``k`` levels.
* **MLQ** (ternary, ``b = 2``) adds the depth level: layers are quantized
  one after another in forward order, each one stage behind the previous one,
  so the later layers, still full precision, compensate.

Example:
  >>> import jax.numpy as jnp
  >>> from ec2t_jax._src.methods.slq import quantize_centroids  # internal
  >>> quantize_centroids(jnp.array([-0.3, 0.01, 0.2]))  # levels="power_of_two"
  Array([-0.25,  0.  ,  0.25], dtype=float32)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from ec2t_jax._src import core
from ec2t_jax._src.core import segments as segments_lib
from ec2t_jax._src.core import selection as selection_lib

from ec2t_jax._src.methods._support import clustering
from ec2t_jax._src.methods._support import common
from ec2t_jax._src.methods._support import grids
from ec2t_jax._src.methods._support import registry
from ec2t_jax._src.methods import inq


def num_clusters(bits: int) -> int:
  """``2^(b-1) + 1`` clusters for ``b`` bits (3 for ternary, 17 at 5 bits), as the official code.

  Example:
    >>> from ec2t_jax._src.methods.slq import num_clusters  # internal
    >>> [num_clusters(b) for b in (2, 3, 5)]
    [3, 5, 17]
  """
  return 2 ** (bits - 1) + 1


LEVELS = ("float", "power_of_two")


def nearest_power_of_two_signed(values: jax.Array) -> jax.Array:
  """``sign(x) 2^n`` with ``n = floor(log2(4 |x| / 3))`` (nearest power of two; 0 stays 0)."""
  values = jnp.asarray(values, jnp.float32)
  n = inq.floor_log2_four_thirds(jnp.abs(values))
  power = jnp.ldexp(jnp.ones_like(values), n)
  return jnp.where(values == 0, 0.0, jnp.where(values < 0, -power, power))


def quantize_centroids(centroids: jax.Array) -> jax.Array:
  """The centroid nearest zero becomes 0, the others their nearest signed power of two."""
  centroids = jnp.asarray(centroids, jnp.float32)
  zero = jnp.argmin(jnp.abs(centroids))
  return jnp.where(jnp.arange(centroids.shape[0]) == zero, 0.0,
                   nearest_power_of_two_signed(centroids))


class ClusterFreeze(NamedTuple):
  """One stage's decision: the new frozen mask, the frozen weights' values, the clusters taken."""
  frozen: jax.Array
  values: jax.Array
  losses: jax.Array
  taken: Any = None


OFFICIAL_ITERATIONS = 10
FREEZE_ORDERS = ("index", "loss")
INITS = ("official", "quantile")
# The 5-bit code freezes T_vec < 5, 9, 13, 15, 17: 2, 4, 6, 7, 8 of its 8 pairs.
_OFFICIAL_PAIR_FRACTIONS = (0.25, 0.5, 0.75, 0.875, 1.0)


def official_levels(weights: jax.Array, k: int, iterations: int = OFFICIAL_ITERATIONS
                    ) -> tuple[jax.Array, jax.Array]:
  """The official k-means of one layer (``Kmeans`` in ``kmeans.hpp``).

  Start ``c_0 = 0``, ``c_{2j-1} = n_max / 2^(j-1)``, ``c_{2j} = -c_{2j-1}``
  (``n_max = 2^floor(log2 max|W|)``); each Lloyd iteration assigns every
  weight to its nearest centroid (ties: the lower index) and moves every
  centroid but ``c_0`` to its members' mean (an empty one stays).

  Returns:
    ``(levels, assignment)``: float32 ``(k,)`` in the code's index order, and
    the last iteration's assignment (made before its update, as the code's
    ``T_vec``), int32 of ``weights``' shape.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax._src.methods.slq import official_levels  # internal
    >>> levels, _ = official_levels(jnp.array([0.9, -0.6, 0.1, 0.3, -0.05]), 5, 1)
    >>> levels  # start [0, 0.5, -0.5, 0.25, -0.25]
    Array([ 0.  ,  0.9 , -0.6 ,  0.3 , -0.25], dtype=float32)
  """
  flat = jnp.asarray(weights, jnp.float32).reshape(-1)
  largest = jnp.max(jnp.abs(flat))
  n_max = jnp.exp2(jnp.floor(jnp.log2(jnp.where(largest > 0, largest, 1.0))))
  index = jnp.arange(k)
  magnitude = n_max / jnp.exp2(((index - 1) // 2).astype(jnp.float32))
  start = jnp.where(index == 0, 0.0, jnp.where(index % 2 == 1, magnitude, -magnitude))

  def lloyd(_, carry):
    levels, _ = carry
    assignment = clustering.nearest_centroid(flat, levels)
    means = clustering.cluster_means(flat, assignment, levels)
    return jnp.where(index == 0, 0.0, means), assignment

  levels, assignment = jax.lax.fori_loop(
      0, iterations, lloyd, (start.astype(jnp.float32), jnp.zeros(flat.shape, jnp.int32)))
  return levels, assignment.reshape(jnp.shape(weights))


def official_cluster_counts(bits: int) -> tuple[int, ...]:
  """The clusters frozen after each stage: ``(5, 9, 13, 15, 17)`` at 5 bits, as the code.

  Other widths keep the code's fractions of the ``2^(b-2)`` signed pairs
  (1/4, 1/2, 3/4, 7/8, all), rounded up: ``1 + 2 ceil(f pairs)``, repeats
  dropped.

  Example:
    >>> from ec2t_jax._src.methods.slq import official_cluster_counts  # internal
    >>> official_cluster_counts(5), official_cluster_counts(3)
    ((5, 9, 13, 15, 17), (3, 5))
  """
  pairs = (num_clusters(inq.check_bits(bits)) - 1) // 2
  counts = [1 + 2 * math.ceil(f * pairs - 1e-9) for f in _OFFICIAL_PAIR_FRACTIONS]
  return tuple(sorted(set(counts)))


def check_cluster_counts(counts, k: int) -> tuple[int, ...]:
  """Validates cluster counts for index freezing: odd, strictly increasing, ending at ``k``.

  Odd because a stage freezes the zero cluster and whole ``+-`` pairs.
  """
  try:
    values = tuple(int(c) for c in counts)
  except (TypeError, ValueError):
    raise ValueError(f"cluster_counts must be a sequence of integers, got {counts!r}") from None
  if not values or any(isinstance(c, bool) or int(c) != c for c in counts):
    raise ValueError(f"cluster_counts must be a non-empty sequence of integers, got {counts!r}")
  if any(c % 2 == 0 or not 1 <= c <= k for c in values):
    raise ValueError(f"cluster_counts must be odd counts in [1, {k}] (the zero cluster and "
                     f"whole +- pairs of the {k} clusters), got {counts!r}")
  if any(b <= a for a, b in zip(values, values[1:])):
    raise ValueError(f"cluster_counts must be strictly increasing, got {counts!r}")
  if values[-1] != k:
    raise ValueError(f"cluster_counts must end at {k} (every cluster frozen), got {counts!r}")
  return values


def _assign(weights: jax.Array, levels: jax.Array,
            segments: segments_lib.Segments) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each weight's nearest level (ties: the lower index), its one-hot, and that level.

  ``levels`` is ``(k,)`` per layer (``(S, k)`` in a flat buffer); the one-hot is
  ``weights.shape + (k,)``, and the level is read through it, exactly.
  """
  per_element = segments.expand(levels)
  weights = jnp.asarray(weights, jnp.float32)
  assignment = jnp.argmin(jnp.abs(weights[..., None] - per_element), axis=-1).astype(jnp.int32)
  one_hot = assignment[..., None] == jnp.arange(levels.shape[-1], dtype=jnp.int32)
  level = jnp.sum(jnp.where(one_hot, per_element, 0.0), axis=-1)
  return assignment, one_hot, level


def _cluster_sum(one_hot: jax.Array, x: jax.Array, segments: segments_lib.Segments) -> jax.Array:
  """``sum`` of ``x`` over each (layer, cluster): ``(k,)`` per layer, ``(S, k)`` in a buffer."""
  return segments.cluster_sum(jnp.where(one_hot, jnp.asarray(x, jnp.float32)[..., None], 0.0))


def freeze_by_index(weights: jax.Array, frozen: jax.Array, values: jax.Array, count,
                    levels: jax.Array,
                    segments: segments_lib.Segments = segments_lib.LeafSegments()
                    ) -> ClusterFreeze:
  """Freezes every free weight whose nearest level has index ``< count`` (the official order).

  With ``segments`` (a flat buffer) ``count`` is one per layer and ``levels`` ``(S, k)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax._src.methods.slq import freeze_by_index  # internal
    >>> step = freeze_by_index(jnp.array([0.9, 0.01, 0.3]), jnp.zeros(3, bool), jnp.zeros(3),
    ...                        3, jnp.array([0.0, 1.0, -1.0, 0.5, -0.5]))
    >>> step.frozen, step.values  # 0.3 is nearest 0.5 (index 3): still free
    (Array([ True,  True, False], dtype=bool), Array([1., 0., 0.], dtype=float32))
  """
  k = levels.shape[-1]
  count = jnp.asarray(count, jnp.int32)
  assignment, _, level = _assign(weights, levels, segments)
  newly = (assignment < segments.expand(count)) & ~frozen
  new_values = jnp.where(newly, level, values)
  return ClusterFreeze(frozen | newly, new_values.astype(values.dtype), None,
                       jnp.arange(k) < count[..., None])


def slq_levels(weights: jax.Array, k: int, iterations: int = 30) -> jax.Array:
  """The layer's ``k`` power-of-two levels: k-means centroids through :func:`quantize_centroids`.

  Returns:
    float32 ``(k,)``, ascending (equal neighbours possible after rounding).
  """
  return jnp.sort(quantize_centroids(clustering.kmeans_1d(weights, k, iterations).centroids))


def float_levels(weights: jax.Array, k: int, iterations: int = 30) -> jax.Array:
  """The layer's ``k`` float levels: k-means centroids, the one nearest zero set to 0.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax._src.methods.slq import float_levels  # internal
    >>> float_levels(jnp.array([-1.0, -1.0, 0.125, -0.125, 0.25, 0.75]), 3)
    Array([-1.  ,  0.  ,  0.75], dtype=float32)
  """
  centroids = clustering.kmeans_1d(weights, k, iterations).centroids
  return jnp.where(jnp.arange(k) == jnp.argmin(jnp.abs(centroids)), 0.0, centroids)


def recluster_levels(weights: jax.Array, free: jax.Array, levels: jax.Array, locked: jax.Array,
                     iterations: int = 30, power_of_two: bool = False,
                     segments: segments_lib.Segments = segments_lib.LeafSegments()) -> jax.Array:
  """Moves the unlocked, non-zero levels to the k-means centroids of the free weights.

  Lloyd iterations started from ``levels``: each free weight joins its
  nearest level, and every level neither ``locked`` (a frozen cluster's) nor
  0 moves to its members' mean (an empty cluster keeps its level).

  Args:
    weights: the layer's latent weights.
    free: boolean mask of the weights still training.
    levels: float32 ``(k,)`` current levels (``(S, k)`` in a flat buffer).
    locked: boolean, shaped like ``levels``: the levels that must not move.
    iterations: Lloyd iterations (static).
    power_of_two: round the moved levels to signed powers of two.
    segments: a flat buffer's segments (each layer clustered on its own), by default the
      layer's own.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax._src.methods.slq import recluster_levels  # internal
    >>> recluster_levels(jnp.array([-2.0, -1.0, 0.0, 0.5, 0.75]),
    ...                  jnp.array([0, 1, 1, 1, 1], bool),  # -2.0 is frozen: not clustered
    ...                  jnp.array([-1.5, 0.0, 0.5]), jnp.array([False, False, False]))
    Array([-1.   ,  0.   ,  0.625], dtype=float32)
  """
  weights = jnp.asarray(weights, jnp.float32)
  members = jnp.broadcast_to(free, weights.shape)
  fixed = locked | (levels == 0)

  def lloyd(_, current):
    _, one_hot, _ = _assign(weights, current, segments)
    one_hot = one_hot & members[..., None]
    sums = _cluster_sum(one_hot, weights, segments)
    counts = segments.cluster_sum(one_hot)
    means = jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), current)
    return jnp.where(fixed, current, means)

  moved = jax.lax.fori_loop(0, iterations, lloyd, levels.astype(jnp.float32))
  if power_of_two:
    moved = jnp.where(fixed, moved, nearest_power_of_two_signed(moved))
  return moved


def freeze_clusters(weights: jax.Array, frozen: jax.Array, values: jax.Array, portion,
                    levels: jax.Array,
                    segments: segments_lib.Segments = segments_lib.LeafSegments()
                    ) -> ClusterFreeze:
  """Grows the frozen set to at least ``portion`` of the layer, by whole clusters.

  Args:
    weights: the layer's latent weights.
    frozen: boolean mask of weights already frozen (they keep ``values``).
    values: the frozen weights' quantized values (ignored where not frozen).
    portion: accumulated portion in ``[0, 1]`` to reach (may be traced; one per layer in a
      flat buffer).
    levels: the layer's quantized levels, shape ``(k,)`` (``(S, k)`` in a flat buffer).
    segments: a flat buffer's segments, by default the layer's own.

  Returns:
    A :class:`ClusterFreeze`: the free weights' clusters (nearest level) are
    frozen in ascending mean quantization loss while the frozen count is
    below ``round(portion * n)``; with ``portion = 1`` every weight ends frozen.
  """
  free = ~frozen
  _, one_hot, level = _assign(weights, levels, segments)
  one_hot_free = one_hot & free[..., None]
  error = (jnp.asarray(weights, jnp.float32) - level) ** 2
  sums = _cluster_sum(one_hot_free, error, segments)
  counts = segments.cluster_sum(one_hot_free)
  losses = jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), jnp.inf)
  order = jnp.argsort(losses, axis=-1, stable=True)
  ordered_counts = jnp.take_along_axis(counts, order, axis=-1)
  # Frozen count before taking the i-th cluster of the order; take it while below target.
  taken_before = jnp.cumsum(ordered_counts, axis=-1) - ordered_counts
  before = segments.sum(frozen)[..., None] + taken_before
  target = jnp.round(jnp.asarray(portion, jnp.float32) * segments.numel(weights))
  take_ordered = (before < target[..., None]) & (ordered_counts > 0)
  take = jnp.take_along_axis(take_ordered, jnp.argsort(order, axis=-1), axis=-1)
  newly = jnp.any(one_hot & segments.expand(take), axis=-1) & free
  new_values = jnp.where(newly, level, values)
  return ClusterFreeze(frozen | newly, new_values.astype(values.dtype), losses, take)


# ----------------------------------------------------------- one leaf's state


class SlqLeaf(NamedTuple):
  """One layer under SLQ / MLQ.

  Attributes:
    latent: float32 full-precision weights (the free ones retrain).
    frozen: bool mask of the frozen weights.
    values: the frozen weights' levels (0 where free).
    levels: float32 ``(k,)`` k-means levels of the layer (from the pretrained
      weights at ``init``; the unlocked ones re-clustered at each stage).
    stage: int32 index of the portion applied so far; ``-1`` before the
      layer's first stage (MLQ's later layers).
    rank: int32 position of the layer in forward order among the selected
      ones (MLQ starts layer ``r`` ``r`` stages late; 0 for SLQ).
    steps: int32 number of steps taken (drives ``steps_per_stage``).
    locked: bool ``(k,)``, the levels of clusters frozen so far (they no
      longer move when the layer is re-clustered).
    latent_max: float32 ``max |latent|`` of the layer, the reference of the free weights'
      grid (kept with the latent weights, so that a flat buffer's value needs no reduction).
  """
  latent: jax.Array
  frozen: jax.Array
  values: jax.Array
  levels: jax.Array
  stage: jax.Array
  rank: jax.Array
  steps: jax.Array
  locked: jax.Array
  latent_max: jax.Array

  # ``k`` values per layer: a flat buffer stores them ``(S, k)`` (``_src/core/flat.py``).
  codebook_fields = ("levels", "locked")

  def value(self, dtype) -> jax.Array:
    """Levels where frozen, latent weights (snapped for exact landing) elsewhere."""
    free = core.snap_to_grid(self.latent, dtype, self.latent_max)
    return jnp.where(self.frozen, self.values, free).astype(dtype)

  def describe(self) -> dict:
    return {"method": "SLQ/MLQ", "mode": f"{self.levels.shape[0]} clusters",
            "frozen": jnp.mean(self.frozen), "stage": self.stage}


def slq_init_leaf(param: jax.Array, k: int, rank=0, iterations: int = 30,
                  levels: str = "float", init: str = "quantile") -> SlqLeaf:
  """A layer not quantized yet (stage -1), its levels from k-means of the pretrained weights."""
  latent = jnp.asarray(param, jnp.float32)
  zero = jnp.zeros((), jnp.int32)
  if init == "official":
    first = official_levels(latent, k, iterations)[0]
    if levels == "power_of_two":
      first = jnp.where(first == 0, 0.0, nearest_power_of_two_signed(first))
  else:
    first = (float_levels if levels == "float" else slq_levels)(latent, k, iterations)
  return SlqLeaf(latent, jnp.zeros(latent.shape, bool), jnp.zeros(latent.shape, jnp.float32),
                 first, jnp.full((), -1, jnp.int32), jnp.asarray(rank, jnp.int32), zero,
                 jnp.zeros((k,), bool), jnp.max(jnp.abs(latent)))


def slq_advance(leaf: SlqLeaf, stage, portions: jax.Array, *, recluster: bool = True,
                power_of_two: bool = False, iterations: int = 30,
                freeze_order: str = "loss",
                segments: segments_lib.Segments = segments_lib.LeafSegments()) -> SlqLeaf:
  """Moves ``leaf`` to ``stage`` (no-op unless later; ``stage < 0``: not started).

  With ``recluster`` the unlocked levels first follow the free weights
  (:func:`recluster_levels`, skipped at the layer's first stage, whose levels
  are fresh from ``init``); then :func:`freeze_clusters` (``freeze_order=
  "loss"``, ``portions`` the accumulated portions) or :func:`freeze_by_index`
  (``"index"``, ``portions`` the cluster counts) grows the frozen set.

  With ``segments`` (a flat buffer) ``stage`` and the leaf's layer fields hold one value per
  layer, its codebooks ``(S, k)``, and each layer moves on its own. The clustering runs only
  at a step where some layer moves (``lax.cond``; under ``vmap`` both branches run, as a
  ``select``).
  """
  stage = jnp.clip(jnp.asarray(stage, jnp.int32), -1, portions.shape[0] - 1)
  later = (stage > leaf.stage) & (stage >= 0)
  freeze = freeze_by_index if freeze_order == "index" else freeze_clusters

  def move(leaf: SlqLeaf) -> SlqLeaf:
    levels = leaf.levels
    if recluster:
      moved = recluster_levels(leaf.latent, ~leaf.frozen, levels, leaf.locked, iterations,
                               power_of_two, segments)
      levels = jnp.where((later & (leaf.stage >= 0))[..., None], moved, levels)
    step = freeze(leaf.latent, leaf.frozen, leaf.values, portions[jnp.maximum(stage, 0)],
                  levels, segments)
    moving = segments.expand(later)
    return leaf._replace(frozen=jnp.where(moving, step.frozen, leaf.frozen),
                         values=jnp.where(moving, step.values, leaf.values), levels=levels,
                         locked=jnp.where(later[..., None], leaf.locked | step.taken,
                                          leaf.locked))

  leaf = jax.lax.cond(jnp.any(later), move, lambda leaf: leaf, leaf)
  return leaf._replace(stage=jnp.maximum(stage, leaf.stage))


# ------------------------------------------------------------ the transformations


class SlqHyper(NamedTuple):
  """SLQ/MLQ's numeric hyperparameter: ``steps_per_stage`` (0 = stages by phase only)."""
  steps_per_stage: Any = 0


HYPER_RANGES = {"steps_per_stage": core.Range(0.0)}


def _forward_ranks_info(params, selection, hyper) -> core.TreeInfo:
  """MLQ's tree-level hook: each selected layer's rank in forward order, per slice of a stacked leaf (``ctx.info``)."""
  del hyper
  return core.TreeInfo(leaf_info=selection_lib.layer_ranks(selection_lib.as_selection(selection), params))


def stage_table(bits: int, portions, cluster_counts, freeze_order: str) -> tuple:
  """The per-stage table: cluster counts (``"index"``) or accumulated portions (``"loss"``)."""
  core.check_choice("freeze_order", freeze_order, FREEZE_ORDERS)
  k = num_clusters(inq.check_bits(bits))
  if freeze_order == "index":
    if portions is not None:
      raise ValueError(f"portions={portions!r} is for freeze_order='loss'; the official "
                       "order freezes whole clusters: pass cluster_counts")
    counts = official_cluster_counts(bits) if cluster_counts is None else cluster_counts
    return check_cluster_counts(counts, k)
  if cluster_counts is not None:
    raise ValueError(f"cluster_counts={cluster_counts!r} is for freeze_order='index'; "
                     "freeze_order='loss' takes portions")
  return inq.check_portions(DEFAULT_PORTIONS if portions is None else portions)


DEFAULT_PORTIONS = (0.5, 0.75, 0.875, 1.0)


def _quantizer(name: str, bits: int, portions, steps_per_stage, selection, staggered: bool,
               iterations, levels: str = "float", recluster: bool = True,
               freeze_order: str = "loss", init: str = "quantile",
               cluster_counts=None) -> core.Quantizer:
  if levels not in LEVELS:
    raise ValueError(f"levels must be one of {LEVELS}, got {levels!r}")
  core.check_choice("init", init, INITS)
  bits = inq.check_bits(bits)
  table = jnp.asarray(stage_table(bits, portions, cluster_counts, freeze_order),
                      jnp.int32 if freeze_order == "index" else jnp.float32)
  if iterations is None:
    iterations = OFFICIAL_ITERATIONS if init == "official" else 30
  k = num_clusters(bits)

  def init_leaf(param, ctx, hyper):
    del hyper
    # Layers (slices of stacked leaves too) start one stage after another.
    rank = (jnp.asarray(ctx.info, jnp.int32)[ctx.slice_index]
            if staggered and ctx.info is not None else 0)
    leaf = slq_init_leaf(param, k, rank, iterations, levels, init)
    return advance(leaf, -rank)  # stage 0 now for the first layer (SLQ: all)

  def advance(leaf, stage, segments=segments_lib.LeafSegments()):
    return slq_advance(leaf, stage, table, recluster=recluster,
                       power_of_two=levels == "power_of_two", iterations=iterations,
                       freeze_order=freeze_order, segments=segments)

  def step_leaf(update, leaf, ctx, hyper, phase):
    segments = segments_lib.of(ctx)
    stage = common.scheduled_stage(phase, leaf.steps, hyper.steps_per_stage) - leaf.rank
    leaf = advance(leaf, stage, segments)
    leaf = common.masked_step(update, leaf, segments)
    return leaf._replace(steps=leaf.steps + 1)

  prepare = _forward_ranks_info if staggered else None
  return core.Quantizer(core.Method(name, init_leaf, step_leaf, prepare=prepare, flat=True),
                        SlqHyper(steps_per_stage), HYPER_RANGES, selection)


def slq_quantizer(bits: int = 5, portions: Optional[Sequence[float]] = None, *,
                  steps_per_stage: int = 0, selection: selection_lib.SelectionLike = None,
                  kmeans_iterations: Optional[int] = None, levels: str = "float",
                  recluster: bool = True, freeze_order: str = "index",
                  init: str = "official",
                  cluster_counts: Optional[Sequence[int]] = None) -> core.Quantizer:
  """SLQ as a :class:`~core.Quantizer` (training: :func:`slq`; one-shot: ``.instant``)."""
  return _quantizer("slq", bits, portions, steps_per_stage, selection, False,
                    kmeans_iterations, levels, recluster, freeze_order, init, cluster_counts)


def mlq_quantizer(portions: Sequence[float] = (0.5, 1.0), *, steps_per_stage: int = 0,
                  selection: selection_lib.SelectionLike = None,
                  kmeans_iterations: int = 30, levels: str = "float",
                  recluster: bool = True) -> core.Quantizer:
  """MLQ as a :class:`~core.Quantizer` (training: :func:`mlq`; one-shot: ``.instant``)."""
  return _quantizer("mlq", 2, portions, steps_per_stage, selection, True, kmeans_iterations,
                    levels, recluster)


def slq(bits: int = 5, portions: Optional[Sequence[float]] = None, *,
        steps_per_stage: int = 0, selection: selection_lib.SelectionLike = None,
        kmeans_iterations: Optional[int] = None, levels: str = "float",
        recluster: bool = True, freeze_order: str = "index", init: str = "official",
        cluster_counts: Optional[Sequence[int]] = None) -> optax.GradientTransformation:
  """Single-level quantization as the last transformation of an optax chain.

  At ``init`` each selected layer gets its ``2^(bits-1) + 1`` k-means levels
  (:func:`official_levels`) and the clusters of index below
  ``cluster_counts[0]`` are frozen (the official order; module docstring).
  Stage ``s`` re-clusters the levels not frozen yet on the free weights and
  freezes the clusters below ``cluster_counts[s]``; the free weights retrain
  with the masked incoming update. With ``freeze_order="loss"`` (the earlier
  reading) the lowest-loss clusters are frozen up to ``portions[s]`` of the
  layer instead. Stages advance with the phase (``ec2t.set_phase``) or every
  ``steps_per_stage`` updates.

  Args:
    bits: bit width in ``[2, 8]`` (``2^(bits-1) + 1`` clusters).
    portions: ``freeze_order="loss"`` only: accumulated portions, strictly
      increasing, ending at 1 (None: ``(0.5, 0.75, 0.875, 1.0)``).
    steps_per_stage: advance a stage every this many updates (0: by phase only).
    selection: which leaves (``None`` = the paper's rule).
    kmeans_iterations: Lloyd iterations of each clustering (None: 10 with
      ``init="official"``, 30 with ``"quantile"``).
    levels: ``"float"`` (k-means centroids, the official code) or
      ``"power_of_two"`` (the library's former variant: centroids rounded to
      signed powers of two).
    recluster: re-cluster the unlocked levels at each stage (the official
      code); ``False`` keeps the levels of ``init``.
    freeze_order: ``"index"`` (official) or ``"loss"`` (see above).
    init: ``"official"`` (power-of-two start, zero pinned) or ``"quantile"``
      (:func:`ec2t_jax.kmeans_1d`, zero set afterwards).
    cluster_counts: ``freeze_order="index"`` only: clusters frozen after each
      stage, odd, strictly increasing, ending at ``2^(bits-1) + 1`` (None:
      :func:`official_cluster_counts`).

  Returns:
    An ``optax.GradientTransformation`` with state
    :class:`~ec2t_jax.QuantizerState` whose leaves are :class:`SlqLeaf`.

  Example:
    >>> import optax
    >>> from ec2t_jax import slq
    >>> tx = optax.chain(optax.adam(1e-3), slq(bits=4, steps_per_stage=500))
  """
  return slq_quantizer(bits, portions, steps_per_stage=steps_per_stage, selection=selection,
                       kmeans_iterations=kmeans_iterations, levels=levels,
                       recluster=recluster, freeze_order=freeze_order, init=init,
                       cluster_counts=cluster_counts).transform()


def mlq(portions: Sequence[float] = (0.5, 1.0), *, steps_per_stage: int = 0,
        selection: selection_lib.SelectionLike = None, kmeans_iterations: int = 30,
        levels: str = "float", recluster: bool = True) -> optax.GradientTransformation:
  """Multiple-level quantization to ternary weights (3 clusters per layer).

  SLQ's width level (clusters frozen by quantization loss, the rest retrain)
  plus the depth level: the selected layers, in forward order (the
  selection's order, see :class:`~ec2t_jax.Selection`), start one stage after
  another, so the layer of rank ``r`` is at stage ``phase - r``. While a layer
  is being quantized, the later ones are still full precision and compensate.
  With ``L`` layers and ``S`` portions the last stage is ``L + S - 2``.

  Args:
    portions: accumulated portions of each layer, ending at 1.
    steps_per_stage: advance a stage every this many updates (0: by phase only).
    selection: which leaves (``None`` = the paper's rule).
    kmeans_iterations: Lloyd iterations of each clustering.
    levels, recluster: as in :func:`slq`.

  Returns:
    An ``optax.GradientTransformation`` with state
    :class:`~ec2t_jax.QuantizerState` whose leaves are :class:`SlqLeaf`.

  Example:
    >>> import optax
    >>> from ec2t_jax import mlq
    >>> tx = optax.chain(optax.adam(1e-3), mlq(steps_per_stage=500))
  """
  return mlq_quantizer(portions, steps_per_stage=steps_per_stage, selection=selection,
                       kmeans_iterations=kmeans_iterations, levels=levels,
                       recluster=recluster).transform()


def _levels_grid(count: int, levels: str) -> grids.Grid:
  """At most ``count`` values per layer; on powers of two (and 0) for ``levels="power_of_two"``."""
  checks = (grids.zero_or_power_of_two,) if levels == "power_of_two" else ()
  return grids.Grid(count, leaf_checks=checks, ternary=count == 3)


_ITERATIONS = registry.Knob(core.Range(1.0), (30,), doc="Lloyd iterations of k-means")
_SLQ_ITERATIONS = registry.Knob(core.Range(1.0), (None,),
                                doc="Lloyd iterations (None: 10 official, 30 quantile)")
_LEVELS = registry.Knob(LEVELS, ("float",),
                        doc="float centroids (official code) or power_of_two")
_RECLUSTER = registry.Knob((True, False), (True,),
                           doc="re-cluster the unlocked levels at each stage")
registry.register_method(registry.MethodSpec(
    name="slq", kind="staged", quantizer=slq_quantizer, transform=slq,
    knobs={**inq.staged_knobs((None, (0.5, 0.75, 0.875, 1.0)), (2, 3, 4)),
           "kmeans_iterations": _SLQ_ITERATIONS, "levels": _LEVELS, "recluster": _RECLUSTER,
           "freeze_order": registry.Knob(FREEZE_ORDERS, FREEZE_ORDERS,
                                         doc="index (official: zero and largest first) or loss"),
           "init": registry.Knob(INITS, INITS,
                                 doc="official (power-of-two start) or quantile k-means"),
           "cluster_counts": registry.Knob(None, (None,),
                                           doc="freeze_order='index': clusters per stage")},
    grid=lambda o: _levels_grid(num_clusters(o["bits"]), o["levels"]),
    last_phase=lambda o, layers: len(stage_table(o["bits"], o["portions"], o["cluster_counts"],
                                                 o["freeze_order"])) - 1,
    description="Single-level quantization (Xu et al. 2018)"))
registry.register_method(registry.MethodSpec(
    name="mlq", kind="staged", quantizer=mlq_quantizer, transform=mlq,
    knobs={name: knob for name, knob in inq.staged_knobs(((0.5, 1.0), (0.5, 1.0))).items()
           if name != "bits"} | {"kmeans_iterations": _ITERATIONS, "levels": _LEVELS,
                                 "recluster": _RECLUSTER},
    grid=lambda o: _levels_grid(3, o["levels"]),
    last_phase=lambda o, layers: layers + len(o["portions"]) - 2,
    description="Multiple-level quantization to ternary (Xu et al. 2018)"))
