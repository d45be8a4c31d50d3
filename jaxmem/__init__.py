"""jaxmem: make JAX/Flax models fit and run in less memory.

The top level holds the everyday names: param transforms (pytree -> pytree, composed with
:func:`chain`), the compressed array types, running a Flax model on compressed params,
function transforms (remat, data parallel, the train step), memory accounting and the
checkpoint manager. The rest lives in namespaces:

* :mod:`jaxmem.ops`: array-level quantize/pack and the quantized kernels;
* :mod:`jaxmem.sparsity`: pruning masks, schedules and their optax states;
* :mod:`jaxmem.train`: distillation losses, QAT's Linen hook;
* :mod:`jaxmem.optim`: optax optimizers with 8-/4-bit blockwise states (8-bit AdamW, Lion);
* :mod:`jaxmem.memory`: compiled profiles, the remat planner and policies, bit allocation;
* :mod:`jaxmem.distributed`: processes, meshes, the data-parallel wrapper type;
* :mod:`jaxmem.checkpoint`: checkpoint errors, layouts and the type registry;
* :mod:`jaxmem.testing`: chex-style assertions for users' own transforms.

See README.md for a tour.
"""

from importlib import metadata as _metadata

# --- param transforms and their composition
from jaxmem._src.base import EmptyState as EmptyState
from jaxmem._src.base import MaskedState as MaskedState
from jaxmem._src.base import ParamTransform as ParamTransform
from jaxmem._src.base import PartitionState as PartitionState
from jaxmem._src.base import chain as chain
from jaxmem._src.base import leafwise as leafwise
from jaxmem._src.base import masked as masked
from jaxmem._src.base import partition as partition
from jaxmem._src.base import select as select
from jaxmem._src.base import transform as transform

# --- pytrees of params: compressed leaves and paths
from jaxmem._src.tree import Compressed as Compressed
from jaxmem._src.tree import is_compressed as is_compressed
from jaxmem._src.tree import leaves_with_paths as leaves_with_paths
from jaxmem._src.tree import map_with_path as map_with_path
from jaxmem._src.tree import path_str as path_str

# --- quantization
from jaxmem._src.calibration import InputStats as InputStats
from jaxmem._src.flax.calibration import calibrate_layers as calibrate_layers
from jaxmem._src.flax.calibration import input_hessians as input_hessians
from jaxmem._src.flax.calibration import input_stats as input_stats
from jaxmem._src.gptq import quantize_gptq as quantize_gptq
from jaxmem._src.hqq import quantize_hqq as quantize_hqq
from jaxmem._src.lowbit import quantize_int4 as quantize_int4
from jaxmem._src.qarray import QArray as QArray
from jaxmem._src.qat import QATWeights as QATWeights
from jaxmem._src.qat import qat_weights as qat_weights
from jaxmem._src.quantize import dequantize_params as dequantize_params
from jaxmem._src.quantize import quantize_dynamic_int8 as quantize_dynamic_int8
from jaxmem._src.quantize import quantize_int8 as quantize_int8
from jaxmem._src.quantize import quantize_weights as quantize_weights
from jaxmem._src.quantize import set_act_bits as set_act_bits
from jaxmem._src.smooth import InputScale as InputScale
from jaxmem._src.smooth import fold_input_scales as fold_input_scales

# --- pruning and sparse storage
from jaxmem._src.gradual import gradual_prune as gradual_prune
from jaxmem._src.gradual import keep_masks as keep_masks
from jaxmem._src.pruning import magnitude_prune as magnitude_prune
from jaxmem._src.pruning import nm_prune as nm_prune
from jaxmem._src.pruning import sparsify as sparsify
from jaxmem._src.sparsegpt import prune_sparsegpt as prune_sparsegpt
from jaxmem._src.wanda import prune_wanda as prune_wanda
from jaxmem._src.sparse import SparseArray as SparseArray

# --- running models on compressed params, and sharding them
from jaxmem._src.flax.apply import apply as apply
from jaxmem._src.flax.apply import merge_compressed as merge_compressed
from jaxmem._src.sharding import partition_specs as partition_specs

# --- function transforms and training
from jaxmem._src.fsdp import fsdp_specs as fsdp_specs
from jaxmem._src.fsdp import fsdp_state_specs as fsdp_state_specs
from jaxmem._src.fsdp import fsdp_train_step as fsdp_train_step
from jaxmem._src.lora import LoRAWeight as LoRAWeight
from jaxmem._src.optim import BlockQArray as BlockQArray
from jaxmem._src.lora import add_lora as add_lora
from jaxmem._src.lora import lora_trainable as lora_trainable
from jaxmem._src.lora import merge_lora as merge_lora
from jaxmem._src.parallel import data_parallel as data_parallel
from jaxmem._src.remat import remat as remat
from jaxmem._src.remat import scan_layers as scan_layers
from jaxmem._src.train import StepState as StepState
from jaxmem._src.train import init_step_state as init_step_state
from jaxmem._src.train import train_step as train_step

# --- memory accounting and checkpoints
from jaxmem._src.checkpoint import CheckpointManager as CheckpointManager
from jaxmem._src.memory import MemoryReport as MemoryReport
from jaxmem._src.memory import memory_report as memory_report
from jaxmem._src.memory import tree_bytes as tree_bytes

# --- namespaces
from jaxmem import checkpoint as checkpoint  # noqa: I001  (after the names they re-export)
from jaxmem import distributed as distributed
from jaxmem import memory as memory
from jaxmem import ops as ops
from jaxmem import optim as optim
from jaxmem import sparsity as sparsity
from jaxmem import testing as testing
from jaxmem import train as train

# The number lives in pyproject.toml only; installed metadata carries it here.
__version__ = _metadata.version("jaxmem")

__all__ = [
    # param transforms
    "ParamTransform", "EmptyState", "MaskedState", "PartitionState", "chain", "leafwise",
    "masked", "partition", "select", "transform",
    # pytrees of params
    "Compressed", "is_compressed", "leaves_with_paths", "map_with_path", "path_str",
    # quantization
    "QArray", "QATWeights", "dequantize_params", "input_hessians", "qat_weights",
    # calibration
    "InputScale", "InputStats", "calibrate_layers", "fold_input_scales", "input_stats",
    "quantize_dynamic_int8", "quantize_gptq", "quantize_hqq", "quantize_int4", "quantize_int8",
    "quantize_weights", "set_act_bits",
    # pruning and sparse storage
    "SparseArray", "gradual_prune", "keep_masks", "magnitude_prune", "nm_prune",
    "prune_sparsegpt", "prune_wanda", "sparsify",
    # running and sharding
    "apply", "merge_compressed", "partition_specs",
    # function transforms and training
    "StepState", "data_parallel", "init_step_state", "remat", "scan_layers", "train_step",
    "fsdp_specs", "fsdp_state_specs", "fsdp_train_step", "BlockQArray",
    # adapters
    "LoRAWeight", "add_lora", "lora_trainable", "merge_lora",
    # memory and checkpoints
    "CheckpointManager", "MemoryReport", "memory_report", "tree_bytes",
    # namespaces
    "checkpoint", "distributed", "memory", "ops", "optim", "sparsity", "testing", "train",
]
