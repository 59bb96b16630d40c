"""The group axis of one per-group model over several devices and processes (``jax.sharding``).

The per-group likelihood is a sum over groups of small per-group pieces
(:mod:`mixedjax.likelihood`), so with the group axis of the cross-products laid over a
1-D :class:`jax.sharding.Mesh` (axis ``groups``, :class:`~jax.sharding.NamedSharding`)
``jit`` computes every group's pieces where its cross-products live and turns the sums
over groups into one all-reduce; the optimiser's θ, β̂ and σ̂² come out replicated.  Nothing
else changes: the same jitted fit runs on one device or many.

* :func:`shard_grouped`: a per-group model's data (cross-products, and padded rows when
  the model has them) over the devices of one process (``model.shard()``).
* :func:`global_cross_products`: several processes started with
  ``jax.distributed.initialize`` each bring the cross-products of the rows they hold; the
  per-process arrays are summed and scattered over the group axis of a mesh spanning every
  process's devices (one reduce-scatter), so each process keeps its share of the groups.
* :func:`allgather_objects`: small host objects (factor levels, group ids) from every
  process, so that every process codes its rows alike.

Examples
--------
>>> import numpy as np
>>> from mixedjax.crossprod import group_gram
>>> _, packed = group_gram(np.array([0, 1, 1]), np.column_stack([np.ones(3), np.ones(3), [1.0, 2.0, 3.0]]),
...                        n_groups=2)
>>> cp = cross_products(packed, p=2, z_index=(0,), g_pad=4)
>>> cp.n.tolist(), float(cp.nobs), float(cp.ngroups)
([1.0, 2.0, 0.0, 0.0], 3.0, 2.0)
"""

from __future__ import annotations

import functools
import pickle
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .crossprod import unpack
from .data import CrossProducts

GROUP_AXIS = "groups"


def group_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh named ``groups`` over ``devices`` (default every device of every process, ``jax.devices()``)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.array(devices), (GROUP_AXIS,))


def padded_groups(g_pad: int, mesh: Mesh | None) -> int:
    """``g_pad`` rounded up to a multiple of the mesh's device count (empty groups add nothing to the sums)."""
    k = 1 if mesh is None else int(mesh.devices.size)
    return -(-int(g_pad) // k) * k


def _pad_axis0(a: Any, g: int) -> Any:
    a = jnp.asarray(a)
    extra = g - a.shape[0]
    return a if extra == 0 else jnp.concatenate([a, jnp.zeros((extra,) + a.shape[1:], a.dtype)])


@functools.partial(jax.jit, static_argnames=("p", "z_index"))
def _cross_products(packed: jax.Array, p: int, z_index: tuple[int, ...]) -> CrossProducts:
    s = unpack(packed, p, z_index, xp=jnp)
    return CrossProducts(s.ztz, s.ztx, s.zty, s.xtx, s.xty, s.yty, s.n, jnp.sum(s.logw), jnp.sum(s.n),
                         jnp.sum(s.n > 0))  # the dtypes of mixedjax.data.cross_products


def cross_products(packed: Any, p: int, z_index: tuple[int, ...], g_pad: int,
                   mesh: Mesh | None = None) -> CrossProducts:
    """:class:`mixedjax.data.CrossProducts` on devices from packed per-group rows (:mod:`mixedjax.crossprod`).

    ``packed (G, K)`` (numpy, or a global JAX array from :func:`global_cross_products`'s sum; ``p`` columns
    of X, ``z_index`` the columns of Z: :func:`mixedjax.crossprod.unpack`)
    is padded with empty groups to ``g_pad`` rows (to a multiple of the device count with a
    ``mesh``, whose ``groups`` axis then holds the group axis).
    """
    g = padded_groups(g_pad, mesh)
    if isinstance(packed, jax.Array) and not packed.is_fully_addressable:
        if packed.shape[0] != g:
            raise ValueError(f"the global packed cross-products have {packed.shape[0]} groups; expected {g}")
        return _cross_products(packed, p, tuple(z_index))
    packed = _pad_axis0(np.asarray(packed, dtype=float), g)
    if mesh is not None:
        packed = jax.device_put(packed, NamedSharding(mesh, PartitionSpec(GROUP_AXIS)))
    return _cross_products(packed, p, tuple(z_index))


def shard_grouped(data: Any, mesh: Mesh | None = None) -> Any:
    """A per-group model's data (:class:`mixedjax.backends.GroupedModelData`) with its group axis over ``mesh``.

    Every array with a leading group axis (the cross-products, ``zmask``, the padded rows
    and residual strata when present) is padded with empty groups to a multiple of the
    device count and sharded over the ``groups`` axis; row indices and the scalars are
    replicated.  Fits on the result equal fits on one device (the sums over groups are
    reordered, nothing else).
    """
    mesh = group_mesh(jax.local_devices()) if mesh is None else mesh
    g = padded_groups(data.zmask.shape[0], mesh)
    split = NamedSharding(mesh, PartitionSpec(GROUP_AXIS))
    repl = NamedSharding(mesh, PartitionSpec())

    def lay(a: Any, by_group: bool) -> Any:
        if a is None:
            return None
        return jax.device_put(_pad_axis0(a, g), split) if by_group else jax.device_put(jnp.asarray(a), repl)

    cp = data.cp
    cp = CrossProducts(*(lay(a, np.ndim(a) > 0) for a in cp))
    padded = data.padded
    if padded is not None:
        padded = padded._replace(**{f: lay(getattr(padded, f), True) for f in padded._fields})
    return data._replace(cp=cp, zmask=lay(data.zmask, True), padded=padded,
                         strata=lay(data.strata, True), codes=lay(data.codes, False),
                         position=lay(data.position, False),
                         vc_group=tuple(lay(v, False) for v in data.vc_group),
                         vc_col=tuple(lay(v, False) for v in data.vc_col))


def global_array(a: Any, mesh: Mesh, by_group: bool) -> jax.Array:
    """The same host array on every process as one global array: split over the ``groups`` axis, or replicated."""
    a = np.asarray(a)
    spec = PartitionSpec(GROUP_AXIS) if by_group else PartitionSpec()
    return jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda idx: a[idx])


def allgather_objects(obj: Any) -> list:
    """``obj`` of every process, in process order (pickled bytes through ``process_allgather``).

    With one process: ``[obj]``.  Used for the small results of the first pass (levels,
    group ids), so that every process builds the same designs and group order.
    """
    if jax.process_count() == 1:
        return [obj]
    raw = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([raw.size], dtype=np.int64))).reshape(-1)
    buf = np.zeros(int(sizes.max()), dtype=np.uint8)
    buf[: raw.size] = raw
    every = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    return [pickle.loads(every[i, : sizes[i]].tobytes()) for i in range(len(sizes))]


def global_cross_products(local_packed: np.ndarray, g_pad: int, mesh: Mesh | None = None) -> jax.Array:
    """The sum over processes of each process's packed per-group rows, its group axis over ``mesh``.

    ``local_packed (G, K)``: this process's cross-products of the rows it holds, for every
    group (zeros for groups it has no rows of).  Every process passes the same ``G`` and
    group order (:func:`allgather_objects` of the levels first).  The sum is one
    reduce-scatter: each device ends up holding its share of the groups.  ``mesh``:
    default every device of every process.
    """
    mesh = group_mesh() if mesh is None else mesh
    g = padded_groups(g_pad, mesh)
    n_dev = int(mesh.devices.size)
    local = np.asarray(local_packed, dtype=float)
    local = np.concatenate([local, np.zeros((g - local.shape[0], local.shape[1]))])
    mine = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    blocks = np.zeros((len(mine), g, local.shape[1]))
    if mine:
        blocks[0] = local  # one device of each process carries the process's sums, the others zeros
    stacked = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec(GROUP_AXIS)), blocks,
                                                     (n_dev, g, local.shape[1]))
    total = jax.jit(lambda a: jnp.sum(a, axis=0),
                    out_shardings=NamedSharding(mesh, PartitionSpec(GROUP_AXIS)))(stacked)
    return total


def gather_rows(a: jax.Array) -> np.ndarray:
    """Every process's rows of a group-sharded array, on the host of each process (``process_allgather``)."""
    if a.is_fully_addressable:
        return np.asarray(a)
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


__all__ = ["GROUP_AXIS", "allgather_objects", "cross_products", "gather_rows", "global_array",
           "global_cross_products", "group_mesh", "padded_groups", "shard_grouped"]
