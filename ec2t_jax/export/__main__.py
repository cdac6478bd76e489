"""``python -m ec2t_jax.export``: see :func:`ec2t_jax.export.main`."""

from ec2t_jax.export import main

raise SystemExit(main())
