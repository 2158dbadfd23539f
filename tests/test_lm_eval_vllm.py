"""The real `lm_eval --model vllm` on a bundled BD3 checkpoint: generation tasks run through vLLM's engine;
a loglikelihood task ends the run with one line that points to `--model bd3`. Both runs start early
(tests/early.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bd3_plugin.core.checkpoint import load_checkpoint
from bd3_plugin.tinyworld.data import checkpoint_path
from bd3_plugin.tinyworld.grammar import Source, text_words
from early import early_fixture

pytest.importorskip("vllm")
from vllm_backend.server.validate import LOGLIKELIHOOD_HINT  # noqa: E402
pytestmark = [pytest.mark.engine, pytest.mark.cli]
ROOT = Path(__file__).resolve().parents[1]
LM_EVAL = str(Path(sys.executable).with_name("lm_eval"))
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "VLLM_CPU_KVCACHE_SPACE": "1"}


def lm_eval_vllm(*args, cwd):
    model_args = f"pretrained={checkpoint_path(4)},max_model_len=128,seed=0"
    return subprocess.run([LM_EVAL, "--model", "vllm", "--model_args", model_args, "--include_path",
                           str(ROOT / "lm_eval_tasks"), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=ENV, timeout=600)


@early_fixture
def generation_run(folder):
    return folder, lm_eval_vllm("--tasks", "synthetic_gen", "--limit", 6, "--output_path", folder, "--log_samples",
                                cwd=folder)


@early_fixture
def loglikelihood_run(folder):
    return lm_eval_vllm("--tasks", "synthetic_mc", "--limit", 2, cwd=folder)


def test_generation_task_runs_through_the_engine(generation_run):
    tmp_path, r = generation_run
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(sorted(tmp_path.rglob("results_*.json"))[-1].read_text())
    assert results["config"]["model"] == "vllm"
    samples = [json.loads(line) for line in sorted(tmp_path.rglob("samples_synthetic_gen_*.jsonl"))[-1].open()]
    assert len(samples) == 6
    mask = load_checkpoint(checkpoint_path(4)).tokenizer.mask_token
    source, valid = Source(), []
    for s in samples:
        (completion,) = s["filtered_resps"]
        assert completion.strip() and mask not in completion  # decoded blocks, never a leftover MASK
        valid.append(float(source.is_valid(text_words(s["doc"]["prompt"] + " " + completion))))
    # the reported metric is the grammar's verdict on exactly these generations
    assert results["results"]["synthetic_gen"]["valid,none"] == pytest.approx(sum(valid) / len(valid))


def test_loglikelihood_task_ends_with_one_line_pointing_to_the_bd3_model(loglikelihood_run):
    r = loglikelihood_run
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.splitlines()
    ours = [i for i, line in enumerate(lines) if "error:" in line]
    assert len(ours) == 1, r.stderr[-3000:]
    line = lines[ours[0]]  # tqdm may share the line: its bar is not newline-terminated
    assert line[line.index("error:"):] == f"error: {LOGLIKELIHOOD_HINT}" and "--model bd3" in line
    # after it only the progress bar's last redraw and interpreter shutdown (no error, no traceback)
    assert not any(w in rest for rest in lines[ours[0] + 1 :] for w in ("Error", "Exception", "error"))
