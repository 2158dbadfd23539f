"""`bd3` and its commands, one module each (`add_parser`, `run`), and `common` (the user's-mistake error,
checkpoint arguments). The only layer that composes the integrations (`vllm_backend`, `ray_jobs`), lazily.
"""
from bd3_plugin._exports import lazy_exports

_EXPORTS = {
    "UsageError": "common",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
