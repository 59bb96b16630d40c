"""Structured residuals through the inference features: named parameters, standard errors against nlme.

nlme's ``intervals()`` of a ``lme`` fit are Wald intervals on a transformed scale (log sd, log sd ratio,
Fisher's z of φ) from its ``apVar``, the inverse information of the (restricted) likelihood with β
profiled; mixedjax's ``bse`` of the same parameters (natural scale, delta method back to nlme's scale)
must give the same intervals.  Reference: ``tests/reference/nlme_intervals.json`` (nlme 3.1-162,
``make_nlme_intervals.R``).
"""

from __future__ import annotations

import json
import pathlib
import warnings

import numpy as np
import pytest

import mixedjax

REF = json.loads((pathlib.Path(__file__).parent / "reference" / "nlme_intervals.json").read_text())["cases"]
Z = 1.959963984540054


def _fit(kind: str, reml: bool) -> mixedjax.MixedLMResults:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mixedjax.ConvergenceWarning)
        if kind == "orthodont_varident":
            d = mixedjax.datasets.load("orthodont")
            return mixedjax.mixedlm("distance ~ age + Sex", d, groups="Subject",
                                    residual=mixedjax.VarIdent("Sex")).fit(reml=reml)
        d = mixedjax.datasets.load("oxboys")
        return mixedjax.mixedlm("height ~ age", d, groups="Subject", residual=mixedjax.AR1(time="age")).fit(reml=reml)


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_varident_intervals_match_nlme(method):
    r = _fit("orthodont_varident", method == "reml")
    iv = REF[f"orthodont_varident_{method}"]["intervals"]
    assert list(r.params.index[-2:]) == ["Group Var", "sd ratio Female"]
    d, se = r.params["sd ratio Female"], r.bse["sd ratio Female"]
    got = np.exp(np.log(d) + np.array([-Z, Z]) * se / d)  # nlme: Wald on log(ratio)
    want = [iv["varStruct"]["lower"][0], iv["varStruct"]["upper"][0]]
    # nlme's apVar is a finite-difference Hessian; the agreement measured is 4e-5
    np.testing.assert_allclose(got, want, rtol=5e-4)
    var, se_var = r.params["Group Var"] * r.scale, r.bse_re["Group Var"]
    got_sd = np.sqrt(var) * np.exp(np.array([-Z, Z]) * se_var / (2 * var))  # Wald on log(sd)
    sub = iv["reStruct"]["Subject"]
    np.testing.assert_allclose(got_sd, [sub["lower"][0], sub["upper"][0]], rtol=5e-4)


def test_ar1_phi_interval_matches_nlme():
    r = _fit("oxboys_ar1", False)
    iv = REF["oxboys_ar1_ml"]["intervals"]["corStruct"]
    phi, se = r.params["Phi"], r.bse["Phi"]
    got = np.tanh(np.arctanh(phi) + np.array([-Z, Z]) * se / (1 - phi**2))  # Wald on Fisher's z
    np.testing.assert_allclose(got, [iv["lower"][0], iv["upper"][0]], rtol=1e-4)
    # the random intercept is on the boundary: its standard error is NaN, φ's is not
    assert r.singular and np.isnan(r.bse_re["Group Var"]) and np.isfinite(r.bse_re["Phi"])


@pytest.mark.parametrize("kind", ["orthodont_varident", "oxboys_ar1"])
def test_residual_parameters_are_named_entries_everywhere(kind):
    r = _fit(kind, True)
    names = r.model.residual_param_names
    assert names and list(r.params.index[-len(names):]) == names
    assert list(r.cov_params().index[-len(names):]) == names and list(r.bse.index[-len(names):]) == names
    assert abs(r.model.loglike(r.params) - r.llf) < 1e-8
