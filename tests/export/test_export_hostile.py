"""Hostile packed files and archives: an error in one line or the right tree, and bounded memory.

Every crafted file carries a *recomputed* SHA-256 (the checksum is unkeyed), so
these reach the header and stream decoders. Peak memory of the decoding is
measured with ``tracemalloc`` (numpy's buffers are traced) in-process and with
``ru_maxrss`` in a subprocess (also counts the coder's own allocations).
"""

import hashlib
import io
import json
import struct
import subprocess
import sys
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import chex
import numpy as np
import pytest

from ec2t_jax import export
from ec2t_jax._src.export import codebook_coding
from ec2t_jax._src.export import context_coding
from ec2t_jax._src.export import entropy_coding
from ec2t_jax._src.cli import export_cli
from ec2t_jax._src.export import container
from ec2t_jax._src.export import errors
from ec2t_jax._src.cli import report_cli
from ec2t_jax._src.report import reporting
from ec2t_jax._src.export import sources
from ec2t_jax._src.core import trees

from tests.export_v1_fixture import v1_tree

REPO = Path(__file__).parents[2]
MiB = 2**20
FUZZ_MAX_BYTES = 32 * MiB  # the decoded-size limit the fuzzed reads run under
PEAK_BUDGET = 3 * FUZZ_MAX_BYTES  # decoded arrays + int8 assignments + the file, with room


def seal(header, payload: bytes = b"", version: int = container.FORMAT_VERSION) -> bytes:
  """A file with any header (dict, or raw bytes to compress) and a valid checksum."""
  raw = header if isinstance(header, bytes) else json.dumps(header).encode()
  compressed = zlib.compress(raw)
  body = struct.pack("<8sHHIQ", container.MAGIC, version, 0, len(compressed), len(payload))
  body += compressed + payload
  return body + hashlib.sha256(body).digest()


def one_leaf(record: dict, stream: bytes, **kw) -> bytes:
  record = {"n": len(stream), **record}
  return seal({"tree": {"d": [["w", 0]]}, "leaves": [record], "meta": {}}, stream, **kw)


def _order0_stream(probabilities=(0, 65535), words=b"\0\0\0\0") -> bytes:
  """A version-1 order-0 ternary stream: model byte, cut, u16 table (K - 1 entries), words."""
  return bytes([0, 0, 0]) + np.asarray(probabilities, "<u2").tobytes() + words


TERNARY_VALUES = np.array([-0.5, 0.0, 0.25], np.float32).tobytes()
TC_VALUES = np.array([-0.5, 0.25], np.float32).tobytes() + b"\0"  # -w_n, w_p, "+0"


def _zeros_bomb(nbytes: int) -> bytes:
  compressor = zlib.compressobj(9)
  chunk = bytes(MiB)
  return b"".join([compressor.compress(chunk) for _ in range(nbytes // MiB)]) + compressor.flush()


def _bounded(fn, *args, **kwargs):
  """Runs ``fn`` under tracemalloc; returns (result or the exception, peak bytes)."""
  tracemalloc.start()
  try:
    try:
      out = fn(*args, **kwargs)
    except errors.ExportFormatError as e:
      out = e
    return out, tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def _assert_error(data, match, **kwargs):
  out, peak = _bounded(container.unpack, data, **kwargs)
  assert isinstance(out, errors.ExportFormatError), f"decoded instead of failing: {match}"
  assert "\n" not in str(out)
  assert peak < PEAK_BUDGET, f"{peak / MiB:.1f} MiB to reject a {len(data)}-byte file"
  assert pytest.raises(errors.ExportFormatError, container.unpack, data, **kwargs).match(match)


# ------------------------------------------------------------------ crafted files


def test_leaf_declaring_two_to_the_31_elements_is_rejected_before_allocation():
  data = one_leaf({"c": "te", "d": "float32", "s": [2**31 + 1]},
                  TERNARY_VALUES + _order0_stream(), version=1)
  assert len(data) < 200
  _assert_error(data, "declares 8,589,934,596 bytes of arrays, more than max_bytes")


def test_context_coded_leaf_declaring_more_than_its_stream_holds_is_rejected():
  """Version 2's probability floor bounds the count by the stream length, whatever max_bytes."""
  stream = TC_VALUES + bytes([0]) + np.array([0, 65535], "<u2").tobytes() + bytes(8)
  data = one_leaf({"c": "tc", "d": "float32", "s": [2**31 + 1]}, stream)
  assert len(data) < 200
  _assert_error(data, "cannot hold 2,147,483,649 elements", max_bytes=2**50)
  capacity = context_coding.capacity(len(stream) - len(TC_VALUES), 3)
  assert capacity < 60_000  # about 2,800 symbols per byte
  _assert_error(one_leaf({"c": "tc", "d": "float32", "s": [capacity + 1]}, stream),
                "cannot hold", max_bytes=2**50)


def test_tiny_valid_file_decoding_to_many_megabytes_obeys_max_bytes():
  count = 4 * MiB  # all zeros: a 4 Mi-element all-zero layer is legitimately tiny
  order0 = entropy_coding.ModelChoice(entropy_coding.ORDER0, (0, 0), 0.0)
  stream = entropy_coding.encode_symbols(np.ones(count, np.int8), 3, order0)
  data = one_leaf({"c": "te", "d": "float32", "s": [count]}, TERNARY_VALUES + stream, version=1)
  assert len(data) < 400
  _assert_error(data, "more than max_bytes=1,048,576", max_bytes=MiB)
  out, peak = _bounded(container.unpack, data, max_bytes=FUZZ_MAX_BYTES)
  chex.assert_trees_all_equal(out["w"], np.zeros(count, np.float32))
  assert peak < 2 * 5 * count  # float32 result + int8 symbols, twice over


def test_tiny_valid_context_coded_file_decodes_bitwise_within_max_bytes():
  count = MiB  # all zeros
  stream = TC_VALUES + context_coding.encode(np.ones(count, np.int8), 3)
  data = one_leaf({"c": "tc", "d": "float32", "s": [count]}, stream)
  assert len(data) < 2000
  _assert_error(data, "more than max_bytes", max_bytes=MiB)
  out, peak = _bounded(container.unpack, data, max_bytes=FUZZ_MAX_BYTES)
  chex.assert_trees_all_equal(out["w"], np.zeros(count, np.float32))
  assert peak < 2 * 13 * count  # float32 result, int8 symbols, int64 contexts of a batch

def test_zlib_bomb_in_a_leaf_is_stopped_at_the_declared_size():
  bomb = _zeros_bomb(64 * MiB)
  assert len(bomb) < 100_000
  _assert_error(one_leaf({"c": "zs", "d": "float32", "s": [16]}, bomb), "inflates to more than 64")


def test_zlib_bomb_declaring_its_full_size_obeys_max_bytes():
  bomb = _zeros_bomb(64 * MiB)
  _assert_error(one_leaf({"c": "zs", "d": "float32", "s": [16 * MiB]}, bomb),
                "more than max_bytes", max_bytes=FUZZ_MAX_BYTES)


def test_declared_size_beyond_what_zlib_can_expand_is_rejected():
  _assert_error(one_leaf({"c": "zs", "d": "float32", "s": [10**6]}, zlib.compress(bytes(100))),
                "cannot hold 1,000,000 elements")


def test_header_zlib_bomb_is_stopped():
  header = b'{"tree": {"d": []}, "leaves": [], "meta": {"pad": "' + b" " * (40 * MiB) + b'"}}'
  _assert_error(seal(header), "corrupt header: zlib stream inflates to more than")


def test_deeply_nested_header_json_is_rejected_without_recursion_error():
  header = b'{"tree": ' + b"[" * 200_000 + b"]" * 200_000 + b', "leaves": [], "meta": {}}'
  _assert_error(seal(header), "JSON nested 200001 deep")


def test_deep_tree_structure_is_rejected_and_a_moderately_deep_tree_round_trips():
  def nested(depth, leaf):
    return leaf if depth == 0 else {"d": [["k", nested(depth - 1, leaf)]]}

  stream = np.ones(1, np.float32).tobytes()
  record = {"c": "raw", "d": "float32", "s": [1], "n": 4}
  _assert_error(seal({"tree": nested(60, 0), "leaves": [record], "meta": {}}, stream),
                "JSON nested")
  tree = np.float32(1.0)
  for _ in range(30):
    tree = {"k": tree}
  restored = container.unpack(container.pack(tree))
  for _ in range(30):
    restored = restored["k"]
  chex.assert_trees_all_equal(restored, np.float32(1.0))


@pytest.mark.parametrize("shape, match", [
    ([2**20, 2**20], "more than max_bytes"),
    ([2**40, 2**40], "corrupt record"),
    ([1] * 33, "corrupt record"),
    ([-1], "corrupt record"),
    ([2.5], "corrupt record"),
    ([True], "corrupt record"),
    ("abc", "corrupt record"),
    ([10**30], "corrupt record"),
])
def test_huge_or_malformed_shapes_are_rejected(shape, match):
  _assert_error(one_leaf({"c": "raw", "d": "float32", "s": shape}, bytes(4)), match)


def test_empty_leaf_decodes_to_the_empty_array_unless_an_axis_is_absurd():
  out = container.unpack(one_leaf({"c": "raw", "d": "float32", "s": [2**30, 0]}, b""))
  chex.assert_shape(out["w"], (2**30, 0))
  _assert_error(one_leaf({"c": "raw", "d": "float32", "s": [2**62, 0]}, b""), "corrupt record")


@pytest.mark.parametrize("codec, stream_bytes, count", [
    ("raw", 8, 3), ("tb", 12 + 1, 100), ("sb", 1, 100), ("te", 12 + 7, 10**12),
    ("se", 4 + 7, 10**12), ("tc", 9 + 7, 10**6), ("sc", 4 + 7, 10**6)])
def test_counts_beyond_what_a_stream_holds_are_rejected(codec, stream_bytes, count):
  data = one_leaf({"c": codec, "d": "float32", "s": [count]}, bytes(stream_bytes),
                  version=1 if codec in ("te", "se") else 2)
  _assert_error(data, f"cannot hold {count:,} elements", max_bytes=2**50)


# -------------------------------------------------------------------- the fuzz


def _fuzz_tree():
  rng = np.random.default_rng(0)
  a = rng.choice([-1, 0, 1], size=(16, 8, 3, 3), p=(0.1, 0.8, 0.1))
  sparse = np.zeros(1000, np.float32)
  sparse[rng.choice(1000, 40, replace=False)] = rng.normal(size=40)
  return {"te": np.where(a > 0, 0.3, np.where(a < 0, -0.2, 0.0)).astype(np.float32),
          "tb": np.array([0.5, 0, -0.25, 0.5, 0, 0.5, -0.25, 0], np.float32),
          "zs": np.full(64, 1.5, np.float32), "raw": rng.normal(size=5).astype(np.float32),
          "se": sparse,
          "sb": np.where(rng.random(64) < 0.5, rng.normal(size=64), 0).astype(np.float32),
          "tf": (a.reshape(144, 8) * rng.uniform(0.1, 1.0, 8)).astype(np.float32),
          "cb": (rng.poisson(1.0, size=(8, 16)) * 0.0123).astype(np.float32)}


HOSTILE_VALUES = (2**31 + 1, 2**40, 2**63, 2**64 + 7, -1, 0, 1, 3, 1e308, float("nan"), True,
                  None, "x", [], [2**40], [2**31, 2**31], [1] * 40, [[1]], {"d": []}, "float16",
                  "te", "zs", "sb", "se", "tb", "raw", "bfloat16", "int64", "tf", "cb", "tc", "sc")


def _assert_same(actual, expected):
  """Same structure (key order and types), dtypes, shapes and bytes."""
  (got, got_structure), (want, want_structure) = trees.flatten(actual), trees.flatten(expected)
  chex.assert_equal(got_structure, want_structure)
  for (path, a), (_, e) in zip(got, want):
    assert (a.dtype, a.shape, a.tobytes()) == (e.dtype, e.shape, e.tobytes()), path


def _reseal(data: bytes, edit) -> bytes:
  _, version, _, h, p = struct.unpack_from("<8sHHIQ", data)
  header = json.loads(zlib.decompress(data[24:24 + h]))
  payload = bytearray(data[24 + h:24 + h + p])
  edit(header, payload)
  return seal(header, bytes(payload), version=version)


@pytest.mark.parametrize("version", [2, 1])
def test_fuzz_reseal_gives_an_error_or_the_original_tree_in_bounded_memory(version):
  """Seeded: 300 header-field and entropy-stream edits, each with a recomputed checksum.

  Version 2: a file of the current writer; version 1: the committed fixture.
  """
  if version == 2:
    tree = _fuzz_tree()
    data = container.pack(tree)
  else:
    tree = v1_tree()
    data = (REPO / "tests/data/export_v1.ec2t").read_bytes()
  info = container.read_info(data)
  rng = np.random.default_rng(1234)
  offsets = np.cumsum([0] + [r.nbytes for r in info.records])
  coded = [i for i, r in enumerate(info.records) if r.crc is not None]
  assert coded, "the fuzz tree must have CRC-checked leaves"
  outcomes = {"error": 0, "same": 0}
  worst = 0
  for case in range(300):
    leaf = int(rng.integers(len(info.records)))
    if case % 3 == 2:  # a byte of a CRC-checked stream
      leaf = coded[int(rng.integers(len(coded)))]
      at = int(rng.integers(offsets[leaf], offsets[leaf + 1]))
      value = int(rng.integers(256))

      def edit(header, payload, at=at, value=value):
        payload[at] = value
    else:
      field = ["c", "d", "s", "n", "v", "k"][int(rng.integers(6))]
      value = HOSTILE_VALUES[int(rng.integers(len(HOSTILE_VALUES)))]

      def edit(header, payload, leaf=leaf, field=field, value=value):
        header["leaves"][leaf][field] = value
    try:
      hostile = _reseal(data, edit)
    except ValueError:  # json cannot write this value (NaN is written, so this is rare)
      continue
    out, peak = _bounded(container.unpack, hostile, max_bytes=FUZZ_MAX_BYTES)
    worst = max(worst, peak)
    if isinstance(out, errors.ExportFormatError):
      assert "\n" not in str(out)
      outcomes["error"] += 1
    else:
      _assert_same(out, tree)
      outcomes["same"] += 1
  print(f"fuzz (version {version}): {outcomes}, peak traced memory {worst / MiB:.2f} MiB")
  assert outcomes["error"] > 200
  assert worst < PEAK_BUDGET


_CAPPED_SCRIPT = r"""
import resource, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from tests.export import test_export_hostile as t
from ec2t_jax._src.export import container, entropy_coding, errors

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

hostile = [
    t.one_leaf({"c": "te", "d": "float32", "s": [2**31 + 1]}, t.TERNARY_VALUES + t._order0_stream(),
               version=1),
    t.one_leaf({"c": "te", "d": "float32", "s": [2**29]}, t.TERNARY_VALUES + t._order0_stream(),
               version=1),
    t.one_leaf({"c": "tc", "d": "float32", "s": [2**29]}, t.TC_VALUES + bytes(13)),
    t.one_leaf({"c": "zs", "d": "float32", "s": [16]}, t._zeros_bomb(64 * t.MiB)),
    t.seal(b'{"tree": ' + b"[" * 200000 + b"]" * 200000 + b', "leaves": [], "meta": {}}'),
]
order0 = entropy_coding.ModelChoice(entropy_coding.ORDER0, (0, 0), 0.0)
count = 4 * t.MiB
valid = t.one_leaf({"c": "te", "d": "float32", "s": [count]},
                   t.TERNARY_VALUES + entropy_coding.encode_symbols(np.ones(count, np.int8), 3, order0),
                   version=1)
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
except OSError:
    pass  # the high-water figures then include the imports; the cap below still holds
size, rss = status("VmSize"), status("VmRSS")
resource.setrlimit(resource.RLIMIT_AS, (size + t.CAP, size + t.CAP))
for data in hostile:
    try:
        container.unpack(data, max_bytes=t.FUZZ_MAX_BYTES)
        raise SystemExit("decoded a hostile file")
    except errors.ExportFormatError:
        pass
hostile_hwm = status("VmHWM") - rss
out = container.unpack(valid, max_bytes=t.FUZZ_MAX_BYTES)
assert not out["w"].any() and out["w"].shape == (count,)
print(hostile_hwm, status("VmHWM") - rss, status("VmPeak") - size)
"""
CAP = 256 * MiB


def test_crafted_files_decode_under_an_address_space_cap():
  """A fresh process capped at +256 MiB of address space rejects the crafted files.

  The cap (``RLIMIT_AS``) also covers the range coder's own allocations, which
  tracemalloc does not see: reserving memory for 2^31 symbols would abort the
  process. A valid 4 Mi-element file (16 MiB decoded) still decodes under it.
  """
  result = subprocess.run([sys.executable, "-c", _CAPPED_SCRIPT, str(REPO)], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
  assert result.returncode == 0, result.stderr[-2000:]
  hostile, valid, peak = (int(x) for x in result.stdout.split()[-3:])
  print(f"resident high-water mark above the start: {hostile / MiB:.1f} MiB after the hostile "
        f"files, {valid / MiB:.1f} MiB after a valid 16 MiB decode; address space peak "
        f"+{peak / MiB:.1f} MiB (cap {CAP / MiB:.0f} MiB)")
  assert peak < CAP


# ---------------------------------------------------------------- .npz and CLIs


def _npz_with_header(shape, payload: bytes) -> bytes:
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as archive:
    with archive.open("big.npy", "w") as member:
      np.lib.format.write_array_header_1_0(
          member, {"descr": "<f8", "fortran_order": False, "shape": shape})
      member.write(payload)
  return buffer.getvalue()


def test_npz_header_declaring_a_huge_shape_is_a_value_error():
  data = _npz_with_header((2**40,), bytes(8))
  with pytest.raises(ValueError, match=r"declares shape \(1099511627776,\).*stores 8 bytes"):
    sources.read_npz(data)


def test_npz_fuzz_with_hostile_headers_gives_an_error_or_the_stored_array():
  """Seeded: 200 archives whose .npy header declares random shapes and dtypes (valid zip CRCs)."""
  rng = np.random.default_rng(7)
  dims = (0, 1, 2, 3, 5, 2**31, 2**40, 2**62)
  outcomes = {"error": 0, "array": 0}
  worst = 0
  for _ in range(200):
    shape = tuple(int(rng.choice(dims)) for _ in range(int(rng.integers(0, 5)) if rng.random() < 0.9
                                                        else 40))
    descr = str(rng.choice(["<f4", "<f8", "|u1", "<i8", "|b1", "|O"]))
    payload = rng.integers(0, 256, size=int(rng.choice([0, 1, 8, 24, 240]))).astype(np.uint8)
    fortran = bool(rng.random() < 0.3)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
      with archive.open("a.npy", "w") as member:
        np.lib.format.write_array_header_1_0(
            member, {"descr": descr, "fortran_order": fortran, "shape": shape})
        member.write(payload.tobytes())
    tracemalloc.start()
    try:
      try:
        out = sources.read_npz(buffer.getvalue(), max_bytes=FUZZ_MAX_BYTES)
      except ValueError as e:
        out = e
      worst = max(worst, tracemalloc.get_traced_memory()[1])
    finally:
      tracemalloc.stop()
    if isinstance(out, ValueError):
      assert "\n" not in str(out)
      outcomes["error"] += 1
    else:
      chex.assert_equal((out["a"].dtype, out["a"].shape), (np.dtype(descr), shape))
      assert out["a"].tobytes(order="F" if fortran else "C") == payload.tobytes()
      outcomes["array"] += 1
  print(f"npz fuzz: {outcomes}, peak traced memory {worst / MiB:.2f} MiB")
  assert outcomes["error"] > 100 and outcomes["array"] > 0
  assert worst < PEAK_BUDGET


def test_npz_larger_than_max_bytes_is_refused_before_reading():
  buffer = io.BytesIO()
  np.savez(buffer, a=np.zeros(1000))
  with pytest.raises(ValueError, match="more than max_bytes=100"):
    sources.read_npz(buffer.getvalue(), max_bytes=100)


@pytest.mark.parametrize("main, args", [
    (export_cli.main, []), (export_cli.main, ["--decode"]), (report_cli.main, None)])
def test_clis_answer_hostile_inputs_in_one_line_with_status_2(tmp_path, capsys, main, args):
  files = {
      "huge.npz": _npz_with_header((2**40,), bytes(8)),
      "count.ec2t": one_leaf({"c": "te", "d": "float32", "s": [2**31 + 1]},
                             TERNARY_VALUES + _order0_stream(), version=1),
      "count2.ec2t": one_leaf({"c": "tc", "d": "float32", "s": [2**31 + 1]}, TC_VALUES + bytes(13)),
      "deep.ec2t": seal(b'{"tree": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
      "bomb.ec2t": one_leaf({"c": "zs", "d": "float32", "s": [16]}, _zeros_bomb(8 * MiB)),
  }
  for name, content in files.items():
    (tmp_path / name).write_bytes(content)
    argv = [str(tmp_path / name)] if args is None else args + [str(tmp_path / name),
                                                               str(tmp_path / "out")]
    assert main(argv) == 2, name
    err = capsys.readouterr().err
    chex.assert_equal(len(err.strip().splitlines()), 1)
    assert "Traceback" not in err and "error:" in err, err
  assert not (tmp_path / "out").exists()


def test_max_bytes_option_limits_what_the_cli_reads(tmp_path, capsys):
  export.save(tmp_path / "m.ec2t", {"w": np.zeros(1000, np.float32)})
  assert export_cli.main(["--decode", "--max-bytes", "2K", str(tmp_path / "m.ec2t"),
                          str(tmp_path / "o.npz")]) == 2
  assert "more than max_bytes=2,048" in capsys.readouterr().err
  assert export_cli.main(["--decode", "--max-bytes", "1M", str(tmp_path / "m.ec2t"),
                          str(tmp_path / "o.npz")]) == 0


def test_report_flags_non_finite_weights_per_layer():
  rng = np.random.default_rng(0)
  w = rng.choice([-0.1, 0.0, 0.2], size=(3, 3, 4, 8)).astype(np.float32)
  bad = w.copy()
  bad[0, 0, 0, 0] = np.nan
  bad[1, 1, 1, 1] = np.inf
  r = reporting.build_report({"good": {"kernel": w}, "bad": {"kernel": bad}}, geometry=None)
  layers = {layer["path"]: layer for layer in r["layers"]}
  chex.assert_equal((layers["good/kernel"]["nonfinite"], layers["bad/kernel"]["nonfinite"]), (0, 2))
  chex.assert_equal((layers["good/kernel"]["ternary"], layers["bad/kernel"]["ternary"]),
                    (True, False))
  chex.assert_equal(len(r["warnings"]), 1)
  assert "bad/kernel has 2 non-finite weights" in r["warnings"][0]
  text = reporting.format_report(r)
  assert "NONFINITE" in text and "WARNING: layer bad/kernel" in text


# ------------------------------------------- issue 16: names, symbol counts, overwrites


def _two_layer_file() -> bytes:
  layer = lambda: {"kernel": np.ones((2, 3), np.float32), "bias": np.zeros(3, np.float32)}
  return container.pack({"fcA": layer(), "fcB": layer()})


def _renamed(data: bytes, *names) -> bytes:
  """``data`` with its top-level keys renamed (checksum recomputed)."""
  def edit(header, payload):
    for entry, name in zip(header["tree"]["d"], names):
      entry[0] = name
  return _reseal(data, edit)


def test_decode_of_names_holding_nul_fails_in_one_line_instead_of_merging_leaves(tmp_path, capsys):
  path = tmp_path / "nul.ec2t"
  path.write_bytes(_renamed(_two_layer_file(), "fc1\x00", "fc1\x00evil"))
  assert export_cli.main(["--decode", str(path), str(tmp_path / "out.npz")]) == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and "NUL" in err, err
  assert not (tmp_path / "out.npz").exists()
  with pytest.raises(errors.ExportFormatError, match="NUL"):
    export.load(path)


@pytest.mark.parametrize("name, match", [
    ("../../../../etc/x", r"'\.\.' component"), ("/etc/x", "absolute path"),
    ("..\\..\\evil", r"'\.\.' component"), ("a/../b", r"'\.\.' component"),
    ("\\evil", "absolute path"), ("C:evil", "absolute path"),
    ("\ud800", "lone surrogate"), ("x" * 70_000, "bytes long in UTF-8"),
])
def test_unsafe_leaf_names_are_refused_at_load_and_at_save(name, match):
  _assert_error(_renamed(_two_layer_file(), name), match)
  with pytest.raises(ValueError, match=match):
    container.pack({name: np.zeros(2, np.float32)})


def test_a_leaf_name_longer_than_a_zip_entry_is_a_one_line_cli_error(tmp_path, capsys):
  path = tmp_path / "long.ec2t"
  path.write_bytes(_renamed(_two_layer_file(), "k" * 65_536))
  assert export_cli.main(["--decode", str(path), str(tmp_path / "out.npz")]) == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
  assert len(err) < 1000, "the message quotes the name shortened"


def test_names_that_are_the_same_npz_entry_are_refused():
  _assert_error(_renamed(_two_layer_file(), "a\\b", "a/b"), "same .npz entry")
  with pytest.raises(ValueError, match="same .npz entry"):
    container.pack({"a/b": np.zeros(2), "a": {"b": np.ones(2)}})


def test_a_5001_digit_integer_key_is_an_export_format_error(tmp_path):
  data = seal(b'{"tree": {"d": [[' + b"9" * 5001 + b', 0]]}, "leaves": '
              b'[{"c": "raw", "d": "float32", "s": [1], "n": 4}], "meta": {}}', bytes(4))
  (tmp_path / "big.ec2t").write_bytes(data)
  with pytest.raises(errors.ExportFormatError, match="corrupt header"):
    export.load(tmp_path / "big.ec2t")


def _without_crc(record: dict) -> dict:
  return {k: v for k, v in record.items() if k != "k"}


@pytest.mark.parametrize("declared", [98, 99, 101, 102])
def test_tc_stream_with_symbols_dropped_or_invented_is_refused_without_its_crc(declared):
  a = np.random.default_rng(3).choice([0, 1, 2], size=100, p=(0.2, 0.6, 0.2))
  stream = TC_VALUES + context_coding.encode(a, 3)
  _assert_error(one_leaf({"c": "tc", "d": "float32", "s": [declared]}, stream),
                "not the encoding of exactly")


def test_tf_stream_declaring_an_extra_row_of_filters_is_refused_without_its_crc():
  rng = np.random.default_rng(0)
  a = rng.choice([-1, 0, 1], size=(16, 8), p=(0.3, 0.4, 0.3))
  data = container.pack({"w": (a * rng.uniform(0.1, 1.0, 8)).astype(np.float32)})

  def edit(header, payload):
    header["leaves"][0].pop("k")
    header["leaves"][0]["s"] = [17, 8]  # 8 invented symbols

  assert container.read_info(data).records[0].codec == "tf"
  _assert_error(_reseal(data, edit), "not the encoding of exactly")


@pytest.mark.parametrize("declared", [2046, 2047])
def test_codebook_index_stream_holding_more_indices_than_declared_is_refused(declared):
  values = np.array([1.0, 2.0], np.float32).tobytes()
  indices = codebook_coding.encode(np.random.default_rng(0).integers(0, 2, size=2048), 2)
  _assert_error(_cb_leaf(values, indices, declared), "not the encoding of exactly")
  _assert_error(_cb_leaf(values, indices[:-4], 2048), "not the encoding|range decoder|data left")


def test_empty_codebook_index_stream_is_not_2048_zeros():
  values = np.array([1.0, 2.0], np.float32).tobytes()
  _assert_error(_cb_leaf(values, b"", 2048), "not the encoding of exactly")
  with pytest.raises(errors.ExportFormatError, match="2,048 symbols"):
    codebook_coding.decode(b"", 2048, 2)


def _cb_leaf(values: bytes, indices: bytes, count: int) -> bytes:
  return one_leaf({"c": "cb", "d": "float32", "s": [count]}, b"\x02\x00" + values + indices)


def test_a_semi_static_stream_with_no_data_words_is_not_5000_symbols():
  order0 = entropy_coding.ModelChoice(entropy_coding.ORDER0, (0, 0), 0.0)
  stream = entropy_coding.encode_symbols(np.ones(5000, np.int8), 3, order0)
  no_words = stream[:3 + 2 * 2]  # model, cut and table only
  with pytest.raises(errors.ExportFormatError, match="5,000 symbols"):
    entropy_coding.decode_symbols(no_words, (5000,), 3)
  _assert_error(one_leaf({"c": "te", "d": "float32", "s": [5000]}, TERNARY_VALUES + no_words,
                         version=1), "not the encoding of exactly")


def test_bool_leaves_hold_only_zero_and_one():
  _assert_error(one_leaf({"c": "raw", "d": "bool", "s": [3]}, bytes([0, 1, 2])),
                "bytes other than 0 and 1")
  out = container.unpack(container.pack({"w": np.array([True, False, True])}))
  chex.assert_trees_all_equal(out["w"], np.array([True, False, True]))


@pytest.mark.parametrize("fn", [export.export_file, export.decode_file, export.export_inference])
def test_writing_the_output_over_the_input_is_refused_before_anything_is_written(tmp_path, fn):
  src = tmp_path / "m.npz"
  np.savez(src, w=np.ones(4, np.float32))
  before = src.read_bytes()
  (tmp_path / "link.npz").symlink_to(src)
  for out in (src, tmp_path / "link.npz", tmp_path / "." / "m.npz"):
    with pytest.raises(ValueError, match="is the input"):
      fn(src, out)
  assert src.read_bytes() == before


def _streams_are_encodings(data: bytes) -> bool:
  """Whether every stream of ``data`` is what its codec writes for the leaf it decodes to."""
  info, arrays = container.unpack_leaves(data)
  offset = 24 + info.header_bytes
  for record, array in zip(info.records, arrays):
    alone = container.pack({"w": array}, codecs={record.codec})
    if alone[-32 - record.nbytes:-32] != data[offset:offset + record.nbytes]:
      return False
    offset += record.nbytes
  return True


def test_decode_of_an_npz_with_traversal_entry_names_is_refused(tmp_path):
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as archive:
    for name in ("ok.npy", "../../evil.npy"):
      with archive.open(name, "w") as member:
        np.lib.format.write_array(member, np.ones(2, np.float32))
  (tmp_path / "in.npz").write_bytes(buffer.getvalue())
  with pytest.raises(errors.ExportFormatError, match=r"'\.\.' component"):
    export.decode_file(tmp_path / "in.npz", tmp_path / "out.npz")
  assert not (tmp_path / "out.npz").exists()


def test_report_of_a_file_with_nul_names_is_a_one_line_error(tmp_path, capsys):
  path = tmp_path / "nul.ec2t"
  path.write_bytes(_renamed(_two_layer_file(), "fc1\x00", "fc1\x00evil"))
  assert report_cli.main([str(path)]) == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and "NUL" in err, err


_HOSTILE_NAMES = ("fc\x00", "fc\x00evil", "\udcff", "../x", "/x", "..\\x", "C:\\x", "x" * 5000,
                  "te")  # the last one clashes with a sibling


def test_fuzz_of_counts_names_and_crc_removal_gives_an_error_or_the_original_tree():
  """Seeded: 240 edits that change what a stream must hold, each with the CRC field removed.

  Edits: a shape that declares more or fewer elements, a stream cut short or
  extended by whole words, a hostile leaf name. Without the CRC only the
  exact-count check stands between these and a silently different array. An
  edit can also make a *valid* file of another tree (a ``tb`` leaf of 8
  elements whose last is zero is, byte for byte, the ``tb`` stream of its first
  7): such a file decodes, and every stream is exactly its decoded leaf's
  encoding (``other``); a ``different`` outcome is a decoded leaf whose stream
  is not its encoding, and there must be none.
  """
  tree = _fuzz_tree()
  data = container.pack(tree)
  info = container.read_info(data)
  offsets = np.cumsum([0] + [r.nbytes for r in info.records])
  rng = np.random.default_rng(2026)
  outcomes = {"files": 0, "error": 0, "same": 0, "other": 0, "different": 0}
  for case in range(240):
    leaf = int(rng.integers(len(info.records)))
    kind = case % 4

    def edit(header, payload, leaf=leaf, kind=kind, case=case):
      for record in header["leaves"]:
        record.pop("k", None)
      record = header["leaves"][leaf]
      if kind == 0:  # declare more or fewer elements along one axis
        axis = int(rng.integers(len(record["s"])))
        record["s"][axis] = max(0, record["s"][axis] + int(rng.choice([-2, -1, 1, 2, 18])))
      elif kind in (1, 2):  # cut or extend the stream by whole words
        start, stop = offsets[leaf], offsets[leaf + 1]
        words = int(rng.integers(1, 3)) * 4
        if kind == 1:
          del payload[max(start, stop - words):stop]
        else:
          payload[stop:stop] = rng.integers(0, 256, words).astype(np.uint8).tobytes()
        record["n"] = len(payload) - sum(r["n"] for i, r in enumerate(header["leaves"])
                                         if i != leaf)
      else:  # a hostile name
        header["tree"]["d"][leaf][0] = _HOSTILE_NAMES[case // 4 % len(_HOSTILE_NAMES)]

    hostile = _reseal(data, edit)
    outcomes["files"] += 1
    out, _ = _bounded(container.unpack, hostile, max_bytes=FUZZ_MAX_BYTES)
    if isinstance(out, errors.ExportFormatError):
      assert "\n" not in str(out)
      outcomes["error"] += 1
      continue
    try:
      _assert_same(out, tree)
      outcomes["same"] += 1
    except AssertionError:
      outcomes["other" if _streams_are_encodings(hostile) else "different"] += 1
  print(f"count/name fuzz without CRC: {outcomes}")
  chex.assert_equal(outcomes["different"], 0)
  assert outcomes["error"] > 200
