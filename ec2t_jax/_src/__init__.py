"""Implementation of ec2t_jax; import the public API from ``ec2t_jax``."""
