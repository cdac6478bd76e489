"""``F`` of a bytes budget, measured: what a file costs besides its ternary layers' rate.

``ec2t.Budget(bytes=B)`` steers the ternary layers' rate so that the file
``ec2t.export.save`` writes has ``B = F + rho N R / 8`` bytes
(:mod:`ec2t_jax._src.core.budget`). By default ``F`` counts the leaves kept in
full precision at their raw size, an upper bound: the export stores them
byte-shuffled and zlib-compressed, which saves little on most float weights but
11% on a character GPT's embeddings, where those leaves are half of the file.
:func:`fixed_bytes` measures ``F`` by packing them, and
``Budget(bytes=B, fixed_bytes=fixed_bytes(params, selection))`` then lands on
the file.
"""

from __future__ import annotations

import jax
import numpy as np

from ec2t_jax._src import container_layout
from ec2t_jax._src.core import selection as selection_lib
from ec2t_jax._src.core import trees
from ec2t_jax._src.export import exporting


def fixed_bytes(params, selection: selection_lib.SelectionLike = None, *,
                float16: bool = False) -> int:
  """``F`` of ``params``: the packed full-precision leaves, plus the model's per-leaf extras.

  .. math:: F = |\\mathrm{pack}(\\text{unselected leaves})|
            + n_{\\mathrm{sel}} (h + e),

  with ``h`` = :data:`~ec2t_jax._src.container_layout.HEADER_BYTES_PER_LEAF` (a
  leaf's header record) and ``e`` =
  :data:`~ec2t_jax._src.container_layout.TERNARY_STREAM_EXTRA_BYTES` (centroids and
  coder flush) for each of the ``n_sel`` selected leaves. The full-precision
  leaves change during training, so ``F`` measured before it is an estimate:
  on the character GPT, measured on the full-precision model, the file written
  after 1,000 more steps was 130 B (0.08%) above the controller's size.

  Args:
    params: the params tree the transformation will see (concrete arrays).
    selection: the transformation's ``selection`` (None: the paper's rule).
    float16: the file will be written with ``save(..., float16=True)``.

  Returns:
    ``F`` in bytes, for ``ec2t.Budget(bytes=..., fixed_bytes=F)``.

  Example:
    >>> import numpy as np
    >>> from ec2t_jax.export import fixed_bytes
    >>> params = {"Conv_0": {"kernel": np.zeros((3, 3, 1, 64), np.float32)},
    ...           "Dense_0": {"kernel": np.ones((64, 64), np.float32)},
    ...           "Dense_1": {"kernel": np.ones((64, 10), np.float32)}}
    >>> fixed_bytes(params) < 4 * (3 * 3 * 64 + 64 * 10)  # first and last layer, packed small
    True
  """
  plans = selection_lib.as_selection(selection).plan(params)
  flat, _ = jax.tree_util.tree_flatten_with_path(trees.pure_tree(params))  # plan's order
  kept = {trees.path_to_str(path): np.asarray(leaf)
          for (path, leaf), plan in zip(flat, plans) if plan is None}
  selected = sum(plan is not None for plan in plans)
  return (len(exporting.encode(kept, float16=float16))
          + selected * (container_layout.HEADER_BYTES_PER_LEAF
                         + container_layout.TERNARY_STREAM_EXTRA_BYTES))
