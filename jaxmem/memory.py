"""Memory tools: compiled profiles, the remat and training planners, remat policies, bit allocation.

The everyday accounting (:func:`jaxmem.tree_bytes`, :func:`jaxmem.memory_report`) is at the
top level.
"""

from jaxmem._src.mixed import allocate_bits, leaf_sensitivity, mix_leaves
from jaxmem._src.planner import (
    Candidate,
    MemoryPlan,
    jaxpr_flops,
    memory_candidates,
    plan_memory,
)
from jaxmem._src.profile import MemoryProfile, compiled_profile, memory_profile
from jaxmem._src.remat import (
    REMAT_OFFLOAD_POLICIES,
    REMAT_POLICIES,
    checkpoint_name,
    offload_supported,
    remat_policy,
)
from jaxmem._src.train_plan import plan_training

__all__ = [
    "REMAT_OFFLOAD_POLICIES",
    "REMAT_POLICIES",
    "Candidate",
    "MemoryPlan",
    "MemoryProfile",
    "allocate_bits",
    "checkpoint_name",
    "compiled_profile",
    "jaxpr_flops",
    "leaf_sensitivity",
    "memory_candidates",
    "memory_profile",
    "mix_leaves",
    "offload_supported",
    "plan_memory",
    "plan_training",
    "remat_policy",
]
