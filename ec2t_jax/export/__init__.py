"""Compressed export of EC2T models: the bytes really shrink, and the model comes back.

A ternary layer is stored as its assignment plus two values: either the
paper's two bitmasks (non-zero mask + sign mask) or range-coded with
``constriction`` under an adaptive context model (neighbours in the kernel,
density of the weight's filter and input channel; no model bytes), whichever
is smaller; ECP and other sparse leaves store their non-zero positions the same
way and their values as floats; everything else is stored as is (float16 on
request). The file is versioned (version 2; version-1 files are still read),
has a magic number and a SHA-256 checksum, and restores the same tree with
bitwise-identical arrays. The format is specified in
:mod:`ec2t_jax._src.export.container` (one module per record codec in
:mod:`ec2t_jax._src.export.record_codecs`), the context model in
:mod:`ec2t_jax._src.export.context_coding`.

Python API::

    from ec2t_jax import export
    export.save("model.ec2t", params)            # Linen params, NNX state, npz dict
    params = export.load("model.ec2t")          # the same tree, numpy arrays
    data = export.encode(params); export.decode(data)  # the same, in memory
    export.export_file("ckpt_dir", "model.ec2t")  # orbax checkpoint / .npz -> packed
    export.decode_file("model.ec2t", "model.npz")
    export.export_inference("ckpt.npz", "model.ec2t")  # inference file
    state = export.load_inference("model.ec2t")   # batch norms as scale/shift
    params = export.load_packed("model.ec2t", route="xla")  # ternary kernels packed in memory

Command line::

    python -m ec2t_jax.export IN OUT [--float16] [--bitmask-only] [--keys params]
    python -m ec2t_jax.export --decode IN OUT.npz [--max-bytes 4G]
    python -m ec2t_jax.export --inference IN OUT   # batch norm folded, float16 elsewhere
    python -m ec2t_jax.export --packed FILE [--route xla|pallas|dense]  # packed model, bytes

``--inference`` (:func:`export_inference`) folds each batch norm into a
per-channel scale and shift and stores every non-ternary float leaf as
float16: lossy for those leaves only, bitwise for the ternary ones. Read it
back with :func:`load_inference` (a model-ready tree whose batch norms compute
``scale * x + shift``) or :func:`load_ternary`.

Reading is bounded: ``load``, ``load_ternary``, ``decode_file`` and the CLI
take ``max_bytes`` (default :data:`DEFAULT_MAX_BYTES`, 4 GiB), the largest file
and decoded size they accept, and every declared size is checked against what
the file can hold before anything is allocated; a hostile file is an
:class:`ExportFormatError` (one line, exit status 2 in the CLI).

For NNX, save ``nnx.state(model)`` (or its ``to_pure_dict()``) and put the
loaded dict back with ``nnx.replace_by_pure_dict(state, loaded)`` then
``nnx.update(model, state)``. For inference directly from the assignment see
:func:`load_ternary` and :mod:`ec2t_jax._src.export.inference`.
"""

from ec2t_jax._src.export.budget_bytes import fixed_bytes
from ec2t_jax._src.export.exporting import (ExportResult, decode, decode_file, encode, export_file,
                                     export_inference, load, load_inference, load_ternary,
                                     save)
from ec2t_jax._src.export.inference_export import fold_batch_norm, unfold_batch_norm
from ec2t_jax._src.export.inference import TernaryWeight
from ec2t_jax._src.export.packed_matmul import (Int4Ternary, PackedTernary, TernaryColumns,
                                                decode_then_matmul, pack_int4, pack_pallas,
                                                pallas_ternary_matmul, ternary_columns)
from ec2t_jax._src.export.packed_model import (ROUTES, format_summary, is_packed, load_packed,
                                               pack_params, packed_apply, packed_summary,
                                               resident_bytes)
from ec2t_jax._src.export.container import CODECS, DEFAULT_MAX_BYTES, FORMAT_VERSION, MAGIC, PackedInfo, pack, read_info, unpack
from ec2t_jax._src.export.errors import ExportFormatError
from ec2t_jax._src.export.leaf_parts import FilterTernaryParts, codebook_parts, filter_ternary_parts, ternary_parts
from ec2t_jax._src.export.record_codecs import LeafRecord
from ec2t_jax._src.export.sources import load_tree

__all__ = [
    "CODECS", "DEFAULT_MAX_BYTES", "FORMAT_VERSION", "MAGIC", "ExportFormatError",
    "ExportResult", "FilterTernaryParts", "codebook_parts", "filter_ternary_parts", "LeafRecord", "PackedInfo", "TernaryWeight", "decode", "decode_file", "encode", "export_file",
    "export_inference", "fixed_bytes", "fold_batch_norm", "load", "load_inference", "load_ternary",
    "load_tree", "pack", "read_info", "save", "ternary_parts", "unfold_batch_norm", "unpack",
    # Packed inference (ternary kernels packed in memory, matmuls that read them packed)
    "Int4Ternary", "PackedTernary", "ROUTES", "TernaryColumns", "decode_then_matmul",
    "format_summary", "is_packed", "load_packed", "pack_int4", "pack_pallas", "pack_params", "packed_apply", "packed_summary",
    "pallas_ternary_matmul", "resident_bytes", "ternary_columns",
]
