"""Prediction from a fitted model, and lme4's tidy conditional modes (``ranef(condVar = TRUE)``).

Population-level predictions are ``x β̂`` with standard errors ``sqrt(x Cov(β̂) xᵀ)``.
Conditional predictions add the random effects of the row's group, ``z b̂_g`` (the
BLUPs); a group, or a level of a nested variance component, that the model has not
seen has no BLUP, so its rows fall back to the population level (lme4's
``allow.new.levels = TRUE``).  New data are coded with the formulaic specs stored at
fit time (``model.designs``), so categorical levels and contrasts match the fit.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import stats

from . import formula as fml

if TYPE_CHECKING:
    from .results import MixedLMResults


def _is_factor_vc(values: np.ndarray) -> bool:
    """A variance component built from a factor's indicators (``0 + C(cask)``): one 1 per row."""
    nz = values != 0
    return bool(np.all((values == 0) | (values == 1)) and np.all(nz.sum(axis=1) <= 1))


def _level_of(column: str) -> str:
    """``C(cask)[a]`` or ``cask[T.a]`` -> ``a``."""
    m = re.search(r"\[(?:T\.)?([^\]]*)\]$", column)
    return m.group(1) if m else column


def lme4_terms(model: Any) -> list[dict]:
    """lme4's random-effects terms of a ``mixedlm`` model, in lme4's order (more levels first).

    Each term: ``group`` (lme4's grouping name, ``cask:batch`` for a nested factor
    component), ``names`` (lme4's column names: ``(Intercept)``, ``Days``), ``kind``
    (``"re"``: the correlated block; ``"vc"``: a variance component), ``index`` (its
    position among the variance components), ``n_levels``.
    """
    st = model.structure
    gname = getattr(model, "group_name", "Group")
    terms = []
    if st.q_re:
        names = ["(Intercept)" if n in ("Group", "Intercept") else n for n in model.exog_re_names]
        if st.re_diagonal:
            for i, n in enumerate(names):
                terms.append({"group": gname, "names": [n], "kind": "re_diag", "index": i,
                              "n_levels": model.n_groups})
        else:
            terms.append({"group": gname, "names": names, "kind": "re", "index": 0, "n_levels": model.n_groups})
    for k, v in enumerate(model._vcs):
        if _is_factor_vc(v.values):
            n_lev = sum(len(nm) for nm in v.names)
            terms.append({"group": f"{v.name}:{gname}", "names": ["(Intercept)"], "kind": "vc", "index": k,
                          "n_levels": n_lev, "factor": True})
        else:
            col = v.names[0][0] if v.names and v.names[0] else v.name
            terms.append({"group": gname, "names": [col], "kind": "vc", "index": k, "n_levels": model.n_groups,
                          "factor": False})
    order = sorted(range(len(terms)), key=lambda i: -terms[i]["n_levels"])  # stable: lme4 sorts by levels
    return [terms[i] for i in order]


def condvar_frame(res: MixedLMResults) -> pd.DataFrame:
    """lme4's ``as.data.frame(ranef(fit, condVar = TRUE))``: ``grpvar, term, grp, condval, condsd``."""
    m = res.model
    b, cov = res._blups
    rows = []
    for t in lme4_terms(m):
        if t["kind"] in ("re", "re_diag"):
            cols = list(range(m.k_re)) if t["kind"] == "re" else [t["index"]]
            for j, name in zip(cols, t["names"], strict=True):
                for g, lab in enumerate(m.group_labels):
                    rows.append((t["group"], name, str(lab), b[g, j], np.sqrt(max(cov[g, j, j], 0.0))))
            continue
        off = m.k_re + sum(v.size for v in m._vcs[: t["index"]])
        v = m._vcs[t["index"]]
        for g, lab in enumerate(m.group_labels):
            for j, col in enumerate(v.names[g]):
                grp = f"{_level_of(col)}:{lab}" if t["factor"] else str(lab)
                rows.append((t["group"], t["names"][0], grp, b[g, off + j], np.sqrt(max(cov[g, off + j, off + j], 0))))
    return pd.DataFrame(rows, columns=["grpvar", "term", "grp", "condval", "condsd"])


def _group_codes(model: Any, groups: pd.Series) -> np.ndarray:
    """Index of each row's group in ``model.group_labels``; -1 for a group the model has not seen."""
    lookup = {lab: i for i, lab in enumerate(model.group_labels)}
    lookup_str = {str(lab): i for i, lab in enumerate(model.group_labels)}
    out = np.empty(len(groups), dtype=int)
    for i, g in enumerate(groups.to_numpy()):
        out[i] = lookup.get(g, lookup_str.get(str(g), -1))
    return out


def predict(res: MixedLMResults, exog: Any = None, conditional: bool = False, se: bool = False,
            alpha: float = 0.05) -> pd.Series | pd.DataFrame:
    """See :meth:`mixedjax.MixedLMResults.predict`."""
    m = res.model
    beta = res.fe_params.to_numpy()
    index = None
    zb = None
    if exog is None:
        x = m.exog
        index = m.data.index if getattr(m, "data", None) is not None and len(m.data) == m.nobs else None
        zb = (res.fittedvalues - x @ beta) if conditional else None
    elif isinstance(exog, pd.DataFrame) and getattr(m, "designs", None):
        data = exog
        index = data.index
        x = fml.design_like(m.designs["fe"], data).to_numpy()
        zb = _conditional_part(res, data) if conditional else None
    else:
        if conditional:
            raise ValueError("conditional predictions need new data as a DataFrame (with the group column) "
                             "and a model built from a formula")
        x = np.atleast_2d(np.asarray(exog, dtype=float))
        if x.shape[1] != len(beta):
            raise ValueError(f"exog has {x.shape[1]} columns; the model has {len(beta)} fixed effects "
                             f"{list(res.fe_params.index)}")
    if x.shape[1] != len(beta):
        raise ValueError(f"the new data give {x.shape[1]} fixed-effects columns; the model has {len(beta)}")
    mean = x @ beta
    if zb is not None:
        mean = mean + zb
    if not se:
        return pd.Series(mean, index=index, name="predicted")
    if conditional:
        raise ValueError("standard errors are available for population-level predictions only "
                         "(conditional=False)")
    sd = np.sqrt(np.einsum("ij,jk,ik->i", x, res.cov_fe, x))
    z = stats.norm.ppf(1 - alpha / 2)
    return pd.DataFrame({"mean": mean, "mean_se": sd, "mean_ci_lower": mean - z * sd,
                         "mean_ci_upper": mean + z * sd}, index=index)


def _conditional_part(res: MixedLMResults, data: pd.DataFrame) -> np.ndarray:
    """``z b̂_g`` per row of new data; 0 for groups (and nested levels) the model has not seen."""
    from .inference import require_grouped

    m = res.model
    require_grouped(res, "conditional prediction")
    gname = m.group_name
    if gname not in data.columns:
        raise ValueError(f"conditional predictions need the group column {gname!r} in the new data")
    codes = _group_codes(m, data[gname])
    known = codes >= 0
    b, _ = res._blups
    out = np.zeros(len(data))
    designs = m.designs or {}
    if m.k_re:
        if designs.get("re") is not None:
            z_re = fml.design_like(designs["re"], data).to_numpy()
        elif m.k_re == 1 and list(m.exog_re_names) == ["Group"]:
            z_re = np.ones((len(data), 1))
        else:
            raise NotImplementedError("conditional prediction for new data needs the random-effects design's "
                                      "formula spec (mixedlm stores it; lmer models do not yet): use mixedlm")
        out[known] += np.einsum("nq,nq->n", z_re[known], b[codes[known], : m.k_re])
    off = m.k_re
    for v in m._vcs:
        spec = designs.get("vc", {}).get(v.name)
        if spec is None:
            raise ValueError(f"the variance component {v.name!r} cannot be rebuilt for new data")
        vdf = fml.design_like(spec, data)
        cols = list(vdf.columns)
        vals = vdf.to_numpy()
        for i in np.flatnonzero(known):
            g = codes[i]
            pos = {c: j for j, c in enumerate(v.names[g])}
            for c_idx, c in enumerate(cols):
                if vals[i, c_idx] != 0 and c in pos:
                    out[i] += vals[i, c_idx] * b[g, off + pos[c]]
        off += v.size
    return out
