"""Pure functions of EC2T: assignment, information content, lambda, gradients.

Notation (one ternarized layer): latent full-precision weights ``W``, two positive
magnitudes ``w_n`` and ``w_p``. The ternary weight of element ``i`` is ``w_p``
(cluster p), ``0`` (cluster 0) or ``-w_n`` (cluster n). An *assignment* is an
``int8`` array of the weights' shape holding ``+1`` (p), ``0`` or ``-1`` (n).
Cluster probabilities and information contents are ordered ``(n, 0, p)``.

Every function here is pure, jit-able and works on arrays of any shape; the
arithmetic is done in float32 whatever the input dtype.

**Ties.** The assignments take ``ties``, the rule for a weight whose cost is
exactly equal for two clusters:

* ``"zero"`` (default): the first minimum over ``(0, n, p)``. A tie with zero
  goes to zero (the sparser choice: same cost, fewer bits), a tie between n
  and p goes to n.
* ``"reference"``: the first minimum over ``(n, 0, p)``, as the reference
  code's ``argmin`` has it. A tie between n and zero goes to n; the other ties
  go where ``"zero"`` sends them.

The two differ only on exact n/0 ties, e.g. ``W = -w_n / 2`` at ``lambda = 0``.
Trained float32 weights rarely hit one; the likeliest case is the layer's most
negative weight when ``gamma * size_decay = 1`` and ``lambda_max`` comes from
the negative side, where the tie holds by definition and float rounding decides.
"""

from __future__ import annotations

from typing import Literal, Sequence

import jax
import jax.numpy as jnp

from ec2t_jax._src.core import segments as segments_lib

Renormalization = Literal["exact", "reference"]
CentroidSign = Literal["exact", "reference"]
Ties = Literal["zero", "reference"]

NEGATIVE, ZERO, POSITIVE = -1, 0, 1


def _f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _check_ties(ties):
  if ties not in ("zero", "reference"):
    raise ValueError(f"ties must be 'zero' or 'reference', got {ties!r}")


def _segments(segments, channel_axis):
  """``(segments, per_channel)``: where the per-layer (per-channel) reductions go.

  ``segments`` None: the one layer given (:class:`LeafSegments` with
  ``channel_axis``); a flat buffer's ``FlatSegments`` otherwise (the core's
  flat path). Reductions are over the layer, or over each channel
  (``channel_axis`` not None), broadcasting against the weights.
  """
  if segments is None:
    segments = segments_lib.LeafSegments(-1 if channel_axis is None else channel_axis)
  return segments, channel_axis is not None


def nearest_centroid_assign(weights, w_n, w_p, *, ties: Ties = "zero") -> jax.Array:
  """Assigns each weight to the nearest of ``{-w_n, 0, w_p}``.

  .. math:: a_i = \\arg\\min_{c \\in \\{-w_n, 0, w_p\\}} (W_i - c)^2

  Ties go to zero, then to the negative cluster (``ties="reference"``: to the
  negative cluster first, see the module docstring). This is the first
  ternarization of EC2T and its assignment for ``gamma = 0`` ("EC2T-1"): the
  implied thresholds are ``-w_n / 2`` and ``w_p / 2``.

  Args:
    weights: latent weights, any shape.
    w_n: magnitude of the negative centroid (scalar, > 0).
    w_p: value of the positive centroid (scalar, > 0).
    ties: ``"zero"`` or ``"reference"``.

  Returns:
    ``int8`` assignment of ``weights``' shape with values in ``{-1, 0, 1}``.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import nearest_centroid_assign
    >>> nearest_centroid_assign(jnp.array([0.4, 0.1, -0.3]), 0.5, 0.5)
    Array([ 1,  0, -1], dtype=int8)
    >>> nearest_centroid_assign(jnp.array([-0.25]), 0.5, 0.5, ties="reference")
    Array([-1], dtype=int8)
  """
  zeros = jnp.zeros(3, jnp.float32)
  return assign_by_cost(weights, w_n, w_p, lam=0.0, information=zeros, ties=ties)


def assign_by_cost(weights, w_n, w_p, lam, information, *,
                   ties: Ties = "zero") -> jax.Array:
  """Assigns each weight to the cluster of least entropy-constrained cost.

  .. math:: a_i = \\arg\\min_{c} (W_i - v_c)^2 + \\lambda I_c,
     \\quad v = (-w_n, 0, w_p)

  Ties go to zero, then to the negative cluster (first minimum of
  ``(0, n, p)``); ``ties="reference"``: first minimum of ``(n, 0, p)``.

  Args:
    weights: latent weights, any shape.
    w_n: magnitude of the negative centroid.
    w_p: value of the positive centroid.
    lam: the Lagrange multiplier ``lambda`` (scalar, >= 0).
    information: information contents ``(I_n, I_0, I_p)`` in bits.
    ties: ``"zero"`` or ``"reference"`` (module docstring).

  Returns:
    ``int8`` assignment with values in ``{-1, 0, 1}``.
  """
  _check_ties(ties)
  w = _f32(weights)
  lam, info = _f32(lam), _f32(information)
  cost_n = jnp.square(w + _f32(w_n)) + lam * info[0]
  cost_0 = jnp.square(w) + lam * info[1]
  cost_p = jnp.square(w - _f32(w_p)) + lam * info[2]
  if ties == "reference":
    zero_or_p = jnp.where(cost_p < cost_0, jnp.int8(POSITIVE), jnp.int8(ZERO))
    return jnp.where(cost_n <= jnp.minimum(cost_0, cost_p), jnp.int8(NEGATIVE),
                     zero_or_p)
  nonzero = jnp.where(cost_p < cost_n, jnp.int8(POSITIVE), jnp.int8(NEGATIVE))
  return jnp.where(jnp.minimum(cost_n, cost_p) < cost_0, nonzero, jnp.int8(ZERO))


def cluster_counts(assignment, *, segments=None) -> jax.Array:
  """Number of elements in the clusters ``(n, 0, p)``, as float32 (one column per segment
  with a flat buffer's ``segments``: ``(3, S)``)."""
  a = jnp.asarray(assignment)
  if segments is not None:
    return jnp.stack([segments.sum(a == c) for c in (NEGATIVE, ZERO, POSITIVE)])
  # One reduction of the three indicators (one pass, one compiled loop).
  clusters = jnp.array([NEGATIVE, ZERO, POSITIVE], a.dtype).reshape(
      (3,) + (1,) * a.ndim)
  return jnp.sum(a[None] == clusters, axis=tuple(range(1, a.ndim + 1)),
                 dtype=jnp.float32)


def cluster_probabilities(
    assignment,
    *,
    zero_floor: float = 0.5,
    renormalization: Renormalization = "exact",
    segments=None,
) -> jax.Array:
  """Cluster probabilities ``(P_n, P_0, P_p)`` with EC2T's two guards.

  1. An empty cluster counts as one weight, so ``I_c`` stays finite.
  2. Sparsity bound: if ``P_0 < zero_floor`` then ``P_0 = zero_floor`` and the
     two non-zero probabilities are lowered in proportion, so the zero cluster
     keeps the smallest information content:

     .. math:: P_c \\leftarrow (1 - P_0^{floor}) \\frac{P_c}{P_n + P_p},
        \\quad c \\in \\{n, p\\}

  ``renormalization="reference"`` reproduces the reference code instead: it
  subtracts the excess ``e = P_0^{floor} - P_0`` from ``P_n`` first and uses the
  already lowered ``P_n`` in the denominator for ``P_p``:
  ``P_n' = P_n - e P_n / (P_n + P_p)``, ``P_p' = P_p - e P_p / (P_n' + P_p)``,
  so the three probabilities need not sum to one. The library's default fixes
  this; the two agree whenever ``P_0 >= zero_floor``.

  Args:
    assignment: ``int8`` assignment in ``{-1, 0, 1}``.
    zero_floor: lower bound of ``P_0`` (0.5 in EC2T).
    renormalization: ``"exact"`` (default) or ``"reference"``.
    segments: a flat buffer's ``FlatSegments`` (the core's flat path): one
      ``P`` per segment (``(3, S)``); None: one layer.

  Returns:
    float32 array ``(P_n, P_0, P_p)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import cluster_probabilities
    >>> cluster_probabilities(jnp.array([1, 1, 1, -1], jnp.int8))
    Array([0.125, 0.5  , 0.375], dtype=float32)
  """
  if renormalization not in ("exact", "reference"):
    raise ValueError("renormalization must be 'exact' or 'reference', got "
                     f"{renormalization!r}")
  if segments is None:
    numel = jnp.asarray(assignment).size
  else:
    numel = segments.numel(assignment)
  p_n, p_0, p_p = jnp.maximum(cluster_counts(assignment, segments=segments), 1.0) / numel
  zero_floor = _f32(zero_floor)
  below = p_0 < zero_floor
  if renormalization == "exact":
    rest = (1.0 - zero_floor) / (p_n + p_p)
    low_n, low_p = p_n * rest, p_p * rest
  else:
    excess = zero_floor - p_0
    low_n = p_n - excess * p_n / (p_n + p_p)
    low_p = p_p - excess * p_p / (low_n + p_p)
  return jnp.stack([jnp.where(below, low_n, p_n),
                    jnp.where(below, zero_floor, p_0),
                    jnp.where(below, low_p, p_p)])


def information_content(probabilities) -> jax.Array:
  """Information content ``I_c = -log2 P_c`` in bits.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import information_content
    >>> information_content(jnp.array([0.25, 0.5, 0.25]))
    Array([2., 1., 2.], dtype=float32)
  """
  return -jnp.log2(_f32(probabilities))


def extremes(weights, *, channel_axis=None, segments=None) -> tuple[jax.Array, jax.Array]:
  """``(|min W|, |max W|)`` as float32 scalars (with ``channel_axis``: per channel, over the
  other axes, shaped to broadcast against ``weights``).

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax._src.methods.ec2t.ternary import extremes  # internal
    >>> extremes(jnp.array([0.5, -2.0, 1.0]))
    (Array(2., dtype=float32), Array(1., dtype=float32))
  """
  w = _f32(weights)
  segments, per_channel = _segments(segments, channel_axis)
  return (jnp.abs(segments.min(w, per_channel)), jnp.abs(segments.max(w, per_channel)))


def lambda_max(weights, w_n, w_p, information, *, channel_axis=None,
               segments=None) -> jax.Array:
  """The largest useful ``lambda``: beyond it one side of the layer empties.

  For each side, the lambda at which its most extreme weight would flip to
  zero (cost of its centroid equals the cost of zero):

  .. math::
     \\lambda_n = \\frac{|\\min W|^2 - (w_n - |\\min W|)^2}{I_n - I_0}, \\quad
     \\lambda_p = \\frac{|\\max W|^2 - (w_p - |\\max W|)^2}{I_p - I_0}, \\quad
     \\lambda_{max} = \\min(\\lambda_n, \\lambda_p)

  With per-channel centroids (``channel_axis``; ``w_n``, ``w_p`` one per
  channel, broadcasting against ``weights``) each channel ``c`` has its own
  flip point ``lambda_{n,c}`` from its own extreme and centroid, and a side of
  the layer empties when its last channel does: ``lambda_n = max_c lambda_{n,c}``
  (the same for p). With one channel, or equal centroids, this is the formula
  above.

  Guards (degenerate layers only; documented deviations from the reference):
  a side whose denominator is not positive never flips, whatever lambda, so it
  gives ``+inf``; if both sides do, ``lambda_max`` is 0. A negative result
  (a centroid beyond twice the extreme weight) is clamped to 0.

  Args:
    weights: latent weights of the layer.
    w_n: magnitude of the negative centroid (one per channel with
      ``channel_axis``).
    w_p: value of the positive centroid (likewise).
    information: ``(I_n, I_0, I_p)`` of the whole layer.
    channel_axis: the output-channel axis of per-channel centroids, or None.
    segments: a flat buffer's ``FlatSegments`` (one ``lambda_max`` per
      segment); None: one layer.

  Returns:
    float32 scalar ``lambda_max >= 0``.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import lambda_max
    >>> w = jnp.array([[1.0, 0.2], [-0.5, -0.4]])  # columns: channels
    >>> info = jnp.array([2.0, 1.0, 2.0])
    >>> float(lambda_max(w, jnp.array([[0.5, 0.4]]), jnp.array([[1.0, 0.2]]), info,
    ...                  channel_axis=-1))  # min(max(0.25, 0.16), max(1.0, 0.04))
    0.25
  """
  w = _f32(weights)
  info = _f32(information)
  extreme_n, extreme_p = extremes(w, channel_axis=channel_axis, segments=segments)
  reductions, per_channel = _segments(segments, channel_axis)

  def side(extreme, centroid, delta_info):
    numerator = jnp.square(extreme) - jnp.square(_f32(centroid) - extreme)
    if per_channel:  # a side of the layer empties with its last channel
      numerator = reductions.layer_max_of_filters(numerator)
    return jnp.where(delta_info > 0,
                     numerator / jnp.where(delta_info > 0, delta_info, 1.0),
                     jnp.inf)

  lam = jnp.minimum(side(extreme_n, w_n, info[0] - info[1]),
                    side(extreme_p, w_p, info[2] - info[1]))
  return jnp.where(jnp.isfinite(lam), jnp.maximum(lam, 0.0), 0.0)


def layer_size_decay(numels: Sequence[int], sustain: float = 0.05):
  """Per-layer factor that lowers lambda for small layers.

  .. math:: \\delta_l = \\frac{n_l / \\max_k n_k + s}{1 + s}

  with ``n_l`` the number of weights of layer ``l`` and ``s`` the sustain
  (0.05 in EC2T), the maximum taken over all ternarized layers.

  Args:
    numels: number of weights of each ternarized layer.
    sustain: the sustain term ``s >= 0``.

  Returns:
    A tuple of factors in ``(0, 1]``, one per layer; the largest layer gets 1.

  Example:
    >>> from ec2t_jax import layer_size_decay
    >>> layer_size_decay([100, 50], sustain=0.0)
    (1.0, 0.5)
  """
  numels = [int(n) for n in numels]
  if not numels:
    return ()
  if min(numels) <= 0:
    raise ValueError(f"numels must be positive, got {numels}")
  largest = max(numels)
  return tuple((n / largest + sustain) / (1.0 + sustain) for n in numels)


def entropy_constrained_assign(
    weights,
    w_n,
    w_p,
    *,
    gamma,
    size_decay=1.0,
    zero_floor: float = 0.5,
    renormalization: Renormalization = "exact",
    ties: Ties = "zero",
    channel_axis=None,
    segments=None,
) -> tuple[jax.Array, jax.Array]:
  """EC2T's assignment of one layer (reference section 2).

  1. preliminary assignment ``a0`` = nearest centroid;
  2. ``P`` from ``a0`` (:func:`cluster_probabilities`), ``I = -log2 P``;
  3. ``lambda = gamma * size_decay * lambda_max(W, w_n, w_p, I)``;
  4. final assignment ``argmin_c (W - v_c)^2 + lambda I_c``.

  Args:
    weights: latent weights of the layer.
    w_n: magnitude of the negative centroid.
    w_p: value of the positive centroid.
    gamma: the global knob in ``[0, 1]``; 0 is nearest-centroid assignment.
    size_decay: the layer's :func:`layer_size_decay` factor.
    zero_floor: lower bound of ``P_0``.
    renormalization: see :func:`cluster_probabilities`.
    ties: the tie rule of both assignments (module docstring).
    channel_axis: with per-channel centroids (``w_n``, ``w_p`` one per
      output channel, shaped to broadcast against ``weights``), that axis:
      each weight is measured against its channel's centroids, while ``P``,
      ``I`` and ``lambda`` stay the layer's (:func:`lambda_max`).
    segments: a flat buffer's ``FlatSegments`` (the core's flat path: every
      segment a layer); None: one layer.

  Returns:
    ``(assignment, lam)``: the ``int8`` assignment and the lambda used.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import entropy_constrained_assign
    >>> w = jnp.array([0.9, 0.1, 0.15, -0.05, -0.6])
    >>> a, lam = entropy_constrained_assign(w, 0.3, 0.3, gamma=0.5)
  """
  lam, information = entropy_constrained_lambda(
      weights, w_n, w_p, gamma=gamma, size_decay=size_decay,
      zero_floor=zero_floor, renormalization=renormalization, ties=ties,
      channel_axis=channel_axis, segments=segments)
  reductions, per_channel = _segments(segments, channel_axis)
  # lambda I_c per layer, then per weight (the same products as inside assign_by_cost).
  penalty = _f32(lam) * _f32(information)
  penalty = jnp.stack([reductions.expand(penalty[c]) for c in range(3)])
  return assign_by_cost(weights, reductions.expand(w_n, per_channel),
                        reductions.expand(w_p, per_channel), 1.0, penalty, ties=ties), lam


def entropy_constrained_lambda(weights, w_n, w_p, *, gamma, size_decay=1.0,
                               zero_floor: float = 0.5,
                               renormalization: Renormalization = "exact",
                               ties: Ties = "zero",
                               channel_axis=None,
                               segments=None) -> tuple[jax.Array, jax.Array]:
  """Steps 1-3 of :func:`entropy_constrained_assign`: ``(lambda, I)``.

  ``I = -log2 P`` of the nearest-centroid assignment (with EC2T's guards)
  and ``lambda = gamma * size_decay * lambda_max(W, w_n, w_p, I)``.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax._src.methods.ec2t.ternary import entropy_constrained_lambda  # internal
    >>> lam, info = entropy_constrained_lambda(
    ...     jnp.array([0.9, -0.05, 0.3, -0.6, 0.02, 0.1]), 0.3, 0.45, gamma=0.0)
    >>> float(lam), [round(float(i), 4) for i in info]  # P = (1/6, 1/2, 1/3)
    (0.0, [2.585, 1.0, 1.585])
  """
  reductions, per_channel = _segments(segments, channel_axis)
  preliminary = nearest_centroid_assign(weights, reductions.expand(w_n, per_channel),
                                        reductions.expand(w_p, per_channel), ties=ties)
  probabilities = cluster_probabilities(
      preliminary, zero_floor=zero_floor, renormalization=renormalization,
      segments=segments)
  information = information_content(probabilities)
  lam = (_f32(gamma) * _f32(size_decay)
         * lambda_max(weights, w_n, w_p, information, channel_axis=channel_axis,
                      segments=segments))
  return lam, information


def zero_boundaries(w_n, w_p, lam, information) -> tuple[jax.Array, jax.Array]:
  """Where :func:`assign_by_cost` switches between zero and a centroid.

  A weight ``w > 0`` costs less as zero than as ``w_p`` while
  ``w^2 + lambda I_0 < (w - w_p)^2 + lambda I_p``, i.e. below ``b_p``
  (symmetric for the negative side):

  .. math:: b_p = \\frac{w_p^2 + \\lambda (I_p - I_0)}{2 w_p}, \\qquad
     b_n = -\\frac{w_n^2 + \\lambda (I_n - I_0)}{2 w_n}

  ``lambda = 0`` gives the midpoints ``-w_n / 2`` and ``w_p / 2``.

  Returns:
    float32 ``(b_n, b_p)``: weights strictly between them are assigned zero.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax._src.methods.ec2t.ternary import zero_boundaries  # internal
    >>> zero_boundaries(0.5, 0.25, 0.0, jnp.ones(3))
    (Array(-0.25, dtype=float32), Array(0.125, dtype=float32))
  """
  w_n, w_p, lam, info = _f32(w_n), _f32(w_p), _f32(lam), _f32(information)
  return (-(jnp.square(w_n) + lam * (info[0] - info[1])) / (2.0 * w_n),
          (jnp.square(w_p) + lam * (info[2] - info[1])) / (2.0 * w_p))


def ternary_values(assignment, w_n, w_p, dtype=jnp.float32) -> jax.Array:
  """The ternary weights ``T`` of an assignment: ``w_p``, ``0`` or ``-w_n``.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import ternary_values
    >>> ternary_values(jnp.array([1, 0, -1], jnp.int8), 0.2, 0.3)
    Array([ 0.3,  0. , -0.2], dtype=float32)
  """
  a = jnp.asarray(assignment)
  w_n, w_p = jnp.asarray(w_n, dtype), jnp.asarray(w_p, dtype)
  return jnp.where(a > 0, w_p, jnp.where(a < 0, -w_n, jnp.zeros((), dtype)))


def initial_centroids(weights, init_scale, *, channel_axis=None
                      ) -> tuple[jax.Array, jax.Array]:
  """EC2T's centroid initialization from pretrained weights.

  .. math:: w_n = s |\\min W|, \\quad w_p = s |\\max W|

  Args:
    weights: pretrained weights of the layer.
    init_scale: the initial centroid scaler ``s > 0`` (0.15-0.5 in the paper).
    channel_axis: None (one pair per layer), or the output-channel axis: one
      pair per channel from that channel's extremes, shaped to broadcast
      against ``weights`` (size 1 on the other axes).

  Returns:
    ``(w_n, w_p)`` as float32 scalars (per channel: arrays).
  """
  s = _f32(init_scale)
  extreme_n, extreme_p = extremes(weights, channel_axis=channel_axis)
  return s * extreme_n, s * extreme_p


def centroid_floor(weights, w_n, w_p, factor=0.675, *, channel_axis=None, segments=None):
  """Keeps both centroids at least ``factor * std(W)``.

  .. math:: w_c \\leftarrow \\max(w_c, \\; f \\cdot \\mathrm{std}(W))

  with the unbiased standard deviation (``ddof=1``) of the layer's latent
  weights (``f = 0.675`` in EC2T). Needs at least two weights. With
  ``channel_axis`` (per-channel centroids) each channel's centroids are
  floored at ``f`` times the standard deviation of that channel's weights.
  ``segments``: a flat buffer's ``FlatSegments`` (per segment); None: one layer.

  Returns:
    the floored ``(w_n, w_p)``.
  """
  segments, per_channel = _segments(segments, channel_axis)
  floor = _f32(factor) * segments_lib.std(segments, _f32(weights), per_channel, ddof=1)
  return jnp.maximum(_f32(w_n), floor), jnp.maximum(_f32(w_p), floor)


def latent_gradient(grad, assignment, w_n, w_p) -> jax.Array:
  """TTQ's scaled straight-through gradient of the latent weights.

  .. math:: \\frac{\\partial L}{\\partial W_i} = s_i \\, g_i, \\quad
     s_i = w_p \\;(a_i = p), \\; 1 \\;(a_i = 0), \\; w_n \\;(a_i = n)

  with ``g = dL/dT``. Zero-assigned weights keep receiving gradient, so they
  can come back.

  Returns:
    float32 array of ``grad``'s shape.
  """
  a = jnp.asarray(assignment)
  scale = jnp.where(a > 0, _f32(w_p), jnp.where(a < 0, _f32(w_n), 1.0))
  return scale * _f32(grad)


def centroid_gradients(
    grad, assignment, *, negative_sign: CentroidSign = "exact"
) -> tuple[jax.Array, jax.Array]:
  """Gradients of the loss with respect to ``w_n`` and ``w_p``.

  Exact calculus, since ``T = -w_n`` on cluster n and ``T = w_p`` on cluster p:

  .. math:: \\frac{\\partial L}{\\partial w_p} = \\sum_{i \\in p} g_i, \\quad
     \\frac{\\partial L}{\\partial w_n} = -\\sum_{i \\in n} g_i

  ``negative_sign="reference"`` returns ``+sum`` for ``w_n`` as the reference
  code does (inherited from a TTQ re-implementation; it moves ``w_n`` the wrong
  way). Use it only to reproduce the reference.

  Returns:
    ``(grad_w_n, grad_w_p)`` as float32 scalars.
  """
  if negative_sign not in ("exact", "reference"):
    raise ValueError("negative_sign must be 'exact' or 'reference', got "
                     f"{negative_sign!r}")
  a, g = jnp.asarray(assignment), _f32(grad)
  sum_n = jnp.sum(jnp.where(a < 0, g, 0.0))
  sum_p = jnp.sum(jnp.where(a > 0, g, 0.0))
  return (-sum_n if negative_sign == "exact" else sum_n), sum_p


def ternary_entropy(assignment) -> jax.Array:
  """Zeroth-order entropy of a ternary layer, in bits per weight.

  .. math:: H = -\\sum_{c \\in \\{n, 0, p\\}} P_c \\log_2 P_c,
     \\quad 0 \\log 0 = 0

  with the plain frequencies (no EC2T guards). At most ``log2 3`` bits.

  Example:
    >>> import jax.numpy as jnp
    >>> from ec2t_jax import ternary_entropy
    >>> ternary_entropy(jnp.array([1, -1, 0, 0], jnp.int8))
    Array(1.5, dtype=float32)
  """
  p = cluster_counts(assignment) / jnp.asarray(assignment).size
  return -jnp.sum(jnp.where(p > 0, p * jnp.log2(jnp.where(p > 0, p, 1.0)), 0.0))
