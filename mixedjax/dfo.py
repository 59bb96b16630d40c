"""A derivative-free trust-region Newton minimiser (host loop), beside the BFGS one of :mod:`mixedjax.optimize`.

For objectives with a handful of parameters whose evaluation is expensive and whose
gradient costs far more than a value (the crossed-factor deviance): difference
gradients, an interpolated Hessian with symmetric rank-one updates, and Moré–Sorensen
trust-region steps.  It knows nothing of mixed models, and returns the same
:class:`mixedjax.optimize.Solution` and :class:`mixedjax.optimize.Result` codes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .optimize import Result, Solution


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


def minimize_dfo(fmap: Any, x0: np.ndarray, step0: float = 0.1, ftol: float = 1e-9, maxfev: int = 1000,
                 fd_step: float = 1e-4) -> Solution:
    """Derivative-free trust-region Newton: the Hessian of one quadratic interpolant, gradients by differences.

    ``fmap(points)`` returns ``f`` at a list of points (it may evaluate them concurrently:
    every batch below is independent).

    1. Central differences at ``x₀ ± h eᵢ`` (``h = step0``, one batch of ``2n``) give the
       gradient and the diagonal of the Hessian ``H`` at ``x₀``; the off-diagonal curvature
       is learnt by the updates below (a full quadratic stencil, ``(n+1)(n+2)/2`` points,
       measured no better on InstEval and costs ``n(n−1)/2`` more evaluations).
    2. Each iteration minimises ``gᵀs + ½ sᵀHs`` over ``‖s‖ ≤ Δ`` and evaluates, in one batch,
       ``f(x + s)`` and ``f(x + s + δeᵢ)``.  If ``f`` decreased, the step is taken and the
       gradient there comes from forward differences with the curvature removed,
       ``gᵢ = (f(x + s + δeᵢ) − f(x + s))/δ − ½ Hᵢᵢ δ`` (exact for a quadratic whatever the
       error of ``H``; ``δ = fd_step``); ``H`` then gets a symmetric rank-one update from the
       change of gradient along the step.  ``Δ`` grows or shrinks with the ratio of actual
       to predicted decrease.
    3. It stops when the model, with a difference gradient, predicts a decrease below ``ftol``.

    Near the minimum ``H`` is the Hessian up to the interpolation error and the updates,
    so each step gains a factor of the Hessian's relative error or better; ``n + 1``
    evaluations (one batch) an iteration.  ``grad`` is the last difference gradient.

    Returns a :class:`mixedjax.optimize.Solution` (numpy fields) with the BFGS minimiser's
    result codes: ``CONVERGED`` (predicted decrease below ``ftol``), ``MAX_ITER`` (``maxfev``
    evaluations spent) or ``LINE_SEARCH_FAILED`` (the trust region collapsed without a decrease).

    Examples
    --------
    >>> import numpy as np
    >>> f = lambda x: float((x[0] - 1.0) ** 2 + 10.0 * (x[1] + 0.5) ** 2)
    >>> sol = minimize_dfo(lambda pts: [f(p) for p in pts], np.zeros(2))
    >>> np.round(sol.x, 4).tolist(), Result(sol.result).name
    ([1.0, -0.5], 'CONVERGED')
    """
    n = x0.size
    eye = np.eye(n)
    f0 = float(fmap([x0])[0])  # alone first: it compiles the objective
    fp, fm = np.split(np.asarray(fmap(list(x0 + step0 * eye) + list(x0 - step0 * eye))), 2)
    nf, it, f_start = 2 * n + 1, 0, f0
    g, h = (fp - fm) / (2.0 * step0), np.diag((fp + fm - 2.0 * f0) / step0**2)
    x, f, exact, result, delta = x0, f0, False, Result.MAX_ITER, 1.0

    def with_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        """``f(x)`` and its difference gradient (one batch of ``n + 1`` evaluations)."""
        vals = np.asarray(fmap([x] + [x + fd_step * e for e in eye]))
        return float(vals[0]), (vals[1:] - vals[0]) / fd_step - 0.5 * np.diag(h) * fd_step

    while nf + n < maxfev:
        s = trust_step(g, h, delta)
        pred = -(g @ s + 0.5 * s @ h @ s)
        if pred <= ftol:
            if exact:
                result = Result.CONVERGED
                break
            f, g = with_grad(x)
            exact, nf = True, nf + n + 1
            continue
        fn, gn = with_grad(x + s)
        nf, it = nf + n + 1, it + 1
        ratio = (f - fn) / pred
        ns = np.linalg.norm(s)
        if fn < f:
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
            result = Result.LINE_SEARCH_FAILED
            break
    return Solution(x=x.copy(), value=f, grad=g, x_start=np.asarray(x0, float), value_start=f_start, iterations=it,
                    warm_iterations=0, polish_iterations=0, evaluations=nf, grad_norm=float(np.abs(g).max()),
                    result=int(result))

