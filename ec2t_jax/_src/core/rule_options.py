"""Which Rule options a method accepts: checked in one place for every method."""

from __future__ import annotations

from typing import Optional, Sequence

from ec2t_jax._src.core import selection as selection_lib
from ec2t_jax._src.core.protocol import Method


def _mode_error(method: Method, where: str, mode: str) -> ValueError:
  modes = ", ".join(repr(m) for m in method.accepts.modes)
  return ValueError(f"{method.name} quantizes leaves in mode {modes} only; {where} "
                    f"with mode {mode!r}")


def _gamma_error(method: Method, where: str, gamma) -> ValueError:
  return ValueError(f"{method.name} has no per-rule gamma (only EC2T has); {where} "
                    f"with gamma={gamma!r}")


def check_rules(method: Method, selection: selection_lib.Selection) -> None:
  """Raises ``ValueError`` for an explicit :class:`~ec2t_jax.Rule` the method does not accept.

  Called at construction, so a bad rule fails before any params exist.

  Example:
    >>> from ec2t_jax import Rule, Selection
    >>> from ec2t_jax._src.core.protocol import Method  # internal
    >>> from ec2t_jax._src.core.rule_options import check_rules  # internal
    >>> m = Method("twn", None, None)
    >>> check_rules(m, Selection([Rule("conv", mode="ecp")]))
    Traceback (most recent call last):
    ...
    ValueError: twn quantizes leaves in mode 'ternary' only; rule 0 ('conv') selects leaves with mode 'ecp'
  """
  for index, rule in enumerate(selection.rules):
    if rule.mode == "skip":
      continue
    where = f"rule {index} ({rule.pattern!r}) selects leaves"
    if rule.mode not in method.accepts.modes:
      raise _mode_error(method, where, rule.mode)
    if rule.gamma is not None and not method.accepts.rule_gamma:
      raise _gamma_error(method, where, rule.gamma)


def check_plans(method: Method, plans: Sequence[Optional[selection_lib.LeafPlan]]) -> None:
  """Raises ``ValueError`` naming the first selected path whose plan the method does not accept."""
  for plan in plans:
    if plan is None:
      continue
    where = f"a Rule selects {plan.path!r}"
    if plan.mode not in method.accepts.modes:
      raise _mode_error(method, where, plan.mode)
    if plan.gamma is not None and not method.accepts.rule_gamma:
      raise _gamma_error(method, where, plan.gamma)
