"""Likelihood bounds: the masking process, the NELBO's estimators (exact, stratified, Monte Carlo; one
dispatch, `nelbo_estimates`), whole-document scoring in rolling windows, and the paper's zero-shot protocol.
"""
from bd3_plugin._exports import lazy_exports

_EXPORTS = {
    "Estimator": "estimators",
    "choose_estimator": "estimators",
    "check_fits": "estimators",
    "nelbo_terms": "nelbo",
    "nelbo_estimates": "nelbo",
    "default_eligible": "nelbo",
    "score_documents": "scoring",
    "score_windows": "scoring",
    "report": "scoring",
    "NelboReport": "scoring",
    "sample_t": "noise",
    "mask_tokens": "noise",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
