"""Padded per-group blocks and per-group cross-products (the data side of the likelihood).

Rows are sorted by group and laid into ``(G, n_max, ·)`` arrays with a row mask.
Prior weights are applied by whitening (row i scaled by ``sqrt(w_i)``), so the
likelihood only ever sees cross-products of whitened blocks; the Jacobian of the
whitening enters the log-likelihood through ``sum_logw``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from .crossprod import group_gram
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
    ``nobs`` () and ``ngroups`` () real (non-padding) groups.  ``xtx``, ``xty`` and
    ``yty`` may come summed over the groups (a leading axis of length 1): only their
    sums enter the likelihood (:func:`row_cross_products`).
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


def row_cross_products(codes: np.ndarray, y: np.ndarray, x: np.ndarray, z: np.ndarray, w: np.ndarray | None,
                       g_pad: int) -> CrossProducts:
    """:class:`CrossProducts` straight from the rows (row order, any order of the groups), without padding them.

    One ``np.bincount`` per entry of the Gram triangle of ``U = [X | Z columns not in X | y]``
    (:func:`mixedjax.crossprod.group_gram`; a random intercept or slope that is a column of X adds
    no column), so the cost is O(n m²) and no sort of the rows is made: what a model needs for its
    fit.  ``codes`` the group of each row (``0 .. G-1``), ``w`` prior weights (``None``: 1); groups
    ``G .. g_pad-1`` are empty.  ``XᵀX``, ``Xᵀy`` and ``yᵀy`` come summed over the groups (a group axis of
    length 1, as :func:`mixedjax.likelihood.sum_fixed_parts`: only their sums enter the likelihood);
    otherwise equal to :func:`cross_products` of the padded rows.

    Examples
    --------
    >>> x = np.column_stack([np.ones(3), np.arange(3.0)])
    >>> cp = row_cross_products(np.array([0, 1, 0]), np.array([1.0, 2.0, 4.0]), x, x[:, :1], None, 2)
    >>> cp.zty.tolist(), cp.xtx.tolist(), float(cp.nobs)
    ([[5.0], [2.0]], [[[3.0, 3.0], [3.0, 5.0]]], 3.0)
    """
    n, p = x.shape
    z_index, extra = [], []
    for j in range(z.shape[1]):
        same = [i for i in range(p) if np.array_equal(z[:64, j], x[:64, i]) and np.array_equal(z[:, j], x[:, i])]
        z_index.append(same[0] if same else p + len(extra))
        if not same:
            extra.append(z[:, j])
    cols = [x[:, i] for i in range(p)] + extra + [y]
    logw = None
    if w is not None and not np.all(w == 1.0):
        sw = np.sqrt(w)
        cols = [c * sw for c in cols]
        logw = np.log(w)
    g = int(codes.max()) + 1 if n else 0
    _, packed = group_gram(codes, cols, logw, n_groups=g, transposed=True)  # (K, G): one row per entry
    m = len(cols)
    entry = np.zeros((m, m), dtype=np.int64)
    iu, ju = np.triu_indices(m)
    entry[iu, ju] = entry[ju, iu] = np.arange(len(iu))

    def block(rows: list[int], cols_: list[int]) -> np.ndarray:  # (g_pad, a, b): per-group entries
        out = np.zeros((int(g_pad), len(rows), len(cols_)))
        for a, r in enumerate(rows):
            for b, c in enumerate(cols_):
                out[:g, a, b] = packed[entry[r, c]]
        return out

    def total(rows: list[int], cols_: list[int]) -> np.ndarray:  # (1, a, b): summed over the groups
        return packed[entry[np.ix_(rows, cols_)]].sum(axis=-1)[None]

    zi, xi, yi = list(z_index), list(range(p)), [m - 1]
    nn = np.zeros(int(g_pad))
    nn[:g] = packed[-2]
    parts = (block(zi, zi), block(zi, xi), block(zi, yi)[..., 0], total(xi, xi), total(xi, yi)[..., 0],
             total(yi, yi)[:, 0, 0], nn, np.sum(packed[-1]), np.sum(nn), np.sum(nn > 0))
    return CrossProducts(*(jax.device_put(np.asarray(v)) for v in parts))  # a transfer, no compiled conversion


def bucket(n: int) -> int:
    """Round ``n`` up to ``m * 2**k`` with ``8 <= m < 16`` (at most 12.5% padding), so shapes repeat."""
    if n <= 8:
        return max(n, 1)
    k = int(np.floor(np.log2(n))) - 3
    m = -(-n // 2**k)
    return int(m * 2**k)


class GroupIndex:
    """Host-side layout of rows into groups: ``labels`` (group order), ``codes (nobs,)`` each row's group,
    ``sizes (G,)``, ``n_max``; ``order`` (rows sorted by group, stable) and ``position`` (each row's place in
    its group, in row order) are computed on first use: a sort of every row, which a model that needs only
    its cross-products (:func:`mixedjax.crossprod.group_gram`) never pays."""

    def __init__(self, labels: list, codes: np.ndarray, sizes: np.ndarray, position: np.ndarray | None = None):
        self.labels = labels
        self.codes = codes
        self.sizes = sizes
        self.n_max = int(sizes.max()) if len(sizes) else 0
        self._position = position
        self._order: np.ndarray | None = None

    @property
    def order(self) -> np.ndarray:
        if self._order is None:
            self._order = np.argsort(self.codes, kind="stable")
        return self._order

    @property
    def position(self) -> np.ndarray:
        if self._position is None:
            order = self.order
            starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
            position = np.empty(len(self.codes), dtype=np.int64)
            position[order] = np.arange(len(self.codes)) - starts[self.codes[order]]
            self._position = position
        return self._position

    def with_position(self, position: np.ndarray) -> GroupIndex:
        """The same groups with another place of each row in its group (AR(1): time order)."""
        return GroupIndex(self.labels, self.codes, self.sizes, np.asarray(position, dtype=np.int64))


def group_index(groups: np.ndarray | object, labels: list | None = None) -> GroupIndex:
    """Codes and sizes of a grouping vector (:class:`GroupIndex`; the sort by group is lazy).

    Group order is the categorical order for a pandas Categorical (unused
    categories dropped), else sorted order of the labels.

    Examples
    --------
    >>> gi = group_index(np.array(["b", "a", "b"]))
    >>> gi.labels, gi.codes.tolist(), gi.position.tolist()
    (['a', 'b'], [1, 0, 1], [0, 0, 1])
    """
    import pandas as pd

    s = pd.Series(groups)
    if isinstance(s.dtype, pd.CategoricalDtype):
        s = s.cat.remove_unused_categories()
        codes = s.cat.codes.to_numpy()
        labels = list(s.cat.categories)
    elif pd.api.types.is_integer_dtype(s.dtype) and len(s) and \
            int(s.max()) - int(s.min()) < 2 * len(s) + 1024:  # integer ids in a short range: counted, not hashed
        v = s.to_numpy().astype(np.int64)
        lo = int(v.min())
        v -= lo
        present = np.bincount(v) > 0
        codes = v if present.all() else (np.cumsum(present) - 1)[v]  # ids 0 .. G-1, all used: they are the codes
        labels = (np.flatnonzero(present) + lo).tolist()
    else:
        codes, uniq = pd.factorize(s, sort=True)
        labels = list(uniq)
    codes = np.asarray(codes, dtype=np.int64)
    return GroupIndex(labels, codes, np.bincount(codes, minlength=len(labels)))


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
