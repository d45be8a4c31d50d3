"""jaxmem: make JAX/Flax models fit and run in less memory.

Param transforms (pytree -> pytree, composable with :func:`chain`), function
transforms (fn -> fn), the quantized array type, memory accounting and
checkpointing. See README.md for a tour.
"""

from importlib import metadata as _metadata

from jaxmem._src.base import Compressed as Compressed
from jaxmem._src.base import EmptyState as EmptyState
from jaxmem._src.base import MaskedState as MaskedState
from jaxmem._src.base import PartitionState as PartitionState
from jaxmem._src.base import ParamTransform as ParamTransform
from jaxmem._src.base import chain as chain
from jaxmem._src.base import is_compressed as is_compressed
from jaxmem._src.base import leafwise as leafwise
from jaxmem._src.base import leaves_with_paths as leaves_with_paths
from jaxmem._src.base import map_with_path as map_with_path
from jaxmem._src.base import masked as masked
from jaxmem._src.base import partition as partition
from jaxmem._src.base import select as select
from jaxmem._src.base import transform as transform
from jaxmem._src.memory import MemoryReport as MemoryReport
from jaxmem._src.memory import memory_report as memory_report
from jaxmem._src.memory import tree_bytes as tree_bytes
from jaxmem._src.qarray import QArray as QArray
from jaxmem._src.qarray import dequantize as dequantize
from jaxmem._src.qarray import pack as pack
from jaxmem._src.qarray import quantize as quantize
from jaxmem._src.qarray import unpack as unpack
from jaxmem._src.quantize import dequantize_params as dequantize_params
from jaxmem._src.quantize import quantize_dynamic_int8 as quantize_dynamic_int8
from jaxmem._src.quantize import quantize_int8 as quantize_int8
from jaxmem._src.quantize import quantize_weights as quantize_weights
from jaxmem._src.quantize import set_act_bits as set_act_bits
from jaxmem._src.sharding import partition_specs as partition_specs

# --- execution (issue 2): apply / quantized layers
from jaxmem._src.execution import apply as apply
from jaxmem._src.execution import merge_compressed as merge_compressed
from jaxmem._src.qdot import int8_dot_route as int8_dot_route
from jaxmem._src.qdot import quantize_activations as quantize_activations
from jaxmem._src.qdot import quantized_conv as quantized_conv
from jaxmem._src.qdot import quantized_dot_general as quantized_dot_general
from jaxmem._src.qdot import quantized_einsum as quantized_einsum
from jaxmem._src.qdot import quantized_take as quantized_take
# --- pruning and sparse storage (issue 4)
from jaxmem._src.gradual import GradualPruneState as GradualPruneState
from jaxmem._src.gradual import KeepMasksState as KeepMasksState
from jaxmem._src.gradual import gradual_prune as gradual_prune
from jaxmem._src.gradual import keep_masks as keep_masks
from jaxmem._src.gradual import mask_sparsity as mask_sparsity
from jaxmem._src.gradual import sparsity_schedule as sparsity_schedule
from jaxmem._src.pruning import apply_masks as apply_masks
from jaxmem._src.pruning import magnitude_mask as magnitude_mask
from jaxmem._src.pruning import magnitude_masks as magnitude_masks
from jaxmem._src.pruning import magnitude_prune as magnitude_prune
from jaxmem._src.pruning import nm_mask as nm_mask
from jaxmem._src.pruning import nm_masks as nm_masks
from jaxmem._src.pruning import nm_prune as nm_prune
from jaxmem._src.pruning import sparsify as sparsify
from jaxmem._src.pruning import tree_sparsity as tree_sparsity
from jaxmem._src.sparse import SparseArray as SparseArray
from jaxmem._src.sparse import sparse_pack as sparse_pack
from jaxmem._src.sparse import sparse_unpack as sparse_unpack
# --- function transforms: remat, data parallel, memory profile, planner (issue 5)
from jaxmem._src.remat import REMAT_OFFLOAD_POLICIES as REMAT_OFFLOAD_POLICIES
from jaxmem._src.remat import REMAT_POLICIES as REMAT_POLICIES
from jaxmem._src.remat import checkpoint_name as checkpoint_name
from jaxmem._src.remat import offload_supported as offload_supported
from jaxmem._src.remat import remat as remat
from jaxmem._src.remat import remat_policy as remat_policy
from jaxmem._src.remat import scan_layers as scan_layers
from jaxmem._src.profile import MemoryProfile as MemoryProfile
from jaxmem._src.profile import compiled_profile as compiled_profile
from jaxmem._src.profile import memory_profile as memory_profile
from jaxmem._src.parallel import DataParallel as DataParallel
from jaxmem._src.parallel import TrainState as TrainState
from jaxmem._src.parallel import data_parallel as data_parallel
from jaxmem._src.parallel import init_train_state as init_train_state
from jaxmem._src.parallel import mesh_from_axes as mesh_from_axes
from jaxmem._src.parallel import train_step as train_step
from jaxmem._src.distributed import ProcessInfo as ProcessInfo
from jaxmem._src.distributed import initialize as initialize
from jaxmem._src.distributed import shutdown as shutdown
from jaxmem._src.planner import Candidate as Candidate
from jaxmem._src.planner import MemoryPlan as MemoryPlan
from jaxmem._src.planner import jaxpr_flops as jaxpr_flops
from jaxmem._src.planner import memory_candidates as memory_candidates
from jaxmem._src.planner import plan_memory as plan_memory
# --- real model: smoothing / calibration (issue 3)
# --- low-bit, QAT, distillation (issue 7)
from jaxmem._src.distill import DistillState as DistillState
from jaxmem._src.distill import distill_init as distill_init
from jaxmem._src.distill import distill_train_step as distill_train_step
from jaxmem._src.distill import feature_distill_loss as feature_distill_loss
from jaxmem._src.distill import kd_loss as kd_loss
from jaxmem._src.gptq import gptq_kernel as gptq_kernel
from jaxmem._src.gptq import input_hessians as input_hessians
from jaxmem._src.gptq import quantize_gptq as quantize_gptq
from jaxmem._src.lowbit import quantize_grouped as quantize_grouped
from jaxmem._src.lowbit import quantize_int4 as quantize_int4
from jaxmem._src.mixed import leaf_sensitivity as leaf_sensitivity
from jaxmem._src.mixed import mix_leaves as mix_leaves
from jaxmem._src.mixed import mixed_precision as mixed_precision
from jaxmem._src.qat import QATWeights as QATWeights
from jaxmem._src.qat import fake_quant_activations as fake_quant_activations
from jaxmem._src.qat import fake_quantize as fake_quantize
from jaxmem._src.qat import fake_quantize_activations as fake_quantize_activations
from jaxmem._src.qat import qat_weights as qat_weights
# --- checkpointing (issue 6)
from jaxmem._src.checkpoint import CheckpointCorruptError as CheckpointCorruptError
from jaxmem._src.checkpoint import CheckpointFallbackWarning as CheckpointFallbackWarning
from jaxmem._src.checkpoint import CheckpointLockedError as CheckpointLockedError
from jaxmem._src.checkpoint import CheckpointManager as CheckpointManager
from jaxmem._src.checkpoint import abstract_target as abstract_target
from jaxmem._src.checkpoint import checkpoint_layout as checkpoint_layout
from jaxmem._src.checkpoint import register_checkpoint_type as register_checkpoint_type

# The number lives in pyproject.toml only; installed metadata carries it here.
__version__ = _metadata.version("jaxmem")

from jaxmem import testing as testing  # noqa: E402  (chex assertions for users' tests)
