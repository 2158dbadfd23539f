"""RL post-training: exact re-scoring of recorded rollouts with gradients (`score_trajectory`), the
EGSPO-style objective and update, and the core's rollout engine.
"""
from bd3_plugin._exports import lazy_exports

_EXPORTS = {
    "score_trajectory": "trajectory_scoring",
    "RLConfig": "egspo",
    "build_batch": "egspo",
    "update": "egspo",
    "CoreEngine": "engines",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
