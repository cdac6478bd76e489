"""ec2t_jax: Entropy-Constrained Trained Ternarization (EC2T) for JAX/Flax.

Sparse ternary networks by wrapping your optax optimizer::

  import ec2t_jax as ec2t
  tx = ec2t.chain(optax.adamw(1e-4), ec2t.ternarize_transform(gamma=0.2))
  opt_state = tx.init(params)
  params = ec2t.quantized_params(params, opt_state)

(``ec2t.chain`` is ``optax.chain`` whose weight decay acts on the latent
weights, not on the ternary values the params hold.) Other train-time ternary
methods plug into the same chain position and tools:
``ec2t.twn``, ``ec2t.ttq``, ``ec2t.sttn``, ``ec2t.bitnet`` (BitNet b1.58), ``ec2t.paretoq``
(ternary to 4 bits) and Faraone et al.'s
``ec2t.sparsity_regularizer`` + ``ec2t.quantization_pruning``.

Every method is registered by name with its kind (train / staged /
one-shot), knobs and grid: ``ec2t.method_registry()``, ``ec2t.get_method(name)``;
``ec2t.register_method(spec)`` adds one (see ``_src/methods/_support/registry.py``).

Compressed export and size/operation reports: ``ec2t.export`` and
``ec2t.report`` (also ``python -m ec2t_jax.export`` / ``python -m
ec2t_jax.report``); plots: ``ec2t_jax.plots`` (needs matplotlib); reference
models: ``ec2t_jax.models``. See README.md for a tour and WORKSPACE.md for the
map of the code.
"""

from ec2t_jax import export
from ec2t_jax import report
from ec2t_jax._src.methods.ec2t.chain import ternarize_transform
from ec2t_jax._src.methods.ec2t.chain import EC2TLeaf
from ec2t_jax._src.methods.ec2t.chain import ECPLeaf
from ec2t_jax._src.methods.ec2t.reference_mode import ternarize_reference
from ec2t_jax._src.methods.ec2t.reference_mode import reference_optimizer
from ec2t_jax._src.methods.ec2t.reference_mode import TernarizeReferenceState
from ec2t_jax._src.methods.ec2t.ternary import assign_by_cost
from ec2t_jax._src.methods.ec2t.ternary import centroid_floor
from ec2t_jax._src.methods.ec2t.ternary import centroid_gradients
from ec2t_jax._src.methods.ec2t.ternary import cluster_counts
from ec2t_jax._src.methods.ec2t.ternary import cluster_probabilities
from ec2t_jax._src.methods.ec2t.ternary import entropy_constrained_assign
from ec2t_jax._src.methods.ec2t.ternary import information_content
from ec2t_jax._src.methods.ec2t.ternary import initial_centroids
from ec2t_jax._src.methods.ec2t.ternary import lambda_max
from ec2t_jax._src.methods.ec2t.ternary import latent_gradient
from ec2t_jax._src.methods.ec2t.ternary import layer_size_decay
from ec2t_jax._src.methods.ec2t.ternary import nearest_centroid_assign
from ec2t_jax._src.methods.ec2t.ternary import ternary_entropy
from ec2t_jax._src.methods.ec2t.ternary import ternary_values
from ec2t_jax._src.methods.twn import twn
from ec2t_jax._src.methods.twn import TWNLeaf
from ec2t_jax._src.methods.twn import twn_optimal_threshold
from ec2t_jax._src.methods.twn import twn_scale
from ec2t_jax._src.methods.twn import twn_ternarize
from ec2t_jax._src.methods.twn import twn_threshold
from ec2t_jax._src.methods.ttq import ttq
from ec2t_jax._src.methods.ttq import TTQLeaf
from ec2t_jax._src.methods.ttq import ttq_assign
from ec2t_jax._src.methods.ttq import ttq_gradients
from ec2t_jax._src.methods.ttq import ttq_sparsity_threshold
from ec2t_jax._src.methods.ttq import ttq_threshold
from ec2t_jax._src.methods.sttn import sttn
from ec2t_jax._src.methods.sttn import STTNLeaf
from ec2t_jax._src.methods.sttn import sttn_gradients
from ec2t_jax._src.methods.sttn import sttn_init
from ec2t_jax._src.methods.sttn import sttn_official_gradients
from ec2t_jax._src.methods.sttn import sttn_scale
from ec2t_jax._src.methods.sttn import sttn_ternarize
from ec2t_jax._src.methods.sttn import ternary_activation
from ec2t_jax._src.methods.bitnet import absmean_ternarize
from ec2t_jax._src.methods.bitnet import bitnet
from ec2t_jax._src.methods.bitnet import BitNetLeaf
from ec2t_jax._src.methods.bitnet import quantize_activations_int8
from ec2t_jax._src.methods.paretoq import paretoq
from ec2t_jax._src.methods.paretoq import ParetoQLeaf
from ec2t_jax._src.methods.paretoq import paretoq_codes
from ec2t_jax._src.methods.paretoq import paretoq_gradients
from ec2t_jax._src.methods.paretoq import paretoq_init_scale
from ec2t_jax._src.methods.paretoq import paretoq_levels
from ec2t_jax._src.methods.paretoq import paretoq_quantize
from ec2t_jax._src.methods.paretoq import paretoq_step
from ec2t_jax._src.methods.sparsity_regularization import quantization_pruning
from ec2t_jax._src.methods.sparsity_regularization import PrunedTernaryLeaf
from ec2t_jax._src.methods.sparsity_regularization import sparsity_regularizer
from ec2t_jax._src.methods.sparsity_regularization import threshold_density
from ec2t_jax._src.methods._support.ternary_ops import threshold_assign
from ec2t_jax._src.methods.inq import inq
from ec2t_jax._src.methods.inq import InqLeaf
from ec2t_jax._src.methods.inq import inq_codebook
from ec2t_jax._src.methods.inq import inq_quantize
from ec2t_jax._src.methods.inq import official_stage_optimizer
from ec2t_jax._src.methods.inq import official_stage_schedule
from ec2t_jax._src.methods.slq import slq
from ec2t_jax._src.methods.slq import mlq
from ec2t_jax._src.methods.slq import SlqLeaf
from ec2t_jax._src.methods._support.stage_restart import restart_on_stage
from ec2t_jax._src.methods._support.clustering import kmeans_1d
from ec2t_jax._src.methods.mcq import mcq
from ec2t_jax._src.methods.mcq import mcq_quantize
from ec2t_jax._src.methods.calibrated_pruning.pruning import prune_calibrated
from ec2t_jax._src.methods._support.fractals import fractal_images
from ec2t_jax._src.methods._support.registry import method_registry
from ec2t_jax._src.methods._support.registry import get_method
from ec2t_jax._src.methods._support.registry import register_method
from ec2t_jax._src.methods._support.registry import MethodSpec
from ec2t_jax._src.methods._support.registry import Knob
from ec2t_jax._src.core.selection import Rule
from ec2t_jax._src.core.selection import Selection
from ec2t_jax._src.core.selection import LeafPlan
from ec2t_jax._src.core.selection import describe_selection
from ec2t_jax._src.core.tracing import forward_order
from ec2t_jax._src.core.tracing import ForwardOrder
from ec2t_jax._src.core import QuantizerState
from ec2t_jax._src.core.budget import Budget
from ec2t_jax._src.core.budget import BudgetState
from ec2t_jax._src.core import StackedLeaf
from ec2t_jax._src.core.latent_chain import chain
from ec2t_jax._src.core.state_access import find_quantizer_state
from ec2t_jax._src.core.state_access import quantized_params
from ec2t_jax._src.core.state_access import set_phase
from ec2t_jax._src.core.state_access import freeze_assignment
from ec2t_jax._src.core.state_access import is_frozen
from ec2t_jax._src.core.summary import summary
from ec2t_jax._src.core.summary import Summary
from ec2t_jax._src.core.summary import LayerSummary
from ec2t_jax._src.core.summary import value_entropy
from ec2t_jax._src.export.inference import ternary_apply
from ec2t_jax._src.export.inference import ternary_conv
from ec2t_jax._src.export.inference import ternary_dense
from ec2t_jax._src.export.inference import ternary_weights
from ec2t_jax._src.export.inference import TernaryWeight
from ec2t_jax._src.export.errors import ExportFormatError

from ec2t_jax._src import deprecations as _deprecations

# Old names: each warns on use and goes in the version named (``_src/deprecations.py``).
_DEPRECATED = {
    "ternarize": _deprecations.Deprecated("ternarize_reference", ternarize_reference, "0.2.0"),
    "ternary_params": _deprecations.Deprecated("quantized_params", quantized_params, "0.2.0"),
    "find_ternarize_state": _deprecations.Deprecated("find_quantizer_state",
                                                     find_quantizer_state, "0.2.0"),
    "TernarizeState": _deprecations.Deprecated("QuantizerState", QuantizerState, "0.2.0"),
}
__getattr__ = _deprecations.deprecation_getattr(__name__, _DEPRECATED)

__version__ = "0.1.0"

__all__ = (
    # The EC2T transformations
    "ternarize_transform",
    "EC2TLeaf",
    "ECPLeaf",
    "ternarize_reference",
    "reference_optimizer",
    "TernarizeReferenceState",
    # EC2T's pure functions
    "assign_by_cost",
    "Budget",
    "BudgetState",
    "centroid_floor",
    "centroid_gradients",
    "cluster_counts",
    "cluster_probabilities",
    "entropy_constrained_assign",
    "information_content",
    "initial_centroids",
    "lambda_max",
    "latent_gradient",
    "layer_size_decay",
    "nearest_centroid_assign",
    "ternary_entropy",
    "ternary_values",
    # Other train-time methods: TWN
    "twn",
    "TWNLeaf",
    "twn_optimal_threshold",
    "twn_scale",
    "twn_ternarize",
    "twn_threshold",
    # TTQ
    "ttq",
    "TTQLeaf",
    "ttq_assign",
    "ttq_gradients",
    "ttq_sparsity_threshold",
    "ttq_threshold",
    # STTN
    "sttn",
    "STTNLeaf",
    "sttn_gradients",
    "sttn_init",
    "sttn_official_gradients",
    "sttn_scale",
    "sttn_ternarize",
    "ternary_activation",
    # BitNet b1.58
    "bitnet",
    "BitNetLeaf",
    "absmean_ternarize",
    "quantize_activations_int8",
    # ParetoQ
    "paretoq",
    "ParetoQLeaf",
    "paretoq_codes",
    "paretoq_gradients",
    "paretoq_init_scale",
    "paretoq_levels",
    "paretoq_quantize",
    "paretoq_step",
    # Faraone et al.
    "quantization_pruning",
    "PrunedTernaryLeaf",
    "sparsity_regularizer",
    "threshold_density",
    # Shared ternary op
    "threshold_assign",
    # Staged methods: INQ
    "inq",
    "InqLeaf",
    "inq_codebook",
    "inq_quantize",
    "official_stage_optimizer",
    "official_stage_schedule",
    # SLQ / MLQ
    "slq",
    "restart_on_stage",
    "mlq",
    "SlqLeaf",
    # k-means
    "kmeans_1d",
    # One-shot (post-training) methods: MCQ
    "mcq",
    "mcq_quantize",
    # Calibrated pruning (data-free: fractal calibration images)
    "prune_calibrated",
    "fractal_images",
    # The method registry
    "method_registry",
    "get_method",
    "register_method",
    "MethodSpec",
    "Knob",
    # Selection
    "Rule",
    "Selection",
    "LeafPlan",
    "describe_selection",
    "forward_order",
    "ForwardOrder",
    # The chain whose weight decay acts on the latent weights
    "chain",
    # State and tools for every method
    "QuantizerState",
    "StackedLeaf",
    "find_quantizer_state",
    "quantized_params",
    "set_phase",
    "freeze_assignment",
    "is_frozen",
    "summary",
    "value_entropy",
    "Summary",
    "LayerSummary",
    # Ternary inference
    "ternary_apply",
    "ternary_conv",
    "ternary_dense",
    "ternary_weights",
    "TernaryWeight",
    # Export and report
    "ExportFormatError",
    "export",
    "report",
)
