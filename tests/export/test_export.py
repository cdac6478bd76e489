"""Packed export: bitwise round trips, sizes, and a clear error for every bad file."""

import hashlib
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from ec2t_jax import export
from ec2t_jax._src.export import context_coding
from ec2t_jax._src.export import entropy_coding
from ec2t_jax._src.core import trees
from ec2t_jax._src.export import container
from ec2t_jax._src.export import errors
from ec2t_jax._src.export import leaf_parts
from ec2t_jax._src.export import sources
from ec2t_jax._src.methods.ec2t import ternary
from ec2t_jax._src.cli import export_cli

from tests.export_v1_fixture import v1_tree

DATA = Path(__file__).parents[2].parent / "shared/data/ec2t-reference"
OFFICIAL = ("ec2t_spars45", "ec2t_spars64", "ec2t_spars73")
REPO = Path(__file__).parents[2]


def _official(name):
  path = DATA / f"resnet20_{name}.npz"
  if not path.exists():
    pytest.skip(f"{path} not available")
  with np.load(path) as npz:
    return {k: npz[k] for k in npz.files}


def _ternary(rng, shape, p=(0.2, 0.6, 0.2), w_n=0.11, w_p=0.13, dtype=np.float32):
  a = rng.choice([-1, 0, 1], size=shape, p=p)
  return np.where(a > 0, dtype(w_p), np.where(a < 0, dtype(-w_n), dtype(0))).astype(dtype)


def _assert_bitwise(actual, expected):
  """Same structure (key order and types), dtypes, shapes and bytes (-0.0 and NaN exact)."""
  (got, got_structure), (want, want_structure) = trees.flatten(actual), trees.flatten(expected)
  chex.assert_equal(got_structure, want_structure)
  for (path, a), (_, e) in zip(got, want):
    assert isinstance(a, np.ndarray), path
    assert (a.dtype, a.shape) == (e.dtype, e.shape), path
    assert a.tobytes() == e.tobytes(), path


def _every_codec_tree():
  """A small tree whose leaves use each of the eight codecs this version writes."""
  rng = np.random.default_rng(0)
  sparse = np.zeros(1000, np.float32)
  sparse[rng.choice(1000, 40, replace=False)] = rng.normal(size=40)
  half = np.where(rng.random(64) < 0.5, rng.normal(size=64), 0).astype(np.float32)
  return {
      "tc": _ternary(rng, (32, 8, 3, 3), p=(0.05, 0.9, 0.05)),
      "tb": np.array([0.5, 0, -0.25, 0.5, 0, 0.5, -0.25, 0], np.float32),
      "zs": np.full(64, 1.5, np.float32),
      "raw": rng.normal(size=5).astype(np.float32),
      "sc": sparse,
      "sb": half,
      "tf": (_ternary(rng, (3, 3, 8, 16)) > 0) * rng.uniform(0.1, 1, 16).astype(np.float32),
      "cb": rng.choice(np.float32([0, 0.5, 1.5, 4.5]), size=(32, 32), p=(0.7, 0.1, 0.1, 0.1)),
  }


def _reseal(data: bytes, edit) -> bytes:
  """Applies ``edit`` to the header JSON and rewrites a valid checksum."""
  _, version, flags, h, p = struct.unpack_from("<8sHHIQ", data)
  header = json.loads(zlib.decompress(data[24:24 + h]))
  edit(header)
  new = zlib.compress(json.dumps(header).encode())
  body = struct.pack("<8sHHIQ", container.MAGIC, version, flags, len(new), p) + new + \
      data[24 + h:24 + h + p]
  return body + hashlib.sha256(body).digest()


# ------------------------------------------------------------------ round trips


def test_every_codec_is_exercised_by_the_fuzz_tree():
  info = container.read_info(container.pack(_every_codec_tree()))
  chex.assert_equal({r.path: r.codec for r in info.records},
                    {k: k for k in _every_codec_tree()})


def test_round_trip_is_bitwise_for_mixed_dtypes_and_structures():
  rng = np.random.default_rng(1)
  tree = {
      "ternary_negzero": np.array([0.3, -0.0, -0.2, 0.3] * 8, np.float32),
      "ternary_f16": _ternary(rng, (40,), dtype=np.float16),
      "ternary_f64": _ternary(rng, (7, 9), dtype=np.float64),
      "bf16": rng.normal(size=(3, 5)).astype(ml_dtypes.bfloat16),
      "dense": rng.normal(size=(6, 7)).astype(np.float32),
      "nan_inf": np.array([np.nan, np.inf, -np.inf, 0.0, -0.0], np.float32),
      "counter": np.array(20580, np.int64),
      "mask": rng.random(33) < 0.3,
      "empty": np.zeros((0, 4), np.float32),
      "ints": rng.integers(-5, 5, size=40).astype(np.int8),
      7: {"int_key": np.float32(2.5)},
      "list": [np.ones(2, np.float32), (np.zeros(3, np.int32), None)],
  }
  restored = container.unpack(container.pack(tree))
  chex.assert_equal(list(restored), list(tree))
  _assert_bitwise(restored, tree)


def test_random_ternary_model_round_trip_is_bitwise_and_detects_ternary_leaves():
  rng = np.random.default_rng(2)
  tree = {f"layer{i}": {"kernel": _ternary(rng, (3, 3, 16, 16)), "bias": rng.normal(size=16)
                        .astype(np.float32)} for i in range(3)}
  data = container.pack(tree)
  info = container.read_info(data)
  codecs = {r.path: r.codec for r in info.records}
  assert all(codecs[f"layer{i}/kernel"] in container.TERNARY_CODECS for i in range(3))
  _assert_bitwise(container.unpack(data), tree)


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_checkpoint_round_trip_is_bitwise_with_keys_in_order(name):
  state = _official(name)
  restored = container.unpack(container.pack(state))
  chex.assert_equal(list(restored), list(state))
  _assert_bitwise(restored, state)


def test_linen_params_round_trip_and_apply_identically():
  model = nn.Sequential([nn.Conv(4, (3, 3)), nn.relu, nn.Conv(3, (3, 3))])
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 2)).astype(np.float32))
  template = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape).astype(s.dtype)),
                        template)
  params = jax.tree.map(lambda w: jnp.where(jnp.abs(w) < 0.1, 0.0, jnp.sign(w) * 0.2)
                        if w.ndim == 4 else w, params)
  restored = container.unpack(container.pack(params))
  _assert_bitwise(restored, jax.tree.map(np.asarray, params))
  chex.assert_trees_all_equal(model.apply({"params": restored}, x),
                              model.apply({"params": params}, x))


def test_nnx_state_round_trips_through_replace_by_pure_dict():

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)])
      self.norm = nnx.BatchNorm(8, rngs=rngs)

    def __call__(self, x):
      return self.layers[1](nnx.relu(self.norm(self.layers[0](x))))

  model = Net(nnx.Rngs(0))
  model.eval()
  model.layers[0].kernel.value = jnp.sign(model.layers[0].kernel.value) * 0.3 * (
      jnp.abs(model.layers[0].kernel.value) > 0.3)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32))
  expected = model(x)
  state = nnx.state(model)
  pure = state.to_pure_dict()
  restored = export.unpack(export.pack(state))
  _assert_bitwise(restored, jax.tree.map(np.asarray, pure))
  fresh = Net(nnx.Rngs(5))
  fresh.eval()
  fresh_state = nnx.state(fresh)
  nnx.replace_by_pure_dict(fresh_state, restored)
  nnx.update(fresh, fresh_state)
  chex.assert_trees_all_equal(fresh(x), expected)


@pytest.mark.slow  # ~25 s of compilation on a shared 2-core CPU
def test_trained_ec2t_model_round_trips_bitwise():
  from tests import models_for_tests  # pylint: disable=g-import-not-at-top
  import ec2t_jax as ec2t  # pylint: disable=g-import-not-at-top
  model, params = models_for_tests.init()
  tx = optax.chain(optax.adam(1e-3), ec2t.ternarize_transform(gamma=0.2))
  params, _, _ = models_for_tests.train(model, params, tx, steps=2)
  data = container.pack(params)
  codecs = {r.path: r.codec for r in container.read_info(data).records}
  for name in models_for_tests.TERNARY_LEAVES:
    assert codecs[f"{name}/kernel"] in container.TERNARY_CODECS, codecs
  _assert_bitwise(container.unpack(data), jax.tree.map(np.asarray, params))


def test_float16_option_shrinks_non_ternary_leaves_and_keeps_ternary_exact():
  rng = np.random.default_rng(3)
  tree = {"dense": rng.normal(size=(64, 64)).astype(np.float32),
          "ternary": _ternary(rng, (64, 64))}
  exact, half = container.pack(tree), container.pack(tree, float16=True)
  restored = container.unpack(half)
  assert len(half) < len(exact) - 4000
  chex.assert_trees_all_equal(restored["ternary"], tree["ternary"])
  chex.assert_trees_all_equal(restored["dense"],
                              tree["dense"].astype(np.float16).astype(np.float32))


def test_float16_option_on_sparse_leaves_matches_a_float16_cast():
  rng = np.random.default_rng(11)
  sparse = np.zeros(2000, np.float32)
  sparse[rng.choice(2000, 100, replace=False)] = rng.normal(size=100)
  sparse[:3] = 1e-9  # underflows to zero in float16
  data = container.pack({"s": sparse}, float16=True)
  chex.assert_equal(container.read_info(data).records[0].codec, "sc")
  chex.assert_trees_all_equal(container.unpack(data)["s"],
                              sparse.astype(np.float16).astype(np.float32))


def test_float16_option_keeps_values_that_would_overflow():
  tree = {"big": np.full(32, 1e6, np.float32)}
  chex.assert_trees_all_equal(container.unpack(container.pack(tree, float16=True)), tree)


def test_bitmask_only_uses_the_papers_two_masks():
  tree = {"w": _ternary(np.random.default_rng(4), (3, 3, 32, 32))}
  info = container.read_info(container.pack(tree, entropy_coding=False))
  numel = tree["w"].size
  nnz = np.count_nonzero(tree["w"])
  chex.assert_equal(info.records[0].codec, "tb")
  chex.assert_equal(info.records[0].nbytes, 12 + (numel + 7) // 8 + (nnz + 7) // 8)


# ----------------------------------------------------------------------- sizes


def _large_ternary_layers():
  rng = np.random.default_rng(5)
  layers = {"iid": _ternary(rng, (3, 3, 64, 64), p=(0.18, 0.64, 0.18)),
            "skewed": _ternary(rng, (100, 200), p=(0.02, 0.95, 0.03))}
  if DATA.exists():
    for name in OFFICIAL:
      state = _official(name)
      layers.update({f"{name}/{k}": v for k, v in state.items()
                     if v.size >= 10_000 and leaf_parts.ternary_parts(v) is not None})
  return layers


def test_version_1_coder_is_within_two_percent_of_zeroth_order_entropy_or_below():
  for path, w in _large_ternary_layers().items():
    assignment = leaf_parts.ternary_parts(w).assignment
    bound = w.size * float(ternary.ternary_entropy(assignment)) / 8
    coded = len(entropy_coding.encode_symbols(assignment + 1, 3))
    assert coded <= 1.02 * bound, (path, coded, bound)


def test_context_coding_is_within_two_percent_of_zeroth_order_entropy_or_below():
  for path, w in _large_ternary_layers().items():
    assignment = leaf_parts.ternary_parts(w).assignment
    bound = w.size * float(ternary.ternary_entropy(assignment)) / 8
    coded = len(context_coding.encode(assignment + 1, 3))
    assert coded <= 1.02 * bound, (path, coded, bound)


def test_context_coding_is_never_larger_than_the_bitmasks():
  for path, w in _large_ternary_layers().items():
    a = leaf_parts.ternary_parts(w).assignment
    bitmask = (a.size + 7) // 8 + (np.count_nonzero(a) + 7) // 8
    assert len(context_coding.encode(a + 1, 3)) <= bitmask, path


@pytest.mark.parametrize("name", OFFICIAL)
def test_ternary_layers_pack_to_at_most_0_92_numel_h0(name):
  """Issue 11's target: the ternary layers' streams (values included) <= 0.92 numel H0."""
  state = _official(name)
  info = container.read_info(container.pack(state))
  records = {r.path: r for r in info.records}
  packed = bound = 0.0
  for key, w in state.items():
    parts = leaf_parts.ternary_parts(w)
    if parts is None:
      continue
    record = records[key]
    tb = 12 + (w.size + 7) // 8 + (np.count_nonzero(w) + 7) // 8
    tc = 9 + len(context_coding.encode(parts.assignment + 1, 3))
    chex.assert_equal((record.codec, record.nbytes), min(("tb", tb), ("tc", tc), key=lambda c: c[1]))
    packed += record.nbytes
    bound += w.size * float(ternary.ternary_entropy(parts.assignment)) / 8
  assert packed <= 0.92 * bound, (packed, bound, packed / bound)


def test_context_streams_decode_under_every_layout():
  rng = np.random.default_rng(6)
  for shape in [(4, 5, 6), (6, 5, 3, 3), (3, 3, 5, 6), (7, 9), (11,)]:
    for alphabet in (2, 3):
      s = rng.integers(0, alphabet, size=shape)
      for layout in context_coding.layouts(shape):
        data = context_coding.encode(s, alphabet, layout)
        chex.assert_trees_all_equal(context_coding.decode(data, shape, alphabet),
                                    s.astype(np.int8))


def test_version_1_files_written_by_the_old_writer_still_decode_bitwise():
  for name, float16 in (("export_v1.ec2t", False), ("export_v1_float16.ec2t", True)):
    data = (REPO / "tests/data" / name).read_bytes()
    info, _ = container.unpack_leaves(data)
    chex.assert_equal(info.version, 1)
    chex.assert_equal(sorted({r.codec for r in info.records}), ["raw", "sb", "se", "tb", "te", "zs"])
    expected = v1_tree()
    if float16:
      expected = trees.unflatten(
          [a.astype(np.float16).astype(a.dtype) if a.dtype in (np.float32, np.float64)
           and leaf_parts.ternary_parts(a) is None else a for _, a in trees.flatten(expected)[0]],
          trees.flatten(expected)[1])
    _assert_bitwise(container.unpack(data), expected)


def test_version_2_file_written_before_the_codec_registry_still_decodes_bitwise():
  """``export_v2.ec2t``: ``container.pack(_fuzz_tree())`` by the writer of commit 8eac42e."""
  from tests.export.test_export_hostile import _fuzz_tree  # pylint: disable=g-import-not-at-top
  data = (REPO / "tests/data/export_v2.ec2t").read_bytes()
  info, _ = container.unpack_leaves(data)
  chex.assert_equal((info.version, [r.codec for r in info.records]),
                    (2, ["tc", "tb", "zs", "raw", "sc", "sb", "tf", "cb"]))
  _assert_bitwise(container.unpack(data), _fuzz_tree())


def test_codec_tuples_are_derived_from_the_registry_in_preference_order():
  chex.assert_equal(container.CODECS, ("raw", "zs", "tb", "tc", "sb", "sc", "tf", "cb", "fc"))
  chex.assert_equal(container.CODECS_BY_VERSION[2], ("raw", "zs", "tb", "tc", "sb", "sc", "tf", "cb"))
  chex.assert_equal(container.CODECS_BY_VERSION[1], ("raw", "zs", "tb", "te", "sb", "se"))
  chex.assert_equal(set(container.RANGE_CODED), {"te", "se", "tc", "sc", "tf", "cb", "fc"})
  chex.assert_equal((container.TERNARY_CODECS, container.EXACT_CODECS),
                    (("tb", "te", "tc"), ("tf", "cb", "fc")))


def test_every_coder_raises_the_one_export_format_error():
  from ec2t_jax._src.export import codebook_coding  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.ExportFormatError):
    codebook_coding.decode(b"\0\0", 10, 2)


def test_version_1_file_with_a_tampered_stream_is_still_rejected():
  data = bytearray((REPO / "tests/data/export_v1.ec2t").read_bytes())
  info = container.read_info(bytes(data))
  data[24 + info.header_bytes + 20] ^= 0x10  # inside the first (te) stream
  body = bytes(data[:-32])
  with pytest.raises(errors.ExportFormatError):
    container.unpack(body + hashlib.sha256(body).digest())


def test_symbol_streams_decode_under_every_model_choice():
  s = np.random.default_rng(6).integers(0, 3, size=(4, 5, 6))
  for model in (entropy_coding.ModelChoice(0, (0, 0), 0.0),
                entropy_coding.ModelChoice(1, (1, 2), 0.0),
                entropy_coding.ModelChoice(1, (0, 3), 0.0)):
    data = entropy_coding.encode_symbols(s, 3, model)
    chex.assert_trees_all_equal(entropy_coding.decode_symbols(data, s.shape, 3),
                                s.astype(np.int8))


# ---------------------------------------------------------------------- errors


def test_every_truncation_raises_a_clear_error():
  data = container.pack(_every_codec_tree())
  for length in range(len(data)):
    with pytest.raises(errors.ExportFormatError, match="truncated|magic"):
      container.unpack(data[:length])


def test_every_single_bit_flip_raises_a_clear_error():
  data = bytearray(container.pack(_every_codec_tree()))
  for bit in range(8 * len(data)):
    data[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(errors.ExportFormatError):
      container.unpack(bytes(data))
    data[bit // 8] ^= 1 << (bit % 8)
  container.unpack(bytes(data))  # restored: still valid


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_random_corruption_never_yields_a_model(draw):
  data = bytearray(container.pack(_every_codec_tree()))
  kind = draw.draw(st.sampled_from(["overwrite", "insert", "delete", "append"]))
  at = draw.draw(st.integers(0, len(data) - 1))
  chunk = draw.draw(st.binary(min_size=1, max_size=16))
  if kind == "overwrite":
    if bytes(data[at:at + len(chunk)]) == chunk[:len(data) - at]:
      return
    data[at:at + len(chunk)] = chunk[:len(data) - at]
  elif kind == "insert":
    data[at:at] = chunk
  elif kind == "delete":
    del data[at:at + len(chunk)]
  else:
    data += chunk
  with pytest.raises(errors.ExportFormatError):
    container.unpack(bytes(data))


def test_wrong_magic_is_reported_as_such():
  data = container.pack({"w": np.ones(3, np.float32)})
  with pytest.raises(errors.ExportFormatError, match="bad magic"):
    container.unpack(b"PK\x03\x04" + data[4:])


def test_wrong_version_is_reported_with_the_supported_one():
  data = bytearray(container.pack({"w": np.ones(3, np.float32)}))
  struct.pack_into("<H", data, 8, 4)
  body = bytes(data[:-32])
  with pytest.raises(errors.ExportFormatError, match="unsupported format version 4.*supports 1, 2, 3"):
    container.unpack(body + hashlib.sha256(body).digest())


def test_trailing_bytes_are_rejected():
  data = container.pack({"w": np.ones(3, np.float32)})
  with pytest.raises(errors.ExportFormatError, match="trailing"):
    container.unpack(data + b"\0")


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["leaves"][0].update(n=h["leaves"][0]["n"] + 1), "add up"),
    (lambda h: h["leaves"][0].update(c="zz"), "corrupt record"),
    (lambda h: h["leaves"][0].update(d="object"), "corrupt record"),
    (lambda h: h["leaves"][0].update(s=[9999]), "leaf 'tc'"),
    (lambda h: h["leaves"][0].update(c="te"), "corrupt record"),  # a version-1 codec
    (lambda h: h["leaves"][1].update(s=[9]), "bit mask"),
    (lambda h: h.update(tree={"d": []}), "leaf records"),
    (lambda h: h["tree"]["d"][0].__setitem__(1, 99), "malformed tree"),
    (lambda h: h.update(tree={"d": [["a"]]}), "malformed tree"),
    (lambda h: h.pop("meta"), "missing"),
])
def test_consistent_checksum_but_inconsistent_header_is_rejected(edit, message):
  data = _reseal(container.pack(_every_codec_tree()), edit)
  with pytest.raises(errors.ExportFormatError, match=message):
    container.unpack(data)


def test_tampered_entropy_stream_is_caught_by_the_leaf_crc():
  tree = {"w": _ternary(np.random.default_rng(7), (32, 32, 3, 3), p=(0.1, 0.8, 0.1))}
  data = container.pack(tree)
  info = container.read_info(data)
  assert info.records[0].codec == "tc"

  def flip_crc(header):
    header["leaves"][0]["k"] ^= 1

  with pytest.raises(errors.ExportFormatError, match="CRC"):
    container.unpack(_reseal(data, flip_crc))


# ------------------------------------------------------------------- files, CLI


def test_save_and_load_round_trip(tmp_path):
  tree = _every_codec_tree()
  info = export.save(tmp_path / "m.ec2t", tree, metadata={"run": 1})
  chex.assert_equal(info.total_bytes, (tmp_path / "m.ec2t").stat().st_size)
  chex.assert_equal(info.meta["user"], {"run": 1})
  _assert_bitwise(export.load(tmp_path / "m.ec2t"), tree)


def test_load_ternary_gives_assignment_and_values(tmp_path):
  w = _ternary(np.random.default_rng(8), (3, 3, 4, 5))
  export.save(tmp_path / "m.ec2t", {"k": w, "b": np.ones(5, np.float32)})
  loaded = export.load_ternary(tmp_path / "m.ec2t")
  assert isinstance(loaded["k"], export.TernaryWeight)
  chex.assert_trees_all_equal(np.asarray(loaded["k"].values()), w)
  chex.assert_trees_all_equal(loaded["b"], np.ones(5, np.float32))


def test_failed_write_keeps_the_existing_output(tmp_path, monkeypatch):
  out = tmp_path / "m.ec2t"
  out.write_bytes(b"old")

  def boom(*_):
    raise OSError("disk full")

  monkeypatch.setattr(sources.os, "replace", boom)
  with pytest.raises(OSError, match="disk full"):
    export.save(out, {"w": np.ones(3, np.float32)})
  chex.assert_equal(out.read_bytes(), b"old")
  chex.assert_equal(sorted(p.name for p in tmp_path.iterdir()), ["m.ec2t"])


def test_cli_exports_an_npz_and_decodes_it_under_the_original_keys(tmp_path, capsys):
  state = {"layer1.0.conv1.weight": _ternary(np.random.default_rng(9), (16, 16, 3, 3)),
           "bn1.running_var": np.ones(16, np.float32), "file": np.array(3, np.int64)}
  sources.atomic_save_npz(tmp_path / "in.npz", state)
  assert export_cli.main([str(tmp_path / "in.npz"), str(tmp_path / "m.ec2t")]) == 0
  assert "1 ternary leaves, 1 entropy-coded" in capsys.readouterr().out
  assert export_cli.main(["--decode", str(tmp_path / "m.ec2t"), str(tmp_path / "out.npz")]) == 0
  with np.load(tmp_path / "out.npz") as out:
    chex.assert_equal(out.files, list(state))
    _assert_bitwise({k: out[k] for k in out.files}, state)


def test_cli_reports_bad_input_in_one_line_with_status_2(tmp_path, capsys):
  (tmp_path / "bad.ec2t").write_bytes(container.MAGIC + b"\0" * 10)
  assert export_cli.main(["--decode", str(tmp_path / "bad.ec2t"), str(tmp_path / "o.npz")]) == 2
  err = capsys.readouterr().err
  chex.assert_equal(len(err.strip().splitlines()), 1)
  assert "truncated" in err and "Traceback" not in err
  assert not (tmp_path / "o.npz").exists()


def test_python_dash_m_entry_point_exits_2_without_traceback(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "ec2t_jax.export", str(tmp_path / "missing.npz"),
       str(tmp_path / "o.ec2t")], capture_output=True, text=True, cwd=REPO, timeout=120)
  chex.assert_equal(result.returncode, 2)
  assert "no such file" in result.stderr and "Traceback" not in result.stderr


def test_orbax_checkpoint_params_are_exported(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  params = {"Conv_0": {"kernel": _ternary(np.random.default_rng(10), (3, 3, 2, 4)),
                       "bias": np.zeros(4, np.float32)}, "layers": [{"k": np.ones(2)}]}
  opt_state = optax.adam(1e-3).init(params)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", {"params": params, "opt_state": opt_state, "step": 3})
  checkpointer.wait_until_finished()
  result = export.export_file(tmp_path / "ckpt", tmp_path / "m.ec2t")
  chex.assert_equal(result.source_kind, "checkpoint")
  loaded = export.load(tmp_path / "m.ec2t")  # orbax hands back sorted keys
  chex.assert_trees_all_equal_structs(loaded, params)
  chex.assert_trees_all_equal(loaded, params, strict=True)
  with pytest.raises(ValueError, match="no 'batch_stats' entry.*params"):
    export.export_file(tmp_path / "ckpt", tmp_path / "x.ec2t", keys=("batch_stats",))


def test_flatten_names_leaves_like_path_to_str_and_keeps_insertion_order():
  tree = {"z": {"k": np.ones(2)}, "b": [np.zeros(1), (np.ones(1), None)], "a": np.float32(1)}
  names = [name for name, _ in trees.flatten(tree)[0]]
  chex.assert_equal(names, ["z/k", "b/0", "b/1/0", "a"])  # insertion order
  paths = jax.tree_util.tree_flatten_with_path(tree)[0]
  chex.assert_equal(sorted(trees.path_to_str(p) for p, _ in paths), sorted(names))
