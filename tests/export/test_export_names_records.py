"""Export names and records: slice names never meet real names, reserved metadata, every saved
leaf loads back bitwise, crafted stacked-leaf records are refused, float16 never underflows a leaf."""

import hashlib
import json
import struct
import zlib

import chex
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ec2t_jax import export
from ec2t_jax._src.cli import export_cli
from ec2t_jax._src.core import trees
from ec2t_jax._src.export import container
from ec2t_jax._src.export import errors
from ec2t_jax._src.export import sources
from ec2t_jax._src.export import stacking


def _stack_of_ternary_layers(layers: int = 3) -> np.ndarray:
  """``(layers, 4, 2)``: each slice ternary with its own values, the whole not."""
  base = np.array([[1, 0], [-1, 1], [0, -1], [1, 1]])
  return np.stack([np.where(base > 0, 0.25 * (i + 1), np.where(base < 0, -0.5 * (i + 1), 0.0))
                   for i in range(layers)]).astype(np.float32)


def _assert_bitwise(actual, expected):
  (got, got_structure), (want, want_structure) = trees.flatten(actual), trees.flatten(expected)
  chex.assert_equal(got_structure, want_structure)
  for (path, a), (_, e) in zip(got, want):
    assert isinstance(a, np.ndarray), path
    assert (a.dtype, a.shape, a.tobytes()) == (e.dtype, e.shape, e.tobytes()), path


# --------------------------------------------------------------- names at save


@pytest.mark.parametrize("name", ["kernel[3]", "kernel[0]", "kernel[1,2]", "kernel[x]"])
def test_a_leaf_named_like_a_slice_beside_a_stacked_leaf_is_refused_at_save_naming_it(name):
  # kernel[3] would be stacked into kernel (4 layers), kernel[0] overwritten by slice 0,
  # kernel[1,2] / kernel[x] make a file that decode refuses.
  tree = {"block": {"kernel": _stack_of_ternary_layers(), name: np.ones(2, np.float32)}}
  with pytest.raises(ValueError, match=rf"leaf 'block/{name[:6]}\[.*stacked leaf 'block/kernel'"):
    export.encode(tree)


def test_the_refusal_names_the_way_out_and_full_precision_keeps_the_leaf_whole(tmp_path):
  tree = {"kernel": _stack_of_ternary_layers(), "kernel[3]": np.ones(2, np.float32)}
  with pytest.raises(ValueError, match="rename that leaf or keep 'kernel' whole"):
    export.save(tmp_path / "m.ec2t", tree)
  export.save(tmp_path / "m.ec2t", tree, full_precision={"kernel"})
  _assert_bitwise(export.load(tmp_path / "m.ec2t"), tree)


def test_slice_like_names_beside_a_leaf_that_is_not_split_round_trip():
  tree = {"kernel": np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4),
          "kernel[0]": np.ones(2, np.float32), "other[1]": np.zeros(3, np.int8)}
  _assert_bitwise(export.decode(export.encode(tree)), tree)


# --------------------------------------------------------- reserved metadata


@pytest.mark.parametrize("key", ["ec2t_stacked_leaves", "inference", "source_kind"])
def test_reserved_metadata_keys_are_refused_by_every_writer(key, tmp_path):
  tree = {"a[0]": np.ones(2, np.float32), "a[1]": np.zeros(2, np.float32)}
  metadata = {key: [[["a"], 1]]}
  np.savez(tmp_path / "in.npz", **tree)
  writers = {
      "save": lambda: export.save(tmp_path / "m.ec2t", tree, metadata=metadata),
      "encode": lambda: export.encode(tree, metadata=metadata),
      "pack": lambda: export.pack(tree, metadata=metadata),
      "export_file": lambda: export.export_file(tmp_path / "in.npz", tmp_path / "o.ec2t",
                                                metadata=metadata),
      "export_inference": lambda: export.export_inference(tmp_path / "in.npz",
                                                          tmp_path / "i.ec2t",
                                                          metadata=metadata),
  }
  for name, write in writers.items():
    with pytest.raises(ValueError, match=f"metadata key {key!r} is reserved"):
      write()
  assert not list(tmp_path.glob("*.ec2t"))


def test_leaves_named_like_slices_with_user_metadata_come_back_as_they_were():
  tree = {"a[0]": np.ones(2, np.float32), "a[1]": np.zeros(2, np.float32)}
  data = export.encode(tree, metadata={"note": "two leaves, not a stack"})
  _assert_bitwise(export.decode(data), tree)


def test_the_library_keys_are_still_written_and_read():
  data = export.encode({"k": _stack_of_ternary_layers()}, metadata={"run": 1})
  user = container.read_info(data).meta["user"]
  assert user["run"] == 1 and user[stacking.METADATA_KEY] == [[["k"], 1]]


def test_metadata_that_is_not_a_dict_is_a_type_error():
  with pytest.raises(TypeError, match="metadata must be a JSON-able dict, got a list"):
    export.encode({"w": np.zeros(2, np.float32)}, metadata=[1, 2])


# ---------------------------------------------------- every saved leaf loads back


@pytest.mark.parametrize("values", [
    np.array([-1, 0, 1]),  # int64 (numpy's default integer)
    np.array([np.iinfo(np.int64).min, -1, 0, np.iinfo(np.int64).max]),
    np.array([2**63, 1, 5], np.uint64),
    np.array([-1.0, 0.0, 1.0, 2.0]),  # float64 with negatives
    np.array([-3, -2, 7], np.int32),
])
def test_codebook_leaves_with_high_bit_values_save_and_load_bitwise(values, tmp_path):
  leaf = np.random.default_rng(0).choice(values, size=(40, 25))
  info = export.save(tmp_path / "m.ec2t", {"w": leaf})
  assert info.records[0].codec == "cb"
  _assert_bitwise(export.load(tmp_path / "m.ec2t"), {"w": leaf})


def test_the_export_cli_output_of_a_signed_integer_leaf_loads(tmp_path):
  leaf = np.random.default_rng(0).choice(np.array([-1, 0, 1]), size=3000)
  np.savez(tmp_path / "in.npz", w=leaf)
  assert export_cli.main([str(tmp_path / "in.npz"), str(tmp_path / "out.ec2t")]) == 0
  _assert_bitwise(export.load(tmp_path / "out.ec2t"), {"w": leaf})


def test_a_bool_leaf_holding_bytes_other_than_0_and_1_is_refused_at_save():
  leaf = np.array([0, 1, 2], np.uint8).view(np.bool_)  # reads as [False, True, True]
  with pytest.raises(ValueError, match="bool leaf 'flags' holds bytes other than 0 and 1"):
    export.encode({"flags": leaf})


FUZZ_DTYPES = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
               np.uint64, np.float16, np.float32, np.float64, ml_dtypes.bfloat16)
SHAPES = ((), (0,), (1,), (7,), (3, 5), (4, 3, 2), (2, 3, 2, 2), (40, 30))


@st.composite
def _leaves(draw):
  """A leaf of any stored dtype made of 1 to 300 distinct bit patterns (special ones likely)."""
  dtype = np.dtype(draw(st.sampled_from(FUZZ_DTYPES)))
  bits = 1 if dtype == np.bool_ else 8 * dtype.itemsize
  top = 2**bits - 1
  special = st.sampled_from([0, 1, top, top >> 1, (top >> 1) + 1, 2, top - 1])
  count = draw(st.sampled_from([1, 2, 3, 4, 5, 17, 255, 256, 257, 300]))
  patterns = draw(st.lists(st.one_of(special, st.integers(0, top)), min_size=1,
                           max_size=count))
  shape = draw(st.sampled_from(SHAPES))
  if dtype.kind == "f" or dtype == ml_dtypes.bfloat16:
    stacked = draw(st.booleans()) and len(shape) >= 3  # a stack of layers of <= 3 values
  else:
    stacked = False
  words = np.array(patterns, np.uint64).astype(f"u{dtype.itemsize}")
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  if stacked:
    layers = [rng.choice(words, size=3)[rng.integers(0, 3, size=shape[1:])]
              for _ in range(shape[0])]
    leaf_bits = np.stack(layers)
  else:
    leaf_bits = words[rng.integers(0, words.size, size=shape)]
  return leaf_bits.view(dtype).reshape(shape)


def _save_then_load_is_the_identity_or_a_clear_refusal(leaf, entropy):
  tree = {"layer": {"w": leaf}}
  try:
    data = export.encode(tree, entropy_coding=entropy)
  except ValueError as e:  # allowed, if it names the leaf
    assert "layer/w" in str(e), e
    return
  _assert_bitwise(export.decode(data), tree)


@settings(max_examples=50, deadline=None)
@given(leaf=_leaves(), entropy=st.booleans())
def test_fuzz_save_then_load_is_the_identity_or_a_clear_refusal(leaf, entropy):
  _save_then_load_is_the_identity_or_a_clear_refusal(leaf, entropy)


@pytest.mark.slow  # the same property, 1,000 examples
@settings(max_examples=1000, deadline=None)
@given(leaf=_leaves(), entropy=st.booleans())
def test_long_fuzz_save_then_load_is_the_identity_or_a_clear_refusal(leaf, entropy):
  _save_then_load_is_the_identity_or_a_clear_refusal(leaf, entropy)


# --------------------------------------------- crafted stacked-leaf records


def _with_record(tree, record) -> bytes:
  """A valid file of ``tree`` whose header holds ``record`` as the stacked-leaf record."""
  data = container.pack(tree)
  _, version, flags, h, p = struct.unpack_from("<8sHHIQ", data)
  header = json.loads(zlib.decompress(data[24:24 + h]))
  header["meta"]["user"] = {stacking.METADATA_KEY: record}
  new = zlib.compress(json.dumps(header).encode())
  body = struct.pack("<8sHHIQ", container.MAGIC, version, flags, len(new), p) + new + \
      data[24 + h:24 + h + p]
  return body + hashlib.sha256(body).digest()


def _every_reader(data: bytes, tmp_path):
  """decode, load_ternary and the sources' reader (decode_file / report)."""
  path = tmp_path / "crafted.ec2t"
  path.write_bytes(data)
  return {"decode": lambda: export.decode(data), "load_ternary": lambda: export.load_ternary(path),
          "load_tree": lambda: sources.load_tree(path)}


SLICE = np.array([[0.5, 0.0], [-0.5, 0.5]], np.float32)
STACK = [[["k"], 1]]


@pytest.mark.parametrize("tree, record, match", [
    ({"k[0]": SLICE.astype(np.float16), "k[1]": SLICE > 0, "k[2]": SLICE.astype(np.int32)},
     STACK, "different dtypes"),
    ({"k[0]": SLICE, "k[1]": SLICE.astype(np.float64)}, STACK, "different dtypes"),
    ({"k[0]": SLICE, "k[1]": SLICE[0]}, STACK, "different dtypes or shapes"),
    ({"k": SLICE, "k[0]": SLICE, "k[1]": SLICE}, STACK, "stacked name 'k' is also a leaf"),
    ({"k[0]": {"a": SLICE}, "k[1]": {"a": SLICE}}, STACK, "not an array"),
    ({"k[0]": None, "k[1]": None}, STACK, "not an array"),
    ({"k[0]": SLICE, "k[1]": [SLICE]}, STACK, "not an array"),
    ({"k[0]": SLICE, "k[01]": SLICE}, STACK, "not k\\[i\\]"),
    ({"k[0]": SLICE, "k[2]": SLICE}, STACK, "2 slices, stack shape \\(3,\\)"),
    ({"k[0]": SLICE, "k[1]": SLICE}, [[["k"], True]], "depth True"),
    ({"k[0]": SLICE, "k[1]": SLICE}, [[["k"], 2]], "with 2 index"),
    ({"k[0]": SLICE, "k[1]": SLICE}, [[[True, "k"], 1]], "neither a string"),
    ({"k[0]": SLICE, "k[1]": SLICE}, [[["k"], 1], [["k"], 1]], "also a leaf"),
    ({"k[0]": SLICE, "k[1]": SLICE}, [["k", 1]], "not \\[\\[keys"),
])
def test_crafted_records_that_do_not_match_the_tree_are_refused_by_every_reader(
    tree, record, match, tmp_path):
  for name, read in _every_reader(_with_record(tree, record), tmp_path).items():
    with pytest.raises(errors.ExportFormatError, match=match):
      read()


@pytest.mark.parametrize("record", [5, True, False, 0, 2.5, "k", None, {"k": 1}])
def test_a_record_that_is_not_a_list_is_an_export_format_error(record, tmp_path):
  tree = {"k[0]": SLICE, "k[1]": SLICE}
  for name, read in _every_reader(_with_record(tree, record), tmp_path).items():
    with pytest.raises(errors.ExportFormatError, match="is a .*, not a list"):
      read()


def test_a_valid_crafted_record_restacks_in_every_reader(tmp_path):
  tree = {"k[0]": SLICE, "k[1]": -SLICE}
  readers = _every_reader(_with_record(tree, STACK), tmp_path)
  np.testing.assert_array_equal(readers["decode"]()["k"], np.stack([SLICE, -SLICE]))
  np.testing.assert_array_equal(readers["load_tree"]().tree["k"], np.stack([SLICE, -SLICE]))
  weights = readers["load_ternary"]()["k"]
  assert [float(w.w_p) for w in weights] == [0.5, 0.5]


# ------------------------------------------------------------------ float16


def test_float16_keeps_a_leaf_that_would_underflow_to_zeros_in_its_dtype(tmp_path):
  tiny = (np.random.default_rng(0).normal(size=256) * 1e-9).astype(np.float32)
  assert (tiny.astype(np.float16) == 0).mean() > 0.99  # what float16 would store
  info = export.save(tmp_path / "m.ec2t", {"tiny": tiny}, float16=True)
  assert info.records[0].storage == "float32"
  _assert_bitwise(export.load(tmp_path / "m.ec2t"), {"tiny": tiny})


def test_float16_still_stores_a_normal_leaf_with_a_few_tiny_values_as_float16():
  leaf = (np.random.default_rng(1).normal(size=4096) * 0.02).astype(np.float32)
  leaf[:8] = 1e-9
  record = container.read_info(export.encode({"w": leaf}, float16=True)).records[0]
  assert record.storage == "float16"


@settings(max_examples=60, deadline=None)
@given(exponent=st.floats(-12, 4.5), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**32 - 1))
def test_float16_storage_never_errs_beyond_float16_rounding_in_norm(exponent, dtype, seed):
  leaf = (np.random.default_rng(seed).normal(size=300) * 10.0**exponent).astype(dtype)
  back = export.decode(export.encode({"w": leaf}, float16=True))["w"]
  error = np.linalg.norm(back.astype(np.float64) - leaf)
  assert error <= 2.0**-11 * np.linalg.norm(leaf.astype(np.float64)) * (1 + 1e-6)
