"""The device mesh, the state's shardings, and the one seam where host batches become device arrays.

The batch is always sharded along the mesh's `data` axis. The train state (parameters,
optimizer moments, EMA) is either replicated on every device (`replicated`: data parallel) or
sharded along the same axis (`fsdp`, ZeRO-3 style): each large array is split on its largest
dimension that the device count divides, small ones stay replicated, and XLA inserts the
all-gathers and reduce-scatters the step needs. Axis types are Auto, because linen dropout fails
inside a jitted step under the Explicit axes that `jax.make_mesh` defaults to.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
PARAM_SHARDINGS = ("replicated", "fsdp")
# Arrays smaller than this (elements) stay replicated under fsdp: splitting them saves little
# memory and costs a collective each.
FSDP_MIN_SIZE = 2**14


def make_mesh(devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def leaf_spec(shape: tuple[int, ...], devices: int, min_size: int | None = None) -> P:
    """fsdp's PartitionSpec of one array: `data` on its largest dimension that `devices`
    divides (the last such of equal ones), or replicated when it is small (below `min_size`,
    default FSDP_MIN_SIZE) or none divides."""
    min_size = FSDP_MIN_SIZE if min_size is None else min_size
    if devices <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    candidates = [(size, axis) for axis, size in enumerate(shape) if size % devices == 0]
    if not candidates:
        return P()
    _, axis = max(candidates)
    return P(*([None] * axis + [DATA_AXIS]))


def state_shardings(abstract_state, mesh: Mesh, mode: str = "replicated", min_size: int | None = None):
    """A NamedSharding for every leaf of `abstract_state` (arrays or ShapeDtypeStructs) under
    `mode` ('replicated' or 'fsdp'). Keys, counters and scalars are always replicated."""
    if mode not in PARAM_SHARDINGS:
        raise ValueError(f"param sharding must be one of {PARAM_SHARDINGS}, got {mode!r}")
    devices = mesh.devices.size

    def one(leaf):
        if mode == "replicated" or not jnp.issubdtype(leaf.dtype, jnp.floating):
            return replicated(mesh)
        return NamedSharding(mesh, leaf_spec(tuple(leaf.shape), devices, min_size))

    return jax.tree.map(one, abstract_state)


def bytes_per_device(tree) -> int:
    """The bytes of `tree`'s arrays held by the most loaded device (placed arrays or
    ShapeDtypeStructs with shardings)."""
    per_device: dict = {}
    for leaf in jax.tree.leaves(tree):
        sharding = leaf.sharding
        shard = sharding.shard_shape(tuple(leaf.shape))
        nbytes = int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
        for device in sharding.device_set:
            per_device[device] = per_device.get(device, 0) + nbytes
    return max(per_device.values(), default=0)


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
