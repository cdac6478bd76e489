"""The examples' size-budget flags: --bits_per_weight / --target_bytes / --target_sparsity."""

import dataclasses

import pytest

import examples_support  # noqa: F401  (puts examples/ on sys.path)
import ec2t_jax as ec2t
from common import methods, report
from common.cli import UserError


@dataclasses.dataclass
class _Config:
  bits_per_weight: float = 0.0
  target_bytes: float = 0.0
  target_sparsity: float = 0.0
  budget_ramp: float = 0.3
  budget_ramp_steps: int = 120
  ec2t_mode: str = "chain"
  export_float16: bool = False
  budget_fixed_bytes: float = 0.0


def test_no_budget_flag_means_no_budget():
  assert methods.size_budget(_Config()) is None


@pytest.mark.parametrize("flag, kind", [("bits_per_weight", "bits_per_weight"),
                                        ("target_bytes", "bytes"),
                                        ("target_sparsity", "sparsity")])
def test_each_flag_gives_its_budget_with_the_ramp(flag, kind):
  got = methods.size_budget(_Config(**{flag: 0.5}))
  assert got == ec2t.Budget(**{kind: 0.5}, ramp_steps=120)


def test_a_bytes_budget_takes_the_measured_fixed_bytes_and_the_float16_export():
  config = dataclasses.replace(_Config(target_bytes=9000.0), export_float16=True,
                               budget_fixed_bytes=4321.0)
  assert methods.size_budget(config) == ec2t.Budget(bytes=9000.0, ramp_steps=120, float16=True,
                                                    fixed_bytes=4321.0)
  config = dataclasses.replace(_Config(target_sparsity=0.9), export_float16=True,
                               budget_fixed_bytes=4321.0)
  assert methods.size_budget(config) == ec2t.Budget(sparsity=0.9, ramp_steps=120)


def test_two_budget_flags_are_a_one_line_error():
  with pytest.raises(UserError, match="exactly one of"):
    methods.size_budget(_Config(bits_per_weight=0.5, target_sparsity=0.9))


def test_a_budget_out_of_range_is_a_one_line_error():
  with pytest.raises(UserError, match="bits_per_weight must be at most log2"):
    methods.size_budget(_Config(bits_per_weight=2.0))


def test_report_shows_target_reached_and_multiplier():
  results = {"fp_test_accuracy": 0.99, "ternary_test_accuracy": 0.98, "ternary_layers": 3,
             "ternary_weights": 60480, "sparsity": 0.9, "bits_per_weight": 0.6, "model": "lenet5",
             "dataset": "mnist", "gamma": 0.35, "export_bytes": 11000,
             "sizes": report.model_sizes(61706, [(60480, 0.6)]),
             "budget": {"kind": "bytes", "target": 11000.0, "reached": 10950.0,
                        "multiplier": 0.25}}
  text = report.format_report(results)
  assert "target 11,000 bytes, reached 10,950 bytes, multiplier 0.250" in text
  assert "bytes budget" in text.splitlines()[0]


def test_report_says_when_the_target_is_not_reachable():
  budget = {"kind": "sparsity", "target": 0.999, "reached": 0.977, "multiplier": 1.0,
            "saturated_steps": 57, "unreachable": True}
  rows = report.budget_rows(budget)
  assert rows[-1][2].startswith("sparsity target 0.999 not reachable: reached 0.977 with the "
                                "multiplier at its bound (1) for 57 steps")
  assert len(report.budget_rows({**budget, "unreachable": False})) == 1
