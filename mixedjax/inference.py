"""Post-estimation inference on a fitted model (mixed into :class:`mixedjax.MixedLMResults`).

Wald tests, likelihood-ratio tests, small-sample degrees of freedom, profile
likelihood, parametric bootstrap and prediction live here, as methods of
:class:`InferenceMixin`; ``results.py`` keeps the estimates themselves.
"""

from __future__ import annotations


class InferenceMixin:
    """Inference methods of :class:`mixedjax.MixedLMResults`."""
