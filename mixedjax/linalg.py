"""Small dense linear algebra in plain ``jnp`` ops, batched over leading axes.

Mixed models need many tiny Choleskys (one q x q per group, one p x p for the
GLS normal equations).  Unrolling them over the (static) matrix size keeps
batched LAPACK calls off the hot path: it is faster for small q, and it avoids
a CPU deadlock in some jaxlib releases when two batched LAPACK calls run at
once (see README, "Known traps").  All functions accept ``(..., k, k)`` arrays.

Where a dense factorisation needs LAPACK (the crossed model's Schur complement,
hundreds of rows), :func:`unbatched_lapack` keeps it unbatched under ``vmap`` on
CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.custom_batching import custom_vmap

SCALAR_UNROLL_MAX = 6  # up to this size, factor entry by entry (closed forms on whole batches)


def _cholesky_scalar(a: Array, semidefinite: bool) -> Array:
    """Cholesky–Banachiewicz on individual entries: each operation acts on a whole (...) batch."""
    k = a.shape[-1]
    ent = [[None] * k for _ in range(k)]
    zero = jnp.zeros(a.shape[:-2], dtype=a.dtype)
    for i in range(k):
        for j in range(i + 1):
            s = a[..., i, j]
            for m in range(j):
                s = s - ent[i][m] * ent[j][m]
            if i == j:
                if semidefinite:
                    ok = s > 0
                    ent[i][i] = jnp.where(ok, jnp.sqrt(jnp.where(ok, s, 1.0)), 0.0)
                else:
                    ent[i][i] = jnp.sqrt(s)
            else:
                if semidefinite:
                    djj = ent[j][j]
                    ent[i][j] = jnp.where(djj > 0, s / jnp.where(djj > 0, djj, 1.0), 0.0)
                else:
                    ent[i][j] = s / ent[j][j]
    rows = [jnp.stack([ent[i][j] if j <= i else zero for j in range(k)], axis=-1) for i in range(k)]
    return jnp.stack(rows, axis=-2)


def cholesky(a: Array, semidefinite: bool = False) -> Array:
    """Lower Cholesky factor of symmetric positive definite ``a`` (..., k, k).

    Left-looking column algorithm, unrolled over the static size ``k``: ``k``
    batched vector operations instead of a batched LAPACK call.

    With ``semidefinite=True`` a non-positive pivot gives a zero column (the
    factor of a positive semidefinite matrix whose columns are dependent),
    otherwise it gives NaN, as LAPACK would report failure.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from mixedjax.linalg import cholesky
    >>> cholesky(jnp.array([[4.0, 2.0], [2.0, 5.0]])).tolist()
    [[2.0, 0.0], [1.0, 2.0]]
    """
    k = a.shape[-1]
    if k <= SCALAR_UNROLL_MAX:
        return _cholesky_scalar(a, semidefinite)
    rows = jnp.arange(k)
    factor = jnp.zeros_like(a)
    for j in range(k):
        # column j of A minus the contribution of the columns already done
        v = a[..., :, j] - jnp.einsum("...ik,...k->...i", factor, factor[..., j, :])
        pivot = v[..., j]
        if semidefinite:
            ok = pivot > 0
            d = jnp.sqrt(jnp.where(ok, pivot, 1.0))
            col = jnp.where(ok[..., None], v / d[..., None], 0.0)
            col = jnp.where(rows == j, jnp.where(ok, d, 0.0)[..., None], col)
        else:
            d = jnp.sqrt(pivot)
            col = jnp.where(rows == j, d[..., None], v / d[..., None])
        col = jnp.where(rows < j, 0.0, col)
        factor = factor.at[..., :, j].set(col)
    return factor


def solve_lower(l: Array, b: Array) -> Array:
    """Solve ``l x = b`` for lower-triangular ``l`` (..., k, k); ``b`` is (..., k) or (..., k, m)."""
    vec = b.ndim == l.ndim - 1
    rhs = b[..., None] if vec else b
    k = l.shape[-1]
    if k <= SCALAR_UNROLL_MAX:
        xs = []
        for i in range(k):
            s = rhs[..., i, :]
            for j in range(i):
                s = s - l[..., i, j, None] * xs[j]
            xs.append(s / l[..., i, i, None])
        x = jnp.stack(xs, axis=-2)
        return x[..., 0] if vec else x
    x = jnp.zeros_like(rhs)
    for i in range(k):
        s = rhs[..., i, :] - jnp.einsum("...k,...km->...m", l[..., i, :], x)
        x = x.at[..., i, :].set(s / l[..., i, i][..., None])
    return x[..., 0] if vec else x


def solve_upper_t(l: Array, b: Array) -> Array:
    """Solve ``l^T x = b`` for lower-triangular ``l`` (..., k, k); ``b`` is (..., k) or (..., k, m)."""
    vec = b.ndim == l.ndim - 1
    rhs = b[..., None] if vec else b
    k = l.shape[-1]
    if k <= SCALAR_UNROLL_MAX:
        xs = [None] * k
        for i in reversed(range(k)):
            s = rhs[..., i, :]
            for j in range(i + 1, k):
                s = s - l[..., j, i, None] * xs[j]
            xs[i] = s / l[..., i, i, None]
        x = jnp.stack(xs, axis=-2)
        return x[..., 0] if vec else x
    x = jnp.zeros_like(rhs)
    for i in reversed(range(k)):
        s = rhs[..., i, :] - jnp.einsum("...k,...km->...m", l[..., :, i], x)
        x = x.at[..., i, :].set(s / l[..., i, i][..., None])
    return x[..., 0] if vec else x


def cho_solve(l: Array, b: Array) -> Array:
    """Solve ``(l l^T) x = b`` given the lower Cholesky factor ``l``."""
    return solve_upper_t(l, solve_lower(l, b))


def diagonal(a: Array) -> Array:
    """The main diagonal of square matrices ``a (..., k, k)``, as a strided slice of the flattened matrix.

    ``jnp.diagonal`` traces a ``k x k`` index mask and a platform-dependent branch; this is one
    reshape and one slice, which trace and compile in a fraction of the time.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> diagonal(jnp.arange(9.0).reshape(3, 3)).tolist()
    [0.0, 4.0, 8.0]
    """
    k = a.shape[-1]
    return a.reshape(a.shape[:-2] + (k * k,))[..., :: k + 1]


def logdet_from_cholesky(l: Array) -> Array:
    """``log det(l l^T)`` for a lower Cholesky factor ``l`` (..., k, k)."""
    return 2.0 * jnp.sum(jnp.log(diagonal(l)), axis=-1)


def spd_inverse(a: Array) -> Array:
    """Inverse of a symmetric positive definite matrix via the unrolled Cholesky."""
    l = cholesky(a)
    eye = jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)
    return cho_solve(l, eye)


def cholesky_loop(a: Array) -> Array:
    """:func:`cholesky` (positive definite) as a ``fori_loop`` over the columns: a program of constant size
    in ``k`` (the unrolled form compiles in time growing with ``k``); the scalar form up to
    ``SCALAR_UNROLL_MAX``."""
    k, ax = a.shape[-1], a.ndim - 1
    if k <= SCALAR_UNROLL_MAX:
        return _cholesky_scalar(a, False)
    rows = jnp.arange(k)

    def column(j, factor):
        # column j of A minus the contribution of the columns already done (the later ones are still 0)
        v = lax.dynamic_index_in_dim(a, j, ax, keepdims=False) - jnp.einsum(
            "...ik,...k->...i", factor, lax.dynamic_index_in_dim(factor, j, ax - 1, keepdims=False))
        d = jnp.sqrt(lax.dynamic_index_in_dim(v, j, ax - 1))
        col = jnp.where(rows == j, d, v / d)
        return lax.dynamic_update_slice_in_dim(factor, jnp.where(rows < j, 0.0, col)[..., None], j, ax)

    return lax.fori_loop(0, k, column, jnp.zeros_like(a))


def solve_lower_loop(l: Array, b: Array) -> Array:
    """:func:`solve_lower` as a ``fori_loop`` over the rows (see :func:`cholesky_loop`)."""
    k, ax = l.shape[-1], l.ndim - 2
    if k <= SCALAR_UNROLL_MAX:
        return solve_lower(l, b)
    vec = b.ndim == l.ndim - 1
    rhs = b[..., None] if vec else b

    def row(i, x):
        li = lax.dynamic_index_in_dim(l, i, ax, keepdims=False)  # (..., k); x's rows from i on are still 0
        s = lax.dynamic_index_in_dim(rhs, i, ax, keepdims=False) - jnp.einsum("...k,...km->...m", li, x)
        return lax.dynamic_update_slice_in_dim(x, (s / lax.dynamic_index_in_dim(li, i, ax))[..., None, :], i, ax)

    x = lax.fori_loop(0, k, row, jnp.zeros_like(rhs))
    return x[..., 0] if vec else x


def solve_upper_t_loop(l: Array, b: Array) -> Array:
    """:func:`solve_upper_t` as a ``fori_loop`` over the rows (see :func:`cholesky_loop`)."""
    k, ax = l.shape[-1], l.ndim - 2
    if k <= SCALAR_UNROLL_MAX:
        return solve_upper_t(l, b)
    vec = b.ndim == l.ndim - 1
    rhs = b[..., None] if vec else b

    def row(t, x):
        i = k - 1 - t
        li = lax.dynamic_index_in_dim(l, i, ax + 1, keepdims=False)  # column i of l; x's rows up to i still 0
        s = lax.dynamic_index_in_dim(rhs, i, ax, keepdims=False) - jnp.einsum("...k,...km->...m", li, x)
        return lax.dynamic_update_slice_in_dim(x, (s / lax.dynamic_index_in_dim(li, i, ax))[..., None, :], i, ax)

    x = lax.fori_loop(0, k, row, jnp.zeros_like(rhs))
    return x[..., 0] if vec else x


UNBATCHED_SMALL_MAX = 256  # unbatched_lapack: up to this size, the plain-jnp form under vmap


def unbatched_lapack(small: Callable | None = None, small_max: int = UNBATCHED_SMALL_MAX) -> Callable:
    """Decorator: a function of arrays whose dense LAPACK calls stay unbatched under ``jax.vmap`` on CPU.

    jaxlib 0.10's CPU LAPACK kernels split a batch over XLA's intra-op thread pool and wait for
    it; two such calls in flight at once can deadlock (README, "Known traps").  Unbatched, the
    function is ``fun`` itself.  Batched on CPU it runs ``small`` (the same algebra in plain
    ``jnp`` ops, batched over leading axes) when the first argument has at most ``small_max``
    rows, else ``fun`` on one problem at a time (``lax.map``); other platforms keep ``fun``'s
    batched call.  Derivatives are ``fun``'s own (a forward rule; reverse mode by transposing
    it), computed with plain JAX, so keep a custom VJP around any first-order path that is
    differentiated under ``vmap`` (as :func:`mixedjax.crossed_likelihood.dense_logdet_quad` does).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> inv = unbatched_lapack(small=spd_inverse)(jnp.linalg.inv)
    >>> [round(v, 12) for v in jax.vmap(inv)(jnp.stack([2.0 * jnp.eye(2), 4.0 * jnp.eye(2)]))[:, 0, 0].tolist()]
    [0.5, 0.25]
    """

    def deco(fun: Callable) -> Callable:
        @custom_vmap
        def call(*args):
            return fun(*args)

        @call.def_vmap
        def _batched(axis_size, in_batched, *args):
            full = [a if b else jnp.broadcast_to(a, (axis_size, *jnp.shape(a)))
                    for a, b in zip(args, in_batched, strict=True)]
            if small is not None and 0 < jnp.shape(args[0])[-1] <= small_max:
                cpu = small
            else:
                def cpu(*xs):
                    return lax.map(lambda x: call(*x), xs)
            out = lax.platform_dependent(*full, cpu=cpu, default=jax.vmap(fun))
            return out, jax.tree.map(lambda _: True, out)

        @jax.custom_jvp
        @functools.wraps(fun)
        def wrapped(*args):
            return call(*args)

        @wrapped.defjvp
        def _jvp(primals, tangents):
            return wrapped(*primals), jax.jvp(fun, primals, tangents)[1]

        return wrapped

    return deco
