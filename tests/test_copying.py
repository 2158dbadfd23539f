"""The copy task's exact probabilities, its correctness check, its entropy and its held-out file."""
import itertools
import math
import random

import pytest

from bd3_plugin.tinyworld.copying import CopyConfig, CopySource, copy_corpus
from bd3_plugin.tinyworld.data import (COPY_HELDOUT, COPY_HELDOUT_SEED, copy_stream_ids, read_copy_heldout,
    write_copy_heldout)
from bd3_plugin.tinyworld.grammar import EOS, build_tokenizer
from early import early_fixture
from helpers import run_lm_eval

SMALL = CopyConfig(n_words=3, separator=("=",), alphabet=("a", "b", "c"))
VOCAB = ("a", "b", "c", "=", EOS)


def test_probabilities_sum_to_one_over_every_sequence_of_the_length():
    """Brute force: every token sequence of a document's length over the whole vocabulary; exactly the
    3³ copies carry probability, each 3⁻³."""
    source = CopySource(SMALL)
    probs = {seq: math.exp(source.log_prob(list(seq)))
             for seq in itertools.product(VOCAB, repeat=SMALL.doc_tokens)}
    assert math.isclose(sum(probs.values()), 1.0, rel_tol=1e-12)
    support = {seq for seq, p in probs.items() if p > 0}
    assert support == {w + ("=",) + w + (EOS,) for w in itertools.product("abc", repeat=3)}
    assert all(math.isclose(probs[s], 1 / 27, rel_tol=1e-12) for s in support)


def test_next_token_distributions_are_distributions():
    source = CopySource()
    doc = source.sample(random.Random(0))
    for i in range(len(doc)):
        dist = source.next_token(doc[:i])
        assert math.isclose(sum(dist.values()), 1.0, rel_tol=1e-12) and doc[i] in dist
    assert source.next_token(doc) == {}
    assert source.next_token(doc[:31] + ["or"]) == {}  # an impossible prefix


def test_log_prob_is_the_list_choice_and_nothing_else():
    source = CopySource()
    doc = source.sample(random.Random(1))
    assert source.log_prob(doc) == pytest.approx(-30 * math.log(96), rel=1e-12)
    assert source.log_prob(doc[:-1]) == -math.inf  # no EOS
    assert source.log_prob(doc + [EOS]) == -math.inf
    swapped = doc[:-3] + [doc[-2], doc[-3], EOS]
    assert doc[-2] == doc[-3] or source.log_prob(swapped) == -math.inf


def test_correctness_against_answers_built_independently():
    """The answer rebuilt from the held-out text by slicing (list = prompt minus its separator), and
    corrupted answers: one wrong word, a missing EOS, a shift, the reversal."""
    source = CopySource()
    for item in read_copy_heldout()[:50]:
        words = item.prompt.split()[:-2]
        assert item.prompt.split()[-2:] == [".", "and"] and len(words) == 30
        assert source.is_correct(item.prompt.split(), words + [EOS])
        assert item.answer == " ".join(words)
        wrong = words.copy()
        wrong[7] = "owl" if wrong[7] != "owl" else "fox"
        for bad in (wrong + [EOS], words, words[1:] + [words[0], EOS], words[::-1] + [EOS]):
            assert bad == words + [EOS] or not source.is_correct(item.prompt.split(), bad)


def test_answer_entropy_is_exactly_zero_and_the_document_carries_the_list():
    source = CopySource()
    for doc in copy_corpus(5, 3, source):
        prompt, _ = source.split(doc)
        assert source.answer_entropy(prompt) == 0.0 <= 0.3
    # Brute force on the small task: H(doc) = −Σ p log p over every document; H(answer | prompt) = H(doc) −
    # H(prompt), with the prompt's distribution summed out of the documents.
    small = CopySource(SMALL)
    docs = [list(w) + ["="] + list(w) + [EOS] for w in itertools.product("abc", repeat=3)]
    h_doc = -sum(math.exp(small.log_prob(d)) * small.log_prob(d) for d in docs)
    prompts: dict[tuple, float] = {}
    for d in docs:
        key = tuple(small.split(d)[0])
        prompts[key] = prompts.get(key, 0.0) + math.exp(small.log_prob(d))
    h_prompt = -sum(p * math.log(p) for p in prompts.values())
    assert h_doc - h_prompt == pytest.approx(0.0, abs=1e-12)
    assert small.doc_entropy_per_token() * SMALL.doc_tokens == pytest.approx(h_doc, rel=1e-12)
    with pytest.raises(ValueError, match="not a prompt"):
        small.answer_entropy(["a", "b", "c", "a"])


def test_heldout_file_is_reproducible_from_its_seed(tmp_path):
    path = tmp_path / "copy.jsonl"
    write_copy_heldout(path, len(read_copy_heldout()), COPY_HELDOUT_SEED)
    assert path.read_text() == COPY_HELDOUT.read_text()
    items = read_copy_heldout(path)
    assert len({i.prompt for i in items}) == len(items) == 200
    train = {" ".join(CopySource().split(d)[0]) for d in copy_corpus(2000, 1000)}
    assert not train & {i.prompt for i in items}  # another seed: no held-out prompt among training ones


def test_training_stream_puts_each_answer_on_a_block_boundary():
    tok = build_tokenizer()
    docs = copy_corpus(4, 0)
    ids = copy_stream_ids(docs, tok)
    assert len(ids) == 4 * 64
    eos = tok.convert_tokens_to_ids(EOS)
    for k in range(4):
        unit = ids[64 * k : 64 * (k + 1)]
        assert unit[0] == eos and unit[63] == eos and eos not in unit[1:63]
        assert unit[1:31] == unit[33:63]  # the copy sits 32 positions after its source


def test_config_is_validated():
    with pytest.raises(ValueError, match="n_words"):
        CopyConfig(n_words=0)
    with pytest.raises(ValueError, match="collide"):
        CopyConfig(alphabet=("a", "b", "="), separator=("=",))
    with pytest.raises(ValueError, match="two distinct"):
        CopyConfig(alphabet=("a", "a"))


@early_fixture
def copy_gen_run(folder):
    """`lm_eval` with the threshold sampler on the bundled L' = 16 copy checkpoint, run early (tests/early.py)."""
    from pathlib import Path

    from bd3_plugin.tinyworld.data import copy_checkpoint_path

    root = Path(__file__).resolve().parents[1]
    return folder, run_lm_eval("--model", "bd3", "--model_args",
                               f"pretrained={copy_checkpoint_path(16)},algorithm=threshold,threshold=0.9",
                               "--tasks", "copy_gen", "--include_path", root / "lm_eval_tasks", "--limit", 8,
                               "--batch_size", 8, "--output_path", folder, "--log_samples", cwd=folder)


@pytest.mark.cli
def test_copy_gen_task_through_the_lm_eval_cli(copy_gen_run):
    """The real `lm_eval` command: the task's `exact` equals the correctness of the logged completions checked
    here against the held-out answers."""
    import json

    tmp_path, r = copy_gen_run
    assert r.returncode == 0, r.stderr[-3000:]
    exact = json.loads(next(tmp_path.rglob("results_*.json")).read_text())["results"]["copy_gen"]["exact,none"]
    samples = [json.loads(line) for f in tmp_path.rglob("samples_copy_gen_*.jsonl") for line in f.open()]
    answers = {i.prompt: i.answer for i in read_copy_heldout()}
    mine = [s["resps"][0][0].strip() == answers[s["doc"]["prompt"]] for s in samples]
    assert len(mine) == 8 and exact == pytest.approx(sum(mine) / 8)
    assert exact >= 0.75


def test_world_refuses_a_bad_threshold_in_one_line(capsys):
    from bd3_plugin.cli.main import main

    assert main(["world", "--threshold", "2"]) == 2
    assert capsys.readouterr().err.strip() == "bd3 world: error: --threshold must lie in (0, 1], got 2.0"
    assert main(["train", "--out", "x", "--block-size", "4", "--source", "copy", "--data", "README.md"]) == 2
    assert "applies to --data synthetic only" in capsys.readouterr().err
