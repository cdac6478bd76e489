"""Calibrated pruning: the tree-level algorithm (``pruning``) and the method on the shared core (``method``)."""
