"""The real `lm_eval` command with `--model bd3` on a bundled checkpoint and the local synthetic tasks; both runs
start early (tests/early.py)."""
import json
import math
from pathlib import Path

import pytest

from bd3_plugin.tinyworld.data import HELDOUT, checkpoint_path, read_heldout
from early import early_fixture
from helpers import run_lm_eval

ROOT = Path(__file__).resolve().parents[1]


@early_fixture
def lm_eval_run(folder):
    """One `lm_eval --model bd3` run, three tasks, started early (tests/early.py)."""
    return folder, run_lm_eval("--model", "bd3", "--model_args", f"pretrained={checkpoint_path(4)},mc_samples=4",
                               "--tasks", "synthetic_ppl,synthetic_mc,synthetic_gen", "--include_path",
                               ROOT / "lm_eval_tasks", "--limit", 100, "--batch_size", 16, "--output_path", folder,
                               "--log_samples", cwd=folder)


@pytest.fixture(scope="module")
def results(lm_eval_run):
    out, r = lm_eval_run
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(out.rglob("results_*.json"))
    assert files, r.stdout[-2000:]
    return json.loads(files[-1].read_text())["results"], r.stdout, out


@pytest.mark.cli
def test_perplexity_task_reports_the_bound_next_to_the_truth(results):
    res, stdout, out = results
    ppl = res["synthetic_ppl"]
    docs = read_heldout(HELDOUT)[:100]
    truth = math.exp(-sum(d.logprob for d in docs) / sum(d.tokens for d in docs))
    assert ppl["true_word_perplexity,none"] == pytest.approx(truth, rel=1e-9)
    samples = sorted((json.loads(line) for f in out.rglob("samples_synthetic_ppl_*.jsonl") for line in f.open()),
                     key=lambda s: s["doc_id"])
    bounds = [float(s["resps"][0][0]) for s in samples]
    # The task's number is these documents' bounds pooled per token.
    assert math.exp(-sum(bounds) / sum(d.tokens for d in docs)) == pytest.approx(ppl["word_perplexity,none"], rel=1e-6)
    # Per document, log p(doc) − bound ≥ 0 in expectation (KL ≥ 0 plus the bound's gap): no significant
    # undercut of the truth, counting document and Monte Carlo noise.
    gaps = [d.logprob - b for d, b in zip(docs, bounds)]
    mean = sum(gaps) / len(gaps)
    sd = math.sqrt(sum((g - mean) ** 2 for g in gaps) / (len(gaps) - 1))
    assert mean >= -3 * sd / math.sqrt(len(gaps)) and ppl["word_perplexity,none"] < 1.5 * truth
    assert "synthetic_ppl" in stdout and "word_perplexity" in stdout


@pytest.mark.cli
def test_multiple_choice_beats_chance(results):
    assert results[0]["synthetic_mc"]["acc,none"] >= 0.65


@pytest.mark.cli
def test_generations_are_mostly_valid(results):
    assert results[0]["synthetic_gen"]["valid,none"] >= 0.5


@early_fixture
def bad_model_args_run(folder):
    return run_lm_eval("--model", "bd3", "--model_args", f"pretrained={checkpoint_path(4)},foo=1", "--tasks",
                       "synthetic_ppl", "--include_path", ROOT / "lm_eval_tasks", "--limit", 2, cwd=folder)


@pytest.mark.cli
def test_bad_model_args_are_one_line(bad_model_args_run):
    r = bad_model_args_run
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: bd3 model_args: unknown key(s) foo")
