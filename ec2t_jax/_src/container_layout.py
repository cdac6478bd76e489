"""The byte sizes of the ``.ec2t`` container that a size budget counts.

The container (``_src/export/container.py``, the format's spec) builds its
fixed header and checksum from these constants; the bytes model of a size
budget (``_src/core/budget.py``) and its measured form
(``_src/export/budget_bytes.py``) read them here. This module imports nothing
of the library, so every wing may read it (core may not import export).

A file is ``FIXED_HEADER_BYTES + H + P + DIGEST_BYTES`` bytes (container.py's
table); the per-leaf sizes below are the bytes model's measured averages.
"""

import struct

# magic (8 bytes), u16 version, u16 flags, u32 H (header length), u64 P (payload length).
FIXED_HEADER_FORMAT = "<8sHHIQ"
FIXED_HEADER_BYTES = struct.calcsize(FIXED_HEADER_FORMAT)  # 24
# The SHA-256 at the end of the file.
DIGEST_BYTES = 32
# ``24 + H + P + 32``: the fixed header and the checksum.
FILE_OVERHEAD_BYTES = FIXED_HEADER_BYTES + DIGEST_BYTES
# Header JSON per leaf (zlib-compressed record and tree entry; LeNet-5's
# 10 leaves: 271-273 bytes).
HEADER_BYTES_PER_LEAF = 28
# A context-coded ternary stream beyond its ``rho n H / 8``: the centroids
# (2 x itemsize), the -0.0 flag and the range coder's flush.
TERNARY_STREAM_EXTRA_BYTES = 8
