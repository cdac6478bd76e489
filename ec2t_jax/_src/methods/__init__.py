"""Compression methods other than EC2T: one module per method (pure functions first)."""
