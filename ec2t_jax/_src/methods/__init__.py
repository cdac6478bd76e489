"""The methods wing: one module or package per method, pure functions first.

EC2T is ``ec2t/``, calibrated pruning ``calibrated_pruning/`` (the algorithm and
the method); every other method is one module. What several methods share
(the registry, grids, k-means, layer capture, ...) is in the private
``_support/`` sub-package. The registry lists the built-in method modules
explicitly (``_support/registry.py``: ``BUILTIN_MODULES``), so it is complete
whatever was imported first.
"""
