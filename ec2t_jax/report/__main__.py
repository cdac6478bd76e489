"""``python -m ec2t_jax.report``: see :mod:`ec2t_jax._src.report_cli`."""

from ec2t_jax._src.report_cli import main

raise SystemExit(main())
