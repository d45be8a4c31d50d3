"""Several processes and devices: process setup, meshes and the data-parallel wrapper type.

:func:`jaxmem.data_parallel` (top level) builds a :class:`DataParallel`;
:func:`jaxmem.fsdp_train_step` an :class:`FSDPTrainStep`.
"""

from jaxmem._src.distributed import ProcessInfo, initialize, shutdown
from jaxmem._src.fsdp import FSDPTrainStep
from jaxmem._src.parallel import DataParallel, mesh_from_axes

__all__ = [
    "DataParallel", "FSDPTrainStep", "ProcessInfo", "initialize", "mesh_from_axes", "shutdown",
]
