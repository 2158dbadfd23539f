"""Block Diffusion language models (BD3-LMs) for lm-eval, vLLM and Ray.

Importing the package is cheap: torch and the model load only when a submodule is used.
"""
__version__ = "0.1.0"
