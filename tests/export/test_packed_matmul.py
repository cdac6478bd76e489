"""Packed ternary matmuls (XLA int4, Pallas 2-bit in interpret mode) against decode-then-matmul."""

import jax.numpy as jnp
import numpy as np
import pytest

from ec2t_jax.export import (Int4Ternary, PackedTernary, decode_then_matmul, pack_int4,
                             pack_pallas, pallas_ternary_matmul, ternary_columns)

# (rows of x, K, N): none a multiple of the tiles (16 rows, 4 x 16 packed rows, 16 columns).
SHAPES = [(1, 3, 2), (5, 37, 19), (17, 130, 33)]


def _kernel(k, n, seed, dyadic=False, per_column=True):
  rng = np.random.default_rng(seed)
  a = rng.integers(-1, 2, (k, n))
  size = n if per_column else 1
  if dyadic:  # powers of two: every product and sum exact in float32
    w_p, w_n = 2.0 ** rng.integers(-3, 2, size), 2.0 ** rng.integers(-3, 2, size)
  else:
    w_p, w_n = rng.uniform(0.05, 1.0, size), rng.uniform(0.05, 1.0, size)
  return np.where(a > 0, w_p, np.where(a < 0, -w_n, 0.0)).astype(np.float32)


def _x(m, k, seed, integer=False, dtype=jnp.float32):
  rng = np.random.default_rng(100 + seed)
  x = rng.integers(-4, 5, (m, k)) if integer else rng.normal(size=(m, k))
  return jnp.asarray(x, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_int4_route_is_bit_exact_to_decode_then_matmul(shape, dtype):
  m, k, n = shape
  w, x = _kernel(k, n, 0), _x(m, k, 0, dtype=dtype)
  np.testing.assert_array_equal(pack_int4(w).matmul(x), decode_then_matmul(x, w))


@pytest.mark.parametrize("shape", SHAPES)
def test_pallas_route_is_exact_on_integer_inputs_and_dyadic_scales(shape):
  m, k, n = shape
  w, x = _kernel(k, n, 1, dyadic=True), _x(m, k, 1, integer=True)
  y = pack_pallas(w, block_n=16).matmul(x, interpret=True)
  np.testing.assert_array_equal(y, decode_then_matmul(x, w))
  np.testing.assert_array_equal(y, np.asarray(x, np.float64) @ w.astype(np.float64))


def test_pallas_route_float32_differs_only_by_accumulation_order():
  m, k, n = SHAPES[2]
  w, x = _kernel(k, n, 2), _x(m, k, 2)
  np.testing.assert_allclose(pack_pallas(w).matmul(x), decode_then_matmul(x, w),
                             rtol=1e-5, atol=1e-5)


def test_pallas_route_bfloat16_is_within_one_bfloat16_rounding():
  m, k, n = SHAPES[1]
  w, x = _kernel(k, n, 3), _x(m, k, 3, dtype=jnp.bfloat16)
  y = np.asarray(pack_pallas(w).matmul(x), np.float32)
  ref = np.asarray(decode_then_matmul(x, w), np.float32)
  assert y.dtype == ref.dtype
  # both round the same float32 accumulation (up to its order) once to bf16: <= 1 ulp apart
  np.testing.assert_allclose(y, ref, rtol=2 ** -7, atol=1e-6)


def test_leading_axes_are_kept():
  w, x = _kernel(37, 19, 4), _x(6, 37, 4).reshape(2, 3, 37)
  assert pack_pallas(w).matmul(x).shape == (2, 3, 19)
  assert pack_int4(w).matmul(x).shape == (2, 3, 19)


def test_per_layer_and_per_column_kernels_decode_back_exactly():
  for per_column in (False, True):
    w = _kernel(37, 19, 5, per_column=per_column)
    np.testing.assert_array_equal(pack_pallas(w).values(), w)
    np.testing.assert_array_equal(pack_int4(w).values(), w)


def test_byte_layout_holds_rows_r_R_plus_r_in_bits_two_j():
  w = np.zeros((64, 1), np.float32)  # R = 16 packed rows
  w[0, 0], w[16, 0], w[33, 0], w[63, 0] = 1.0, -1.0, 1.0, -1.0
  p = pack_pallas(w, block_k=16)
  assert isinstance(p, PackedTernary) and p.packed.shape == (16, 16)
  # byte 0: row 0 (+, code 1) in bits 0-1 and row 16 (-, code 3) in bits 2-3
  assert int(p.packed[0, 0]) == 1 | 3 << 2
  assert int(p.packed[1, 0]) == 1 << 4  # row 33 = 2 * 16 + 1
  assert int(p.packed[15, 0]) == 3 << 6  # row 63 = 3 * 16 + 15
  assert int(np.count_nonzero(np.asarray(p.packed))) == 3


def test_resident_bytes_are_two_bits_a_weight_for_pallas_and_at_most_eight_for_int4():
  w = _kernel(256, 128, 6)
  assert pack_pallas(w).nbytes == 256 * 128 // 4 + 2 * 4 * 128
  int4 = pack_int4(w)
  assert isinstance(int4, Int4Ternary)
  assert 256 * 128 // 2 <= int4.nbytes - 2 * 4 * 128 <= 256 * 128  # XLA's CPU: a byte each


def test_a_kernel_with_four_values_in_a_column_is_refused_naming_the_layer():
  w = _kernel(8, 3, 7)
  w[:, 1] = [0.5, -0.5, 0.0, 0.25] * 2
  with pytest.raises(ValueError, match=r"blocks/0/c_fc/kernel: not ternary: output column 1 "
                                       r"holds 4 distinct values"):
    pack_pallas(w, "blocks/0/c_fc/kernel")
  with pytest.raises(ValueError, match="blocks/0/c_fc/kernel: not ternary"):
    pack_int4(w, "blocks/0/c_fc/kernel")


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_a_non_finite_scale_is_refused_naming_the_layer(bad):
  w = _kernel(8, 3, 8)
  w[w > 0] = bad
  with pytest.raises(ValueError, match=r"attn/c_proj/kernel: non-finite value"):
    ternary_columns(w, "attn/c_proj/kernel")


def test_block_sizes_must_be_powers_of_two_of_at_least_16():
  with pytest.raises(ValueError, match=r"layer: block_n must be a power of 2 >= 16 .*, got 24"):
    pack_pallas(_kernel(8, 3, 9), "layer", block_n=24)
  with pytest.raises(ValueError, match=r"block_k must be a power of 2 >= 16 .*, got 8"):
    pack_pallas(_kernel(8, 3, 9), block_k=8)


def test_a_packed_kernel_not_tiled_by_its_blocks_is_refused():
  p = pack_pallas(_kernel(8, 3, 10))
  bad = PackedTernary(p.packed[:8], p.w_n, p.w_p, 8, 3, p.block_k, p.block_n)
  with pytest.raises(ValueError, match="not tiled by block_k=16"):
    pallas_ternary_matmul(jnp.ones((1, 8)), bad)


def test_inputs_of_the_wrong_width_are_refused():
  with pytest.raises(ValueError, match="x has 5 features, the packed kernel expects 8"):
    pack_pallas(_kernel(8, 3, 11)).matmul(jnp.ones((1, 5)))


def test_a_kernel_that_is_not_two_dimensional_is_refused():
  with pytest.raises(ValueError, match="conv/kernel: a packed kernel must be 2-D"):
    ternary_columns(np.zeros((3, 3, 2, 4), np.float32), "conv/kernel")


@pytest.mark.parametrize("shape,block_n", [((1, 130, 70), None), ((5, 37, 19), 32)])
def test_the_pallas_kernel_lowers_to_a_triton_call_for_cuda_without_a_gpu(shape, block_n):
  import jax  # pylint: disable=g-import-not-at-top
  from jax import export as jax_export  # pylint: disable=g-import-not-at-top
  m, k, n = shape
  packed = pack_pallas(_kernel(k, n, 12), block_n=block_n)
  call = jax.jit(lambda x, w: pallas_ternary_matmul(x, w, interpret=False))
  exported = jax_export.export(
      call, platforms=["cuda"],
      disabled_checks=[jax_export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
          jax.ShapeDtypeStruct((m, k), jnp.bfloat16), packed)
  text = exported.mlir_module()
  assert "__gpu$xla.gpu.triton" in text  # Triton's checks (power-of-2 tiles, ...) passed
  assert f"grid_y = {packed.packed.shape[1] // packed.block_n} : i32" in text
