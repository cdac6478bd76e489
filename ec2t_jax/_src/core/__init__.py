"""The core wing: what every method plugs into.

``from ec2t_jax._src import core`` gives the method protocol
(:mod:`.protocol`), exact landing (:mod:`.grid`), hyperparameter ranges
(:mod:`.hyper`) and the transformation machinery (:mod:`.transform`). The
other core modules (selection, trees, tracing, state access, summary) are
imported by name. Nothing here imports from ``methods``, ``export``,
``report`` or ``cli``.
"""

from ec2t_jax._src.core import budget
from ec2t_jax._src.core.grid import exact_update
from ec2t_jax._src.core.grid import scaled_assignment
from ec2t_jax._src.core.grid import snap_to_grid
from ec2t_jax._src.core.hyper import check_choice
from ec2t_jax._src.core.hyper import check_range
from ec2t_jax._src.core.hyper import hyper_is_valid
from ec2t_jax._src.core.hyper import is_concrete
from ec2t_jax._src.core.hyper import Range
from ec2t_jax._src.core.protocol import GroupSlot
from ec2t_jax._src.core.protocol import is_leaf_state
from ec2t_jax._src.core.protocol import LeafContext
from ec2t_jax._src.core.protocol import LeafState
from ec2t_jax._src.core.protocol import Method
from ec2t_jax._src.core.protocol import NO_PARAMS_MSG
from ec2t_jax._src.core.protocol import over_slices
from ec2t_jax._src.core.protocol import QuantizerState
from ec2t_jax._src.core.protocol import RuleOptions
from ec2t_jax._src.core.protocol import TreeInfo
from ec2t_jax._src.core.rule_options import check_plans
from ec2t_jax._src.core.rule_options import check_rules
from ec2t_jax._src.core.protocol import slice_suffix
from ec2t_jax._src.core.protocol import StackedLeaf
from ec2t_jax._src.core.transform import advance
from ec2t_jax._src.core.transform import check_same_tree
from ec2t_jax._src.core.transform import decay_latents
from ec2t_jax._src.core.transform import emit_updates
from ec2t_jax._src.core.transform import flat_leaf_states
from ec2t_jax._src.core.transform import group_states
from ec2t_jax._src.core.transform import init_leaf_state
from ec2t_jax._src.core.transform import init_state
from ec2t_jax._src.core.transform import latent_fields
from ec2t_jax._src.core.transform import LAYOUTS
from ec2t_jax._src.core.transform import leaf_contexts
from ec2t_jax._src.core.transform import prepare_tree
from ec2t_jax._src.core.transform import Quantizer
from ec2t_jax._src.core.transform import QuantizerTransformation
from ec2t_jax._src.core.transform import quantize_transform
from ec2t_jax._src.core.transform import slice_indices
from ec2t_jax._src.core.transform import step_groups
from ec2t_jax._src.core.transform import step_leaves
