"""A sweep as a list of units, one per (checkpoint, task group) or, sharded, one per (checkpoint, task group,
shard of the documents), each with a deterministic result path.

Pure Python: no Ray, no lm-eval, no torch; planning is testable and instant.
"""
from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import asdict, dataclass, replace
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
    shard: int = 0  # which part of every task's documents (`shard_range`) this unit evaluates
    shards: int = 1  # 1: the whole tasks, with lm-eval's own metrics; more: per-document results to merge

    def __post_init__(self) -> None:
        if not 0 <= self.shard < self.shards:
            raise ValueError(f"shard must be in [0, shards={self.shards}), got {self.shard}")

    @property
    def whole(self) -> "Unit":
        """The unsharded unit this shard is part of (itself when unsharded)."""
        return replace(self, shard=0, shards=1)

    @property
    def key(self) -> str:
        """A readable, collision-free folder name for this unit; the shards of a unit share its prefix."""
        name = Path(self.checkpoint.rstrip("/")).name or self.checkpoint.replace("/", "__")
        fields = asdict(self)
        del fields["shard"], fields["shards"]  # an unsharded unit keeps the key it had before sharding
        digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
        base = f"{name}--{'+'.join(self.tasks)}--{digest}"
        return base if self.shards == 1 else f"{base}--shard{self.shard + 1}of{self.shards}"

    def result_path(self, out: Path) -> Path:
        return Path(out) / "units" / self.key / RESULT


def shard_range(n_docs: int, shard: int, shards: int) -> range:
    """The document indices of one shard: contiguous, the shards' sizes differing by at most one, every
    index in exactly one shard; with more shards than documents some shards are empty."""
    return range(shard * n_docs // shards, (shard + 1) * n_docs // shards)


def split(unit: Unit, shards: int) -> list[Unit]:
    """The unit as `shards` shard units (itself alone for 1)."""
    if shards < 1:
        raise ValueError(f"shards must be a positive integer, got {shards}")
    return [replace(unit, shard=i, shards=shards) for i in range(shards)] if shards > 1 else [unit]


def expand_checkpoints(patterns: list[str]) -> list[str]:
    """Folders and globs expand on disk; anything else (a hub id, a path that does not exist, a glob that
    matches no folder) is kept as given, for the checks before the sweep (inputs.py) to name it."""
    out: list[str] = []
    for pattern in patterns:
        matches = sorted(p for p in glob.glob(pattern) if Path(p).is_dir()) if any(c in pattern for c in "*?[") else []
        out += matches or [pattern]
    return list(dict.fromkeys(out))


def plan(checkpoints: list[str], task_groups: list[list[str]], *, model_args: str = "", limit: int | None = None,
         batch_size: int = 16, shards: int = 1) -> list[Unit]:
    return [s for c in expand_checkpoints(checkpoints) for g in task_groups
            for s in split(Unit(c, tuple(g), model_args, limit, batch_size), shards)]


def status(unit: Unit, out: Path) -> str:
    """'done', 'failed' or 'pending', from the unit's result file."""
    path = unit.result_path(out)
    if not path.is_file():
        return "pending"
    try:
        return "done" if json.loads(path.read_text()).get("status") == "ok" else "failed"
    except ValueError:
        return "pending"  # a torn file is impossible with atomic writes, but would be redone
