"""Plots: boundaries agree with the assignment; PNGs get written."""

import chex
import jax.numpy as jnp
import numpy as np

from ec2t_jax import plots
from ec2t_jax import report
from ec2t_jax._src.methods.ec2t import ternary

PNG = b"\x89PNG\r\n\x1a\n"


def _weights(seed=0, n=4000):
  return np.random.default_rng(seed).normal(0, 0.1, n).astype(np.float32)


def test_gamma_zero_boundaries_are_the_midpoints():
  b = plots.decision_boundaries(_weights(), 0.12, 0.16, gamma=0.0)
  chex.assert_trees_all_close((b.negative, b.positive, b.lam), (-0.06, 0.08, 0.0), atol=1e-7)


def test_boundaries_separate_zero_from_non_zero_assignments():
  w = _weights(1)
  w_n, w_p, gamma = 0.11, 0.14, 0.5
  b = plots.decision_boundaries(w, w_n, w_p, gamma)
  assignment, lam = ternary.entropy_constrained_assign(jnp.asarray(w), w_n, w_p, gamma=gamma)
  assignment = np.asarray(assignment)
  chex.assert_trees_all_close(b.lam, float(lam), rtol=1e-6)
  margin = 1e-6
  inside = (w > b.negative + margin) & (w < b.positive - margin)
  outside = (w < b.negative - margin) | (w > b.positive + margin)
  assert b.positive > 0.07  # gamma > 0 widens the zero interval
  assert (assignment[inside] == 0).all() and (assignment[outside] != 0).all()


def test_weight_histogram_writes_a_png(tmp_path):
  fig = plots.weight_histogram(_weights(2), 0.1, 0.12, gammas=(0.0, 0.2), title="layer")
  path = plots.save_figure(fig, tmp_path / "sub" / "h.png")
  assert path.read_bytes().startswith(PNG) and path.stat().st_size > 5000


def test_layer_bars_from_a_report_write_a_png(tmp_path):
  rng = np.random.default_rng(3)
  tree = {f"l{i}": {"kernel": rng.choice([-0.2, 0.0, 0.3], size=(3, 3, 8, 8),
                                         p=[0.2, 0.5 + 0.1 * i, 0.3 - 0.1 * i])
                    .astype(np.float32)} for i in range(3)}
  r = report.build_report(tree)
  written = plots.write_report_plots(r, tmp_path, latent={k: {"kernel": _weights(i, 576)
                                                              .reshape(3, 3, 8, 8)}
                                                          for i, k in enumerate(tree)})
  chex.assert_equal([p.name for p in written], ["layer_bars.png", "histograms.png"])
  assert all(p.read_bytes().startswith(PNG) for p in written)


def test_accuracy_sparsity_front_rings_exactly_the_undominated_points(tmp_path):
  points = [plots.FrontPoint("a", "1", 0.5, 0.99), plots.FrontPoint("a", "2", 0.8, 0.97),
            plots.FrontPoint("b", "x", 0.6, 0.96)]  # b is dominated by a/2
  fig = plots.accuracy_sparsity_front(points, reference=0.992)
  ringed = fig.axes[0].collections[0].get_offsets()
  np.testing.assert_allclose(sorted(map(tuple, ringed)), [(50.0, 99.0), (80.0, 97.0)])
  path = plots.save_figure(fig, tmp_path / "front.png")
  assert path.read_bytes().startswith(PNG)
