"""Multi-host entry point: ``jax.distributed.initialize`` with explicit or detected arguments."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax


class ProcessInfo(NamedTuple):
  """Where this process sits after :func:`initialize`.

  Attributes:
    process_index: this process, ``0 <= process_index < process_count``.
    process_count: processes in the job.
    local_device_count: devices this process drives.
    device_count: devices over all processes.
  """

  process_index: int
  process_count: int
  local_device_count: int
  device_count: int


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: int | Sequence[int] | None = None,
    cpu_collectives: str | None = "gloo",
    initialization_timeout: int = 300,
) -> ProcessInfo:
  """Joins this process to a multi-process JAX job and returns its :class:`ProcessInfo`.

  Call it once per process, before any other JAX call. Either pass all three of
  ``coordinator_address`` (``"host:port"`` of process 0), ``num_processes`` and
  ``process_id``, or none of them: on TPU pods, Slurm and other clusters JAX detects
  them from the environment. After it, :func:`jaxmem.data_parallel` spans every
  process's devices; each process passes its own share of the batch.

  Args:
    coordinator_address: ``"host:port"`` that process 0 listens on.
    num_processes: processes in the job.
    process_id: this process's index.
    local_device_ids: restricts the devices this process uses.
    cpu_collectives: on the CPU backend, the cross-process collectives library
      (``"gloo"``; None leaves JAX's setting as is).
    initialization_timeout: seconds to wait for all processes to join.

  Raises:
    ValueError: only some of the three explicit arguments were given.

  Example (two terminals; the same script with ``process_id`` 0 and 1)::

    info = jaxmem.distributed.initialize("localhost:12355", num_processes=2, process_id=0)
    dp = jaxmem.data_parallel(step)   # spans both processes' devices
  """
  explicit = (coordinator_address, num_processes, process_id)
  given = [x is not None for x in explicit]
  if any(given) and not all(given):
    names = ("coordinator_address", "num_processes", "process_id")
    missing = [n for n, g in zip(names, given) if not g]
    raise ValueError(
        f"initialize: {missing} missing; pass all of coordinator_address, num_processes and "
        "process_id, or none of them (auto-detection on TPU / Slurm)."
    )
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(
        f"initialize: process_id={process_id} is outside [0, num_processes={num_processes})."
    )
  if cpu_collectives is not None:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      local_device_ids=local_device_ids,
      initialization_timeout=initialization_timeout,
  )
  return ProcessInfo(
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      local_device_count=jax.local_device_count(),
      device_count=jax.device_count(),
  )


def shutdown() -> None:
  """Leaves the multi-process job (``jax.distributed.shutdown``)."""
  jax.distributed.shutdown()
