"""Front ends for evaluation: the lm-eval model type `bd3` and its registration, generative perplexity,
and the causal LM that judges it. Importing this package is free (the lm-eval start-up hook does it).
"""
from bd3_plugin._exports import lazy_exports

_EXPORTS = {
    "BD3EvalLM": "lm_eval_adapter",
    "generative_perplexity": "genppl",
    "GenPPLConfig": "genppl",
    "CausalLMScorer": "causal_scoring",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
