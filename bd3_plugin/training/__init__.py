"""Training a BD3-LM: the trainer (AdamW, EMA, clipped noise schedule, resumable state). Its data comes in
as rows of token ids; where they come from is the caller's business (`bd3 train` reads the tiny world
or a text file).
"""
from bd3_plugin._exports import lazy_exports

_EXPORTS = {
    "TrainConfig": "trainer",
    "Trainer": "trainer",
    "loss_fn": "trainer",
    "rows_from_stream": "trainer",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
