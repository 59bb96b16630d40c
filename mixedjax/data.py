"""Padded per-group blocks and per-group cross-products (the data side of the likelihood).

Rows are sorted by group and laid into ``(G, n_max, ·)`` arrays with a row mask.
Prior weights are applied by whitening (row i scaled by ``sqrt(w_i)``), so the
likelihood only ever sees cross-products of whitened blocks; the Jacobian of the
whitening enters the log-likelihood through ``sum_logw``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import Array

from .export_cache import cached_jit


class GroupedData(NamedTuple):
    """Rows padded per group.  ``mask`` is 1 on real rows, 0 on padding.

    Attributes
    ----------
    y : (G, n_max)
    x : (G, n_max, p)
    z : (G, n_max, q)
    w : (G, n_max)  prior weights (0 on padding)
    mask : (G, n_max)
    """

    y: Array
    x: Array
    z: Array
    w: Array
    mask: Array


class CrossProducts(NamedTuple):
    """Per-group cross-products of the whitened blocks; all the likelihood needs.

    ``ztz (G, q, q)``, ``ztx (G, q, p)``, ``zty (G, q)``, ``xtx (G, p, p)``,
    ``xty (G, p)``, ``yty (G,)``, ``n (G,)`` rows per group, ``sum_logw`` (),
    ``nobs`` () and ``ngroups`` () real (non-padding) groups.
    """

    ztz: Array
    ztx: Array
    zty: Array
    xtx: Array
    xty: Array
    yty: Array
    n: Array
    sum_logw: Array
    nobs: Array
    ngroups: Array


ROW_DOT_MIN = 32
"""Padded group length above which :func:`cross_products` forms each group's products as a matrix product:
XLA's CPU batched dot of 1M groups of 10 rows is ~15x slower than a broadcast product summed over the rows,
of 1,000 groups of 10,000 rows ~1.5x faster."""


def cross_products(data: GroupedData) -> CrossProducts:
    """Cross-products of the whitened padded blocks (pure JAX, differentiable in the data).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> d = GroupedData(y=jnp.ones((2, 3)), x=jnp.ones((2, 3, 1)), z=jnp.ones((2, 3, 1)),
    ...                 w=jnp.ones((2, 3)), mask=jnp.ones((2, 3)))
    >>> cross_products(d).xtx.shape
    (2, 1, 1)
    """
    sw = jnp.sqrt(jnp.where(data.mask > 0, data.w, 0.0))
    y = data.y * sw
    x = data.x * sw[..., None]
    z = data.z * sw[..., None]
    n = jnp.sum(data.mask, axis=1)
    logw = jnp.where(data.mask > 0, jnp.log(jnp.where(data.mask > 0, data.w, 1.0)), 0.0)
    if y.shape[-1] <= ROW_DOT_MIN:  # short groups: broadcast products summed over rows (a dot per group is slower)
        def gram(a, b):
            return jnp.sum(a[..., :, None] * b[..., None, :], axis=-3)
    else:
        def gram(a, b):
            return jnp.einsum("...ni,...nj->...ij", a, b)
    return CrossProducts(
        ztz=gram(z, z),
        ztx=gram(z, x),
        zty=gram(z, y[..., None])[..., 0],
        xtx=gram(x, x),
        xty=gram(x, y[..., None])[..., 0],
        yty=jnp.sum(y * y, axis=-1),
        n=n,
        sum_logw=jnp.sum(logw),
        nobs=jnp.sum(n),
        ngroups=jnp.sum(n > 0),
    )


cross_products_jit = cached_jit(cross_products)  # kept between processes (mixedjax.export_cache)


def bucket(n: int) -> int:
    """Round ``n`` up to ``m * 2**k`` with ``8 <= m < 16`` (at most 12.5% padding), so shapes repeat."""
    if n <= 8:
        return max(n, 1)
    k = int(np.floor(np.log2(n))) - 3
    m = -(-n // 2**k)
    return int(m * 2**k)


class GroupIndex(NamedTuple):
    """Host-side layout of rows into padded groups."""

    labels: list          # group labels, in group order
    codes: np.ndarray     # (nobs,) group index of each row
    order: np.ndarray     # (nobs,) row order sorted by group (stable)
    sizes: np.ndarray     # (G,)
    position: np.ndarray  # (nobs,) position of each row within its group, in original row order
    n_max: int


def group_index(groups: np.ndarray | object, labels: list | None = None) -> GroupIndex:
    """Codes, sort order and sizes of a grouping vector.

    Group order is the categorical order for a pandas Categorical (unused
    categories dropped), else sorted order of the labels.
    """
    import pandas as pd

    s = pd.Series(groups)
    if isinstance(s.dtype, pd.CategoricalDtype):
        s = s.cat.remove_unused_categories()
        codes = s.cat.codes.to_numpy()
        labels = list(s.cat.categories)
    else:
        codes, uniq = pd.factorize(s, sort=True)
        labels = list(uniq)
    codes = np.asarray(codes, dtype=np.int64)
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes, minlength=len(labels))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    position = np.empty(len(codes), dtype=np.int64)
    position[order] = np.arange(len(codes)) - starts[codes[order]]
    return GroupIndex(labels, codes, order, sizes, position, int(sizes.max()) if len(sizes) else 0)


def pad_groups(
    gi: GroupIndex,
    y: np.ndarray,
    x: np.ndarray,
    z: np.ndarray,
    w: np.ndarray,
    g_pad: int | None = None,
    n_pad: int | None = None,
) -> GroupedData:
    """Lay rows into ``(G, n_max, ·)`` blocks (zeros and mask 0 on padding)."""
    g_pad = g_pad or len(gi.labels)
    n_pad = n_pad or gi.n_max
    p, q = x.shape[1], z.shape[1]
    ya = np.zeros((g_pad, n_pad))
    xa = np.zeros((g_pad, n_pad, p))
    za = np.zeros((g_pad, n_pad, q))
    wa = np.zeros((g_pad, n_pad))
    ma = np.zeros((g_pad, n_pad))
    flat = gi.codes * n_pad + gi.position  # one flat index for every array (2-D fancy indexing is ~2x slower)
    ya.reshape(-1)[flat] = y
    xa.reshape(-1, p)[flat] = x
    za.reshape(-1, q)[flat] = z
    wa.reshape(-1)[flat] = w
    ma.reshape(-1)[flat] = 1.0
    return GroupedData(jnp.asarray(ya), jnp.asarray(xa), jnp.asarray(za), jnp.asarray(wa), jnp.asarray(ma))
