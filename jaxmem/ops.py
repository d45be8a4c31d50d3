"""Array-level operations: quantize one array, pack sub-byte integers, the quantized kernels.

The param transforms in :mod:`jaxmem` run these over whole pytrees; call them directly to
build your own layer or transform.
"""

from jaxmem._src.calibration import row_stats
from jaxmem._src.gptq import gptq_kernel
from jaxmem._src.hqq import hqq_quantize
from jaxmem._src.native import native_kernels
from jaxmem._src.pruning import magnitude_mask, nm_mask
from jaxmem._src.qarray import (
    dequantize,
    hadamard,
    hadamard_matrix,
    pack_ints,
    quantize,
    unpack_ints,
)
from jaxmem._src.qat import fake_quantize, fake_quantize_activations
from jaxmem._src.qdot import (
    KernelInfo,
    int8_dot_route,
    kernel_info,
    quantize_activations,
    quantized_conv,
    quantized_dot_general,
    quantized_einsum,
    quantized_take,
)
from jaxmem._src.smooth import awq_scales, smoothquant_scales
from jaxmem._src.sparse import sparse_pack, sparse_unpack
from jaxmem._src.sparsegpt import sparsegpt_kernel
from jaxmem._src.wanda import wanda_mask

__all__ = [
    "KernelInfo",
    "awq_scales",
    "dequantize",
    "fake_quantize",
    "fake_quantize_activations",
    "gptq_kernel",
    "hadamard",
    "hadamard_matrix",
    "hqq_quantize",
    "int8_dot_route",
    "kernel_info",
    "magnitude_mask",
    "native_kernels",
    "nm_mask",
    "pack_ints",
    "quantize",
    "quantize_activations",
    "quantized_conv",
    "quantized_dot_general",
    "quantized_einsum",
    "quantized_take",
    "row_stats",
    "smoothquant_scales",
    "sparse_pack",
    "sparsegpt_kernel",
    "sparse_unpack",
    "unpack_ints",
    "wanda_mask",
]
