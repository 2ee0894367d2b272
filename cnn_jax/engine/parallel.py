"""Data parallelism with `jax.sharding`: one mesh axis over every device, params replicated.

When more than one device is visible (several GPUs, several hosts, or CPU devices forced with
`XLA_FLAGS=--xla_force_host_platform_device_count=4`), training splits each batch across a
1-D mesh named "data": the dataset and the train state are replicated, the batch the
step gathers is constrained to be sharded along its first axis, and XLA's SPMD partitioner
inserts the gradient all-reduce. The arithmetic is the one-device step's, so a run matches
the one-device run to float tolerance (only the order of the batch sums differs).

Multi-host: every process calls `initialize(config)` before touching JAX (it runs
`jax.distributed.initialize` when `config.coordinator_address` is set), loads the same
dataset, and then sees all processes' devices in one mesh.

    dp = parallel.data_parallel(config)          # a no-op on one device
    train_step = dp.wrap_step(train_step)
    state, images = dp.replicate((state, images))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cnn_jax.config import Config, ConfigError

AXIS = "data"


def initialize(config: Config) -> bool:
    """Join a multi-host run (`jax.distributed.initialize`) when `--coordinator_address` is set.

    Must run before any other JAX call in the process. Returns whether it initialised.
    On CPU the cross-process collectives are JAX's default (gloo).
    """
    if not config.coordinator_address:
        return False
    jax.distributed.initialize(coordinator_address=config.coordinator_address,
                               num_processes=config.num_processes, process_id=config.process_id)
    return True


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """Where training puts its arrays; `mesh` is None on one device (every method is then a no-op)."""

    mesh: Mesh | None = None

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    def replicate(self, tree: Any) -> Any:
        """Put every leaf (numpy or jax) on all devices of the mesh, whole."""
        if self.mesh is None:
            return jax.tree.map(jax.numpy.asarray, tree)
        sharding = NamedSharding(self.mesh, PartitionSpec())

        def put(x: Any) -> jax.Array:
            if isinstance(x, jax.Array) and x.sharding == sharding:
                return x
            host = np.asarray(x)
            # Works across processes too: each process supplies its own devices' copies.
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

        return jax.tree.map(put, tree)

    def shard_batch(self, x: jax.Array) -> jax.Array:
        """Inside jit: constrain x to be split along its first (batch) axis over the mesh."""
        if self.mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, PartitionSpec(AXIS)))

    def wrap_step(self, train_step: Callable) -> Callable:
        """The same step with its batch split over the mesh and its new state replicated."""
        if self.mesh is None:
            return train_step
        replicated = NamedSharding(self.mesh, PartitionSpec())

        def step(state, batch):
            state, metrics = train_step(state, jax.tree.map(self.shard_batch, batch))
            return jax.lax.with_sharding_constraint((state, metrics), replicated)

        return step

    def describe(self) -> str:
        """For the start-up log line: how many devices and processes share each batch."""
        if self.mesh is None:
            return "1 device"
        return (f"data parallel over {self.mesh.size} {jax.default_backend()} devices "
                f"({jax.process_count()} process{'es' if jax.process_count() > 1 else ''})")


def data_parallel(config: Config, devices: list | None = None) -> DataParallel:
    """A mesh over all devices (`devices` defaults to `jax.devices()`), or none for one device.

    The global batch must split evenly over the devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) == 1:
        return DataParallel()
    if config.batch_size % len(devices):
        raise ConfigError(f"--batch_size={config.batch_size} does not split evenly over the "
                          f"{len(devices)} devices; use a multiple of {len(devices)}")
    return DataParallel(Mesh(np.array(devices), (AXIS,)))
