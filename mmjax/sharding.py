"""The device mesh and the one seam where host batches become device arrays.

Data parallel: the batch is sharded along the mesh's `data` axis, parameters and optimizer
state are replicated. Axis types are Auto, because linen dropout fails inside a jitted step
under the Explicit axes that `jax.make_mesh` defaults to.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_divisible(global_batch: int, mesh: Mesh, *, per_device_multiple: int = 1) -> None:
    """Raises before anything compiles when the batch cannot be split evenly."""
    devices = mesh.devices.size
    if global_batch % (devices * per_device_multiple):
        extra = f" x grad_accum {per_device_multiple}" if per_device_multiple > 1 else ""
        raise ValueError(
            f"global batch size {global_batch} is not divisible by the {devices} devices{extra} "
            f"of the mesh; choose a multiple of {devices * per_device_multiple} "
            f"(e.g. --config.train.batch_size={max(1, global_batch // (devices * per_device_multiple)) * devices * per_device_multiple})"
        )
    if global_batch % jax.process_count():
        raise ValueError(
            f"global batch size {global_batch} is not divisible by the {jax.process_count()} processes"
        )


def to_device(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local batch -> global arrays sharded on `data` (works on one or many processes)."""
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in local_batch.items()
    }
