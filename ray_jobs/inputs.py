"""What a sweep checks before any Ray cluster starts or is joined: task names, local checkpoints and the
`bd3` model args. Each is read by the code a unit would read it with (lm-eval's task index, the checkpoint
reader, lm-eval's argument parser and the adapter's own checks), so a mistake is one line at once instead
of a failed unit per checkpoint after the cluster is up. Hub ids are left to their units: checking them
would mean a download."""
from __future__ import annotations

from pathlib import Path

# Model args the sweep passes itself: lm-eval would refuse a second batch_size or device, and a second
# pretrained would silently evaluate another checkpoint than the unit's name says.
SET_BY_SWEEP = {"pretrained": "--checkpoints", "batch_size": "--batch-size", "device": "--gpus-per-unit"}


class InputError(ValueError):
    """A sweep that must not start; the message is one line for the user."""


def unknown_tasks(groups: list[list[str]]) -> list[str]:
    """Names lm-eval does not know."""
    from ray_jobs.unit import task_manager

    names = sorted({t for g in groups for t in g})
    manager = task_manager(tuple(names))
    return [t for t in names if t not in manager.all_tasks]


def local_configs(checkpoints: list[str]) -> dict:
    """{checkpoint: its BD3Config} for every checkpoint that is not a hub id; raises InputError naming every
    missing folder, file in the way and unreadable or non-BD3 config.json."""
    from bd3_plugin.core.checkpoint import checkpoint_folder, is_hub_id, read_config

    configs = {}
    problems = []
    for name in checkpoints:
        if is_hub_id(name) and not Path(name).expanduser().exists():
            continue
        try:
            configs[name] = read_config(checkpoint_folder(name))
        except (ValueError, OSError) as err:  # CheckpointError and ConfigError are ValueErrors
            problems.append(f"{name}: {err}" if name not in str(err) else str(err))
    if problems:
        raise InputError("; ".join(problems))
    return configs


def check_model_args(model_args: str, checkpoints: list[str], configs: dict, batch_size: int) -> None:
    """The args a unit passes to `bd3`, parsed as lm-eval parses them and checked by the adapter; with a
    local checkpoint's config also the checks that need it (block size, passes of `exact`)."""
    from lm_eval.utils import simple_parse_args_string

    from bd3_plugin.evals.lm_eval_adapter import checked_args, scoring_config

    kwargs = simple_parse_args_string(model_args)
    clash = [f"{key} (set by {flag})" for key, flag in SET_BY_SWEEP.items() if key in kwargs]
    if clash:
        raise InputError(f"--model-args must not set {', '.join(clash)}")
    try:  # the checkpoint's name changes none of these checks
        args = checked_args({"pretrained": checkpoints[0], **kwargs, "batch_size": batch_size})
    except ValueError as err:
        raise InputError(f"--model-args {model_args!r}: {err}") from None
    for name, config in configs.items():
        try:
            scoring_config(args, config)
        except ValueError as err:
            raise InputError(f"--model-args {model_args!r} with {name}: {err}") from None


def check_inputs(checkpoints: list[str], groups: list[list[str]], model_args: str, batch_size: int) -> None:
    """Everything a sweep can check without Ray, cheapest first; raises InputError."""
    if not checkpoints:
        raise InputError("no checkpoints")
    if not all(groups):
        raise InputError("an empty task group")
    configs = local_configs(checkpoints)
    check_model_args(model_args, checkpoints, configs, batch_size)
    unknown = unknown_tasks(groups)
    if unknown:
        raise InputError(f"unknown task(s): {', '.join(unknown)} (not in lm-eval or lm_eval_tasks/)")
