"""``report`` of a tiny file declaring many megabytes stays within twice the decoded size.

A fresh process imports the library, then caps its own address space
(``RLIMIT_AS``) at what it uses plus ``2 x`` the decoded size plus a small
allowance, and runs the report CLI on a packed file of a few kilobytes holding
one ternary float32 kernel of :data:`DECODED` bytes. Before the report read
leaves in chunks it needed about 9.5x the decoded size (``np.unique`` of every
leaf, int64 inverse indices, a copy of the assignment), twice.
``benchmarks/report_memory.py`` measures the peak RSS on a file declaring 800 MB.
"""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import report_memory  # pylint: disable=g-import-not-at-top,wrong-import-position
MiB = 2**20
DECODED = 64 * MiB
ALLOWANCE = 48 * MiB  # the decoder's own buffers, the report's dicts and text

_SCRIPT = """
import resource, sys
sys.path.insert(0, sys.argv[1])
from ec2t_jax._src.cli import report_cli

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

decoded, allowance, path = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
report_cli.main([path + ".tiny", "--json"])  # every lazy import done before the cap
size = status("VmSize")
resource.setrlimit(resource.RLIMIT_AS, (size + 2 * decoded + allowance,) * 2)
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
except OSError:
    pass
rss = status("VmRSS")
code = report_cli.main([path, "--json"])
print("peak", status("VmPeak") - size, status("VmHWM") - rss, file=sys.stderr)
raise SystemExit(code)
"""


def test_report_of_a_file_declaring_64_mib_runs_under_twice_that_address_space(tmp_path):
  decoded = DECODED // 4000 * 4000
  size = report_memory.tiny_huge_file(tmp_path / "huge.ec2t", (decoded // 4000, 1000))
  report_memory.tiny_huge_file(tmp_path / "huge.ec2t.tiny", (1, 3), nonzeros_every=1)
  assert size < 10_000
  result = subprocess.run(
      [sys.executable, "-c", _SCRIPT, str(REPO), str(decoded), str(ALLOWANCE),
       str(tmp_path / "huge.ec2t")], capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '"ternary": true' in result.stdout
  peak, resident = (int(x) for x in result.stderr.split("peak")[-1].split())
  print(f"{size:,}-byte file declaring {decoded / MiB:.1f} MiB: address space peak "
        f"+{peak / MiB:.1f} MiB, resident high-water mark +{resident / MiB:.1f} MiB")
  assert peak <= 2 * decoded + ALLOWANCE
