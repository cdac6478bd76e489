"""Size, sparsity, operation and energy report for an EC2T model.

``python -m ec2t_jax.report PATH [--json]`` reads a packed ``.ec2t`` file, an
orbax checkpoint or an ``.npz`` state dict and prints, per weight layer: path,
shape, sparsity, ``w_n``, ``w_p``, zeroth-order entropy (bits/weight), the
achieved bits/weight and bytes in the packed format; then totals against
float32 and against the paper's storage rule, operation counts by the paper's
formulas with and without dead channels, MicroNet FLOPs and an energy estimate
(Horowitz 45 nm). The accounting rules are in :mod:`ec2t_jax._src.report.accounting`.

Op counts need feature-map sizes. CIFAR ResNets (the official checkpoints,
:mod:`ec2t_jax.models.resnet`) are recognised from their parameter names;
for any other model trace its apply once and pass the result::

    from ec2t_jax import report
    layers = report.trace_geometry(lambda p, x: model.apply({"params": p}, x),
                                   params, jnp.zeros((1, 224, 224, 3)))
    report.save_geometry("geometry.json", layers)
    # python -m ec2t_jax.report model.ec2t --geometry geometry.json

Without a geometry, storage is still reported (per leaf, no dead channels) and
the op counts are omitted.

Bounded reading: ``build_report(..., max_bytes=...)`` and ``--max-bytes``
(default 4 GiB) as in :mod:`ec2t_jax.export`; bad input is one line and exit
status 2. Layers with NaN / inf weights are flagged in ``warnings``.

Example:
  >>> from ec2t_jax.report import build_report
  >>> r = build_report("resnet20_ec2t_spars64.npz")  # doctest: +SKIP
  >>> round(r["sparsity"], 3), round(r["scoring_params"]), round(r["flops"] / 1e6, 1)  # doctest: +SKIP
  (0.639, 11810, 8.5)
"""

from ec2t_jax._src.report.accounting import EXACT_RULES, PAPER_RULES, CountingRules
from ec2t_jax._src.report.geometry import (LayerGeometry, cifar_resnet_geometry, load_geometry,
                                    save_geometry, trace_geometry)
from ec2t_jax._src.report.reporting import build_report, format_report

__all__ = [
    "CountingRules", "EXACT_RULES", "LayerGeometry", "PAPER_RULES", "build_report",
    "cifar_resnet_geometry", "format_report", "load_geometry", "save_geometry",
    "trace_geometry",
]
