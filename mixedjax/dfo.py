"""A derivative-free trust-region Newton minimiser (host loop), beside the BFGS one of :mod:`mixedjax.optimize`.

For objectives with a handful of parameters whose evaluation is expensive and whose
gradient costs far more than a value (the crossed-factor deviance): difference
gradients, an interpolated Hessian with symmetric rank-one updates, Moré–Sorensen
trust-region steps, then a Newton polish on a measured gradient and Hessian.  It knows
nothing of mixed models, and returns the same :class:`mixedjax.optimize.Solution` and
:class:`mixedjax.optimize.Result` codes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .optimize import Result, Solution

REL_NOISE = 3e-15
"""Default rounding noise of ``f`` relative to ``max(|f|, 1)``, for the polish's difference steps (mixed-model
deviances measured 1e-15 to 1.6e-13; the steps scale as its cube root, so a factor of 10 either way costs about
a factor of 2 in the gradient's error)."""


def trust_step(g: np.ndarray, h: np.ndarray, delta: float) -> np.ndarray:
    """Minimiser of ``gᵀs + ½ sᵀHs`` over ``‖s‖ ≤ δ`` (Moré–Sorensen by bisection on the shift μ).

    ``s(μ) = −(H + μI)⁻¹ g`` in the eigenbasis of ``H``; ``‖s(μ)‖`` decreases in ``μ``.  In the
    "hard case" (``g`` orthogonal to the lowest eigenvector) the step is completed to the
    boundary along that eigenvector.
    """
    lam, q = np.linalg.eigh(h)
    gq = q.T @ g
    lo = max(0.0, -lam[0])
    if lam[0] > 0:
        s = -q @ (gq / lam)
        if np.linalg.norm(s) <= delta:
            return s
    norm_at = lambda mu: np.linalg.norm(gq / (lam + mu))  # noqa: E731
    tiny = 1e-12 * max(1.0, np.abs(lam).max())
    if norm_at(lo + tiny) <= delta:  # hard case
        keep = lam + lo > tiny
        s = -q[:, keep] @ (gq[keep] / (lam[keep] + lo))
        return s + np.sqrt(max(delta**2 - s @ s, 0.0)) * q[:, 0]
    a, b = lo, lo + np.linalg.norm(g) / delta + np.abs(lam).max()
    for _ in range(100):
        mu = 0.5 * (a + b)
        a, b = (mu, b) if norm_at(mu) > delta else (a, mu)
    return -q @ (gq / (lam + b))


def _stencil(x: np.ndarray, d: np.ndarray, wide: np.ndarray) -> list[np.ndarray]:
    """The points of one measurement (:func:`_measure`): ``x ± dᵢeᵢ``, ``x + dᵢeᵢ + dⱼeⱼ`` for ``i < j``, then
    ``x ± 2dᵢeᵢ`` where ``wide``."""
    n = x.size
    eye = np.eye(n) * d
    pts = [x + e for e in eye] + [x - e for e in eye]
    pts += [x + eye[i] + eye[j] for i in range(n) for j in range(i + 1, n)]
    return pts + [x + 2.0 * e for e in eye[wide]] + [x - 2.0 * e for e in eye[wide]]


def _measure(f: float, vals: np.ndarray, d: np.ndarray, wide: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradient and Hessian from the values at :func:`_stencil`.

    Central differences (error ``dᵢ² f‴/6``), five-point ones where ``wide`` (error ``O(dᵢ⁴)``); the
    diagonal of the Hessian from the same points, its off-diagonal from the pair points less the
    diagonal terms' share (exact for a quadratic, error ``O(d f‴)``).
    """
    n, k = d.size, int(wide.sum())
    npair = n * (n - 1) // 2
    fp, fm, fij = vals[:n], vals[n : 2 * n], vals[2 * n : 2 * n + npair]
    g = (fp - fm) / (2.0 * d)
    hd = (fp + fm - 2.0 * f) / d**2
    if k:
        f2p, f2m = vals[2 * n + npair : 2 * n + npair + k], vals[2 * n + npair + k :]
        dw, pw, mw = d[wide], fp[wide], fm[wide]
        g[wide] = (8.0 * (pw - mw) - (f2p - f2m)) / (12.0 * dw)
        hd[wide] = (16.0 * (pw + mw) - (f2p + f2m) - 30.0 * f) / (12.0 * dw**2)
    h = np.diag(hd)
    m = 0
    for i in range(n):
        for j in range(i + 1, n):
            h[i, j] = h[j, i] = (fij[m] - fp[i] - fp[j] + f) / (d[i] * d[j])
            m += 1
    return g, h


def _modified(h: np.ndarray, floor: float) -> np.ndarray:
    """``H`` with its eigenvalues raised to at least ``floor`` (a positive definite Newton model)."""
    lam, q = np.linalg.eigh(0.5 * (h + h.T))
    return (q * np.maximum(lam, floor)) @ q.T


def minimize_dfo(fmap: Any, x0: np.ndarray, step0: float = 0.1, ftol: float = 1e-3, maxfev: int = 1000,
                 fd_step: float = 1e-4, xtol: float = 1e-4, rel_noise: float = REL_NOISE,
                 snap: np.ndarray | None = None, snap_tol: Any = 0.0) -> Solution:
    """Derivative-free trust-region Newton: difference gradients and rank-one curvature, then a Newton polish.

    ``fmap(points)`` returns ``f`` at a list of points (it may evaluate them concurrently:
    every batch below is independent).

    1. ``f(x₀)`` and central differences at ``x₀ ± h eᵢ`` (``h = step0``; one batch of
       ``2n + 1``) give the gradient and the diagonal of the Hessian ``H`` at ``x₀``; the
       off-diagonal curvature is learnt by the updates below.
    2. Search: each iteration minimises ``gᵀs + ½ sᵀHs`` over ``‖s‖ ≤ Δ`` and evaluates, in
       one batch, ``f(x + s)`` and ``f(x + s + δeᵢ)``.  If ``f`` decreased, the step is taken
       and the gradient there comes from forward differences with the curvature removed,
       ``gᵢ = (f(x + s + δeᵢ) − f(x + s))/δ − ½ Hᵢᵢ δ`` (``δ = fd_step``); ``H`` then gets a
       symmetric rank-one update from the change of gradient along the step.  ``Δ`` grows
       or shrinks with the ratio of actual to predicted decrease.  The search hands over to
       the polish when the model predicts a decrease below ``ftol``.
    3. Polish: a forward gradient carries the error of ``Hᵢᵢ`` and the rounding noise ``ε``
       of ``f`` (``rel_noise · max(|f|, 1)``) over ``δ``, which would limit the search to a
       relative precision of about ``√(ftol / H)``.  The polish measures, in one batch of
       ``n(n + 3)/2`` points (with the value at the search's last step), the gradient by
       central differences and the whole Hessian by second differences, with per-coordinate
       steps ``dᵢ = (3ε / Hᵢᵢ)^{1/3}`` (rounding and truncation errors balanced), and takes
       Newton steps on a positive definite model (eigenvalues raised to the level at which
       the gradient is noise).  A step longer than ``xtol`` in some coordinate is checked
       (its value and the next measurement in one batch).  One within ``xtol`` is the last;
       its error is the model's: the measured gradient's and Hessian's errors (estimated
       from ``ε``, the steps and ``H``) through the inverse Hessian.  Where that estimate
       exceeds 1e-7 of a coordinate's scale (a flat direction amplifies them: a nearly
       singular fit), the point is measured once more with five-point differences at steps
       of 1e-3, whose rounding error is 20 times smaller and truncation ``O(d⁴)``.  The
       last step is then taken after one evaluation.
    4. Snap (optional): coordinates marked in ``snap`` with ``|xⱼ| < snap_tol`` (scalar or
       per coordinate) are tried at exactly 0, each alone (one batch) and then those that
       passed together, and kept there unless ``f`` gets worse by more than its noise; their
       gradient entries are then reported as 0 (for an objective even in them).  Marked
       coordinates near 0 (``|xⱼ| < 1``) also get five-point differences in the polish:
       where an even objective has a minimum close to 0, ``f‴ ~ 3f″/|xⱼ|`` and central
       differences would be too coarse.

    Returns a :class:`mixedjax.optimize.Solution` (numpy fields) with the BFGS minimiser's
    result codes: ``CONVERGED`` (the polish's last Newton step was within ``xtol``, or its
    predicted decrease within the noise, and did not increase ``f``), ``NO_PROGRESS`` (that
    last step increased ``f``: the model is no better than the noise there; the point
    before it is returned), ``MAX_ITER`` (``maxfev`` evaluations spent),
    ``LINE_SEARCH_FAILED`` (the trust region collapsed without a decrease) or ``NONFINITE``
    (``f(x₀)`` is not finite).  ``grad`` is the last measured gradient: the polish's, at the
    point one (short) Newton step before ``x`` (the model puts the gradient at ``x`` at the
    measurement's error); ``iterations`` counts the search's steps and ``polish_iterations``
    the polish's batches.

    Examples
    --------
    >>> import numpy as np
    >>> f = lambda x: float((x[0] - 1.0) ** 2 + 10.0 * (x[1] + 0.5) ** 2)
    >>> sol = minimize_dfo(lambda pts: [f(p) for p in pts], np.zeros(2))
    >>> np.round(sol.x, 8).tolist(), Result(sol.result).name
    ([1.0, -0.5], 'CONVERGED')
    """
    x0 = np.asarray(x0, float)
    n = x0.size
    eye = np.eye(n)

    def values(points: list[np.ndarray]) -> np.ndarray:
        v = np.asarray(fmap(points), float)
        return np.where(np.isfinite(v), v, np.inf)

    first = values([x0] + list(x0 + step0 * eye) + list(x0 - step0 * eye))
    f0, (fp, fm) = float(first[0]), np.split(first[1:], 2)
    nf, it, pit = 2 * n + 1, 0, 0

    def done(x, f, g, result):
        return Solution(x=x.copy(), value=f, grad=g, x_start=x0, value_start=f0, iterations=it, warm_iterations=0,
                        polish_iterations=pit, evaluations=nf, grad_norm=float(np.abs(g).max()), result=int(result))

    if not np.isfinite(f0):
        return done(x0, f0, np.full(n, np.nan), Result.NONFINITE)
    with np.errstate(invalid="ignore"):
        g, h = (fp - fm) / (2.0 * step0), np.diag((fp + fm - 2.0 * f0) / step0**2)
        if not np.all(np.isfinite(g)):  # a step off the domain: forward or backward differences where finite
            g = np.where(np.isfinite(fp), (fp - f0) / step0, (f0 - fm) / step0)
            h = np.diag(np.where(np.isfinite(np.diag(h)), np.diag(h), 1.0))
    if not np.all(np.isfinite(g)):
        return done(x0, f0, g, Result.NONFINITE)
    x, f, exact, delta = x0, f0, False, 1.0

    def with_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        """``f(x)`` and its difference gradient (one batch of ``n + 1`` evaluations)."""
        vals = values([x] + [x + fd_step * e for e in eye])
        with np.errstate(invalid="ignore"):
            return float(vals[0]), (vals[1:] - vals[0]) / fd_step - 0.5 * np.diag(h) * fd_step

    # ------------------------------------------------------------------------------------------ search
    while True:
        if nf + n + 1 > maxfev:
            return done(x, f, g, Result.MAX_ITER)
        s = trust_step(g, h, delta)
        pred = -(g @ s + 0.5 * s @ h @ s)
        if pred <= ftol:
            if exact:
                break
            f, g = with_grad(x)
            exact, nf = True, nf + n + 1
            continue
        fn, gn = with_grad(x + s)
        nf, it = nf + n + 1, it + 1
        ratio = (f - fn) / pred
        ns = np.linalg.norm(s)
        if fn < f and np.all(np.isfinite(gn)):
            # symmetric rank-one update, skipped when ill-defined or when the step is so short that the
            # change of gradient is mostly the differences' own error (which would corrupt H)
            if exact and ns > 100.0 * fd_step:
                r = gn - g - h @ s
                if abs(r @ s) > 1e-8 * np.linalg.norm(r) * ns:
                    h = h + np.outer(r, r) / (r @ s)
            x, f, g, exact = x + s, fn, gn, True
        elif not exact:
            f, g = with_grad(x)
            exact, nf = True, nf + n + 1
        delta = 0.5 * ns if ratio < 0.1 else (delta if ratio < 0.7 else max(delta, 2.0 * ns))
        if delta < 1e-10:
            return done(x, f, g, Result.LINE_SEARCH_FAILED)

    # ------------------------------------------------------------------------------------------ polish
    def size_of(wide: np.ndarray) -> int:
        return n * (n + 3) // 2 + 2 * int(wide.sum())

    mask = np.zeros(n, bool) if snap is None else np.asarray(snap, bool)

    def wide_at(x: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates for five-point differences, and the steps: those marked in ``snap`` near 0, where an
        objective even in them has ``f‴ ~ 3f″/|x|`` (a small variance: its curvature is small and its third
        derivative is not).  Their error is ``O(d⁴)``, so their step grows (to 1% of ``|x|``, at most 1e-3)
        to cut the rounding error, which dominates there."""
        wide = mask & (np.abs(x) < 1.0)
        return wide, np.where(wide, np.maximum(d, np.minimum(1e-3, 0.01 * np.abs(x))), d)

    def steps(h: np.ndarray, f: float) -> tuple[np.ndarray, float]:
        """Difference steps balancing rounding (``ε/d``) and truncation (``d² f‴/6``, ``f‴ ~ Hᵢᵢ``), and ``ε``."""
        eps = rel_noise * max(abs(f), 1.0)
        curv = np.abs(np.diag(h))
        return np.clip(np.cbrt(3.0 * eps / np.where(curv > 0, curv, 1.0)), 1e-8, 1e-2), eps

    d, eps = steps(h, f)
    measured = False  # g, h measured at x (else the search's)
    fine, all_wide, d_fine = False, np.ones(n, bool), d
    # the search's last step, its value and the first measurement in one batch
    s = s if pred > 0 else None
    while True:
        if s is not None:
            wide, dw = (all_wide, d_fine) if fine else wide_at(x + s, d)
            if nf + 1 + size_of(wide) > maxfev:
                return done(x, f, g, Result.MAX_ITER)
            trial = values([x + s] + _stencil(x + s, dw, wide))
            nf, pit = nf + trial.size, pit + 1
            if trial[0] < f or (fine and trial[0] - f <= max(pred, 1000.0 * eps)):
                x, f, measured = x + s, float(trial[0]), True
                delta = max(delta, 2.0 * np.linalg.norm(s))
                g, h = _measure(f, trial[1:], dw, wide)
                d_meas, wide_meas = dw, wide
            else:
                delta = 0.5 * np.linalg.norm(s)
                if delta < 1e-10:
                    return done(x, f, g, Result.LINE_SEARCH_FAILED)
        if not measured:
            wide, dw = wide_at(x, d)
            if nf + size_of(wide) > maxfev:
                return done(x, f, g, Result.MAX_ITER)
            vals = values(_stencil(x, dw, wide))
            nf += vals.size
            g, h = _measure(f, vals, dw, wide)
            measured, d_meas, wide_meas = True, dw, wide
        if not (np.all(np.isfinite(g)) and np.all(np.isfinite(h))):
            return done(x, f, g, Result.LINE_SEARCH_FAILED)
        d, eps = steps(h, f)
        # the gradient's rounding noise, and the curvature below which it would move x by more than xtol
        g_noise = 3.0 * eps / d.min()
        hm = _modified(h, g_noise / xtol)
        s = -np.linalg.solve(hm, g)
        pred = -(g @ s + 0.5 * s @ hm @ s)
        if (np.abs(s).max() <= xtol or pred <= eps) and not fine and not wide_meas.all():
            # the error the last step would keep: the gradient's (rounding over the step, and truncation
            # d² f‴/6 with f‴ ~ Hᵢᵢ, where central) and the Hessian's times the step (rounding 4ε/dᵢdⱼ,
            # truncation dᵢ f‴ off the diagonal), through the inverse Hessian, which a flat direction amplifies
            cd = np.sqrt(np.abs(np.outer(np.diag(h), np.diag(h))))
            err_g = eps / d_meas + np.where(wide_meas, 0.0, d_meas**2 * np.abs(np.diag(h)) / 6.0)
            err_h = 4.0 * eps / np.outer(d_meas, d_meas) + 0.5 * np.add.outer(d_meas, d_meas) * cd * (1.0 - np.eye(n))
            err_x = np.abs(np.linalg.inv(hm)) @ (err_g + err_h @ np.abs(s))
            scale = np.where(mask, np.maximum(np.minimum(np.abs(x), 1.0), 1e-2), np.maximum(np.abs(x), 1.0))
            if np.any(err_x > 1e-7 * scale):
                # a fourth-order measurement with steps 1e-3 (1% of |x| for marked coordinates near 0) at x + s
                fine, d_fine = True, np.where(wide_at(x, d)[0], wide_at(x, d)[1], np.maximum(d, 1e-3))
                continue
        if np.abs(s).max() <= xtol or pred <= eps:
            # the last step: within xtol the quadratic model is exact to well below the tolerance; an increase
            # beyond its prediction and the noise would mean the measurement itself failed
            if nf + 1 > maxfev:
                return done(x, f, g, Result.MAX_ITER)
            fn = float(values([x + s])[0])
            nf, pit = nf + 1, pit + 1
            if not fn - f <= max(pred, 1000.0 * eps):
                return done(x, f, g, Result.NO_PROGRESS)
            x, f = x + s, fn
            break
        if np.linalg.norm(s) > delta:
            s = trust_step(g, hm, delta)

    # -------------------------------------------------------------------------------------------- snap
    if snap is not None:
        near = np.flatnonzero(mask & (np.abs(x) < snap_tol) & (x != 0.0))
        if near.size and nf + near.size + 1 <= maxfev:
            # each alone (one batch), then those that did not make f worse together
            single = values([np.where(np.arange(n) == j, 0.0, x) for j in near])
            nf += near.size
            keep = near[single <= f + 2.0 * eps]
            if keep.size > 1:
                xs = np.where(np.isin(np.arange(n), keep), 0.0, x)
                fs = float(values([xs])[0])
                nf += 1
                if not fs <= f + 2.0 * eps:
                    best = int(np.argmin(single))
                    keep, xs, fs = near[[best]], np.where(np.arange(n) == near[best], 0.0, x), float(single[best])
            elif keep.size:
                xs, fs = np.where(np.arange(n) == keep[0], 0.0, x), float(single[near == keep[0]][0])
            if keep.size:
                x, f, g = xs, fs, np.where(np.isin(np.arange(n), keep), 0.0, g)
    return done(x, f, g, Result.CONVERGED)
