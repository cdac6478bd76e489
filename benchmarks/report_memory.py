"""Peak resident memory of ``python -m ec2t_jax.report`` and ``--decode`` on a tiny huge file.

The file is a packed ``.ec2t`` holding one float32 ternary kernel of ``N``
elements (``4 N`` bytes decoded, shape ``(N / 1000, 1000)``) coded with the
``tc`` codec: almost every weight zero, so the stream is a few kilobytes while
the file *declares* hundreds of megabytes. Each command runs in a fresh process under
``/usr/bin/time -v``; the baseline is the same command on a 3-element file
(the interpreter, numpy, JAX and the library). Prints one Markdown row per
command: peak RSS, peak above the baseline, and that excess as a multiple of the
decoded size.

Usage::

    python benchmarks/report_memory.py [DECODED_MB]   # default 800
"""

from __future__ import annotations

import hashlib
from importlib import metadata
import json
import re
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np

from ec2t_jax._src.export import context_coding
from ec2t_jax._src.export import container

REPO = Path(__file__).resolve().parents[1]
_CHUNK = 1 << 22
_FIXED = struct.Struct("<8sHHIQ")  # magic, version, flags, header bytes, payload bytes


def tiny_huge_file(path, shape, *, nonzeros_every: int = 100_003) -> int:
  """Writes a packed file with one ternary float32 leaf ``w`` of ``shape``.

  The leaf holds ``-0.5`` and ``0.25`` at every ``nonzeros_every``-th index
  (alternating) and ``0.0`` elsewhere; it is coded with the library's context
  coder and carries the CRC the writer stores. Returns the file's size.
  """
  numel = int(np.prod(shape))
  symbols = np.ones(numel, np.int8)  # 0: -w_n, 1: zero, 2: w_p
  symbols[::2 * nonzeros_every] = 0
  symbols[nonzeros_every::2 * nonzeros_every] = 2
  values = np.array([-0.5, 0.0, 0.25], "<f4")
  crc = 0
  for start in range(0, numel, _CHUNK):  # the CRC of the decoded leaf, chunk by chunk
    crc = zlib.crc32(values[symbols[start:start + _CHUNK]].tobytes(), crc)
  stream = values[[0, 2]].tobytes() + b"\0" + context_coding.encode(symbols, 3)
  del symbols
  # The container as the format spec (and container.pack) writes it.
  meta = {"writer": "ec2t_jax", "coder": f"constriction {metadata.version('constriction')}"}
  record = {"c": "tc", "d": "float32", "s": [int(n) for n in shape], "n": len(stream), "k": crc}
  header = zlib.compress(json.dumps({"tree": {"d": [["w", 0]]}, "leaves": [record],
                                     "meta": meta}).encode(), 9)
  body = _FIXED.pack(container.MAGIC, container.FORMAT_VERSION, 0, len(header),
                     len(stream)) + header + stream
  data = body + hashlib.sha256(body).digest()
  Path(path).write_bytes(data)
  return len(data)


def peak_rss(argv, env=None) -> int:
  """Maximum resident set size in bytes of ``python argv...`` (``/usr/bin/time -v``)."""
  result = subprocess.run(["/usr/bin/time", "-v", sys.executable, *argv], capture_output=True,
                          text=True, cwd=REPO, env=env, check=False)
  if result.returncode != 0:
    raise RuntimeError(f"{argv} exited {result.returncode}: {result.stderr[-2000:]}")
  kb = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
  return int(kb.group(1)) * 1024


def main(decoded_mb: float = 800.0) -> None:
  shape = (int(decoded_mb * 1e6) // 4000, 1000)  # a dense kernel: the report scores it
  numel = shape[0] * shape[1]
  decoded = 4 * numel
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    size = tiny_huge_file(tmp / "huge.ec2t", shape)
    tiny_huge_file(tmp / "tiny.ec2t", (1, 3), nonzeros_every=1)
    print(f"file: {size:,} bytes declaring {decoded:,} bytes ({numel:,} float32 elements, "
          f"shape {shape})\n")
    print("| command | peak RSS (MB) | baseline (MB) | excess (MB) | excess / decoded |")
    print("|---|---:|---:|---:|---:|")
    commands = {
        "report": ["-m", "ec2t_jax.report", "--max-bytes", "8G"],
        "report --json": ["-m", "ec2t_jax.report", "--json", "--max-bytes", "8G"],
        "export --decode": ["-m", "ec2t_jax.export", "--decode", "--max-bytes", "8G"],
    }
    for name, argv in commands.items():
      def run(file, argv=argv):
        extra = [str(tmp / "out.npz")] if "--decode" in argv else []
        return peak_rss([*argv, str(tmp / file), *extra])
      base, peak = run("tiny.ec2t"), run("huge.ec2t")
      print(f"| `{name}` | {peak / 1e6:,.0f} | {base / 1e6:,.0f} | {(peak - base) / 1e6:,.0f} | "
            f"{(peak - base) / decoded:.2f}x |")


if __name__ == "__main__":
  main(*(float(a) for a in sys.argv[1:2]))
