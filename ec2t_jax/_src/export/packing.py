"""The ``.ec2t`` packed format, as one namespace (the names this module always had).

The format is specified in :mod:`ec2t_jax._src.export.container` (header,
records, SHA-256, bounded decoding, leaf names); each record codec in
:mod:`ec2t_jax._src.export.record_codecs` (one module per codec family, one
registration each); the symbol coders behind one interface in
:mod:`ec2t_jax._src.export.symbol_coding`; the leaf analyses in
:mod:`ec2t_jax._src.export.leaf_parts`. The tuples below are derived from the
codec registry, so a new codec appears in them by registration alone.

Example:
  >>> tree = {"w": np.array([[0.5, 0.0], [-0.25, 0.5]], np.float32)}
  >>> data = pack(tree)
  >>> assert (unpack(data)["w"] == tree["w"]).all()
"""

from __future__ import annotations

import numpy as np  # pylint: disable=unused-import  (the docstring's example)

from ec2t_jax._src.export import container
from ec2t_jax._src.export import record_codecs
from ec2t_jax._src.export.container import (DEFAULT_MAX_BYTES, FORMAT_VERSION, MAGIC, MAX_DIM,
                                            MAX_HEADER_BYTES, MAX_JSON_DEPTH, MAX_LEAVES,
                                            MAX_NDIM, SUPPORTED_VERSIONS, PackedInfo,
                                            decode_record, enforce_max_bytes, pack, read_info,
                                            unpack, unpack_leaves)
from ec2t_jax._src.export.errors import ExportFormatError
from ec2t_jax._src.export.leaf_bytes import inflate
from ec2t_jax._src.export.leaf_parts import (MAX_CODEBOOK, FilterTernaryParts, TernaryParts,
                                             codebook_parts, filter_ternary_parts, ternary_parts)
from ec2t_jax._src.export.record_codecs.protocol import LeafRecord

CODECS = record_codecs.names(FORMAT_VERSION)  # what this version writes
CODECS_BY_VERSION = {v: record_codecs.names(v) for v in SUPPORTED_VERSIONS}
TERNARY_CODECS = record_codecs.all_names(ternary=True)
RANGE_CODED = record_codecs.all_names(range_coded=True)
EXACT_CODECS = record_codecs.all_names(own_dtype=True, ternary=False)  # own dtype under float16

# Private names other code reached here before the split (benchmarks/report_memory.py).
_FIXED = container._FIXED  # pylint: disable=protected-access
_constriction_version = container.constriction_version
