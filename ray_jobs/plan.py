"""A sweep as a list of units, one per (checkpoint, task group), each with a deterministic result path.

Pure Python: no Ray, no lm-eval, no torch; planning is testable and instant.
"""
from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parents[1] / "lm_eval_tasks"
RESULT = "result.json"


@dataclass(frozen=True)
class Unit:
    checkpoint: str  # local folder or hub id
    tasks: tuple[str, ...]  # lm-eval task or group names, evaluated together
    model_args: str = ""  # extra --model_args for `bd3`, e.g. "passes=32"
    limit: int | None = None
    batch_size: int = 16

    @property
    def key(self) -> str:
        """A readable, collision-free folder name for this unit."""
        name = Path(self.checkpoint.rstrip("/")).name or self.checkpoint.replace("/", "__")
        digest = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]
        return f"{name}--{'+'.join(self.tasks)}--{digest}"

    def result_path(self, out: Path) -> Path:
        return Path(out) / "units" / self.key / RESULT


def expand_checkpoints(patterns: list[str]) -> list[str]:
    """Folders and globs expand on disk; anything else (a hub id, a path that does not exist, a glob that
    matches no folder) is kept as given, for the checks before the sweep (inputs.py) to name it."""
    out: list[str] = []
    for pattern in patterns:
        matches = sorted(p for p in glob.glob(pattern) if Path(p).is_dir()) if any(c in pattern for c in "*?[") else []
        out += matches or [pattern]
    return list(dict.fromkeys(out))


def plan(checkpoints: list[str], task_groups: list[list[str]], *, model_args: str = "", limit: int | None = None,
         batch_size: int = 16) -> list[Unit]:
    return [Unit(c, tuple(g), model_args, limit, batch_size) for c in expand_checkpoints(checkpoints)
            for g in task_groups]


def status(unit: Unit, out: Path) -> str:
    """'done', 'failed' or 'pending', from the unit's result file."""
    path = unit.result_path(out)
    if not path.is_file():
        return "pending"
    try:
        return "done" if json.loads(path.read_text()).get("status") == "ok" else "failed"
    except ValueError:
        return "pending"  # a torn file is impossible with atomic writes, but would be redone
