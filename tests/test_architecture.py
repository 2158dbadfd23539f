"""The layers of docs/ARCHITECTURE.md hold (import-linter contracts in pyproject.toml), and every command line
refuses abbreviated options and states each option's default."""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bd3_plugin.cli.main import build_parser, main
from ray_jobs.cli import build_parser as sweep_parser

ROOT = Path(__file__).resolve().parent.parent
LINT = str(Path(sys.executable).parent / "lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": ""})


def test_import_contracts_hold():
    run = _lint(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("bd3_plugin/core/masks.py", "from bd3_plugin.sampling import generate", "bd3_plugin is layered"),
    ("bd3_plugin/sampling/denoise.py", "from bd3_plugin.likelihood import nelbo", "bd3_plugin is layered"),
    ("bd3_plugin/likelihood/noise.py", "import vllm_backend.server.fields", "outside cli imports vllm_backend"),
    ("bd3_plugin/evals/genppl.py", "import ray", "only ray_jobs imports ray"),
    ("ray_jobs/plan.py", "import vllm", "only vllm_backend imports vllm"),
    ("ray_jobs/merge.py", "import ray_jobs.collect", "ray_jobs is layered"),
])
def test_a_wrong_import_is_caught(tmp_path, module, line, contract):
    """Negative control: the same check on a copy of the packages with one wrong import breaks the contract."""
    for package in ("bd3_plugin", "vllm_backend", "ray_jobs"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("checkpoints", "data",
                                                                                          "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}\n")
    run = _lint(tmp_path)
    assert run.returncode != 0
    broken = run.stdout.split("Broken contracts")[-1]
    assert contract in broken, run.stdout


def _parsers():
    """Every parser of `bd3` (and its subcommands) and of `bd3-sweep`, by name."""
    top = build_parser()
    yield "bd3", top
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    yield from ((f"bd3 {name}", p) for name, p in sub.choices.items())
    yield "bd3-sweep", sweep_parser()


@pytest.mark.parametrize("name, parser", list(_parsers()), ids=[n for n, _ in _parsers()])
def test_no_abbreviations_and_every_default_stated(name, parser):
    assert parser.allow_abbrev is False, name
    text = parser.format_help()
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.dest == "help":
            continue
        flag = isinstance(action, argparse._StoreTrueAction)
        if flag or action.required:
            assert action.help, f"{name} {action.option_strings[0]} has no help"
        else:
            helped = parser._get_formatter()._get_help_string(action) % {"default": action.default}
            assert "default" in helped, f"{name} {action.option_strings[0]}: its help states no default"
    assert "--" in text


def test_an_abbreviated_option_is_refused(tmp_path, capsys, monkeypatch):
    """`--samples` is not `--samples-out`: the command stops with a usage error and writes nothing."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["genppl", "--scorer", "source", "--samples", "32"])
    assert stop.value.code == 2
    assert "unrecognized arguments: --samples" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        sweep_parser().parse_args(["--check", "x"])
