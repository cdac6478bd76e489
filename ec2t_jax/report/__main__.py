"""``python -m ec2t_jax.report``: see :func:`ec2t_jax.report.main`."""

from ec2t_jax.report import main

raise SystemExit(main())
