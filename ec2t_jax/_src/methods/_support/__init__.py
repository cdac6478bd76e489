"""Helpers the methods share: the registry, grids, k-means, layer capture, stage restarts."""
