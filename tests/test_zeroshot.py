"""The paper's zero-shot protocol: rows from a corpus against the reference's rules written out here, the
request format, the token count, and a rolling task through the real `lm_eval` command."""
import dataclasses
import importlib.util
import json
import math
import pickle
from pathlib import Path

import pytest
import torch

from bd3_plugin.core.checkpoint import load_checkpoint
from bd3_plugin.likelihood.scoring import document_windows
from bd3_plugin.tinyworld.data import checkpoint_path, read_heldout
from bd3_plugin.likelihood.zeroshot import (RECORD_SEPARATOR, ScoredLoglikelihood, corpus_rows, join_records,
    resolve_protocol, rolling_windows)
from early import early_fixture
from helpers import run_lm_eval, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
BOS, EOS = 900, 901


def reference_rows(docs, length):
    """The reference's wrapping, written out: concatenate, drop the remainder, frame each chunk."""
    stream = []
    for d in docs:
        stream.extend(d)
    body = length - 2
    n_rows = len(stream) // body
    return [[BOS] + stream[k * body : (k + 1) * body] + [EOS] for k in range(n_rows)]


@pytest.mark.parametrize("length", [3, 5, 8, 12])
def test_rows_follow_the_reference_rules(length):
    docs = [list(range(100 * i, 100 * i + n)) for i, n in enumerate([1, 7, 3, 0, 12, 5, 2])]  # 30 tokens
    rows = corpus_rows(docs, length, BOS, EOS)
    assert rows == reference_rows(docs, length)
    assert all(len(r) == length and r[0] == BOS and r[-1] == EOS for r in rows)
    assert len(rows) == 30 // (length - 2)
    kept = [t for r in rows for t in r[1:-1]]
    assert kept == [t for d in docs for t in d][: len(kept)]  # in order, nothing skipped but the tail


def test_a_corpus_shorter_than_a_row_has_no_rows_and_the_request_is_refused():
    assert corpus_rows([[1, 2], [3]], 6, BOS, EOS) == []
    tok = word_tokenizer()
    with pytest.raises(ValueError, match="fewer than one row"):
        rolling_windows(join_records(["the cat", "a dog"]), "rows", tok.encode, 16, BOS, EOS)
    with pytest.raises(ValueError, match="length must be >= 3"):
        corpus_rows([[1, 2, 3]], 2, BOS, EOS)


def test_each_record_is_tokenised_on_its_own_and_rows_score_all_but_token_0():
    tok = word_tokenizer()
    records = ["the big cat sees a dog .", "a bird runs", "quickly under the tree .", "the dog sleeps ."]
    text = join_records(records)
    wins, tokens = rolling_windows(text, "rows", tok.encode, 6, BOS, EOS, doc=3)
    ids = [tok.encode(r) for r in records]
    assert [w.ids for w in wins] == reference_rows(ids, 6)
    assert all(w.first == 1 and w.doc == 3 for w in wins)
    assert tokens == len(wins) * 5  # model_length − 1 scored per row, the artificial EOS included
    # Joining the strings instead would glue "runs" and "quickly" into an unknown word.
    assert tok.unk_token_id not in [t for i in ids for t in i]
    assert tok.unk_token_id in tok.encode("".join(records))


def test_documents_protocol_scores_each_record_after_an_end_of_text_token():
    tok = word_tokenizer()
    records = ["the big cat sees a dog .", "", "a bird runs quickly under the tree ."]
    wins, tokens = rolling_windows(join_records(records), "documents", tok.encode, 8, BOS, EOS)
    expected = [w for r in records if r for w in document_windows(tok.encode(r), 8, EOS)]
    assert [(w.ids, w.first) for w in wins] == [(w.ids, w.first) for w in expected]
    assert tokens == sum(len(tok.encode(r)) for r in records)


def test_auto_picks_rows_for_corpora_only():
    assert resolve_protocol("auto", "a" + RECORD_SEPARATOR + "b") == "rows"
    assert resolve_protocol("auto", "one document") == "documents"
    assert resolve_protocol("rows", "one document") == "rows"
    with pytest.raises(ValueError, match="protocol must be one of"):
        resolve_protocol("chunks", "x")
    with pytest.raises(ValueError, match="record separator"):
        join_records(["fine", "not" + RECORD_SEPARATOR + "fine"])


def test_the_scored_loglikelihood_is_a_float_that_keeps_its_token_count():
    x = ScoredLoglikelihood(-12.5, 7)
    y = pickle.loads(pickle.dumps(x))
    assert y == -12.5 and y.tokens == 7 and isinstance(y, float)
    assert json.loads(json.dumps([x])) == [-12.5]


def _detokenize():
    spec = importlib.util.spec_from_file_location("detokenize", ROOT / "lm_eval_tasks/bd3_zeroshot/detokenize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_detokenisers_are_the_references_and_rewrite_nothing_else():
    d = _detokenize()
    assert d.ptb("the N N N firms ' shares were n't sold at $ N a share <unk> 's") == \
        "the 1 1 1 firms' shares weren't sold at $1 a share ?'s"
    assert d.wikitext(" = = Career = = \n The 1 @,@ 000 @-@ year ( old ) tower \n") == \
        " == Career ==\nThe 1,000-year (old) tower\n"
    assert d.lm1b("He said \" go home \" , and left .") == 'He said "go home", and left.'
    assert d.lambada("  \u201chello\u201d she said ") == '\n"hello" she said'
    assert d.scientific("we use @xmath0 as in @xcite .") == "we use @xmath0 as in @xcite ."
    assert d.ag_news("Stocks fall ( Reuters ) \\ more") == "Stocks fall ( Reuters ) \\ more"


def test_adapter_protocol_argument_is_checked():
    from bd3_plugin.evals.lm_eval_adapter import AdapterArgs, BD3ArgsError

    assert AdapterArgs.parse({"pretrained": "x"}).protocol == "auto"
    with pytest.raises(BD3ArgsError, match="protocol must be one of"):
        AdapterArgs.parse({"pretrained": "x", "protocol": "chunks"})


def _exact_row_nll(model, rows: list[list[int]]) -> float:
    """Σ −log p(row[i] | row[:i]) for i ≥ 1 under an L' = 1 model: one forward per position with a mask
    in that position's slot (all rows at once), independent of the NELBO code."""
    x = torch.tensor(rows)
    mask_id, total = model.config.mask_id, 0.0
    for i in range(1, x.shape[1]):
        view = torch.cat([x[:, :i], torch.full((len(rows), 1), mask_id)], dim=1)
        with torch.no_grad():
            logits = model(view)[:, -1].double()
        logits[:, mask_id] = -float("inf")
        total -= torch.log_softmax(logits, -1).gather(1, x[:, i : i + 1]).sum().item()
    return total


N_DOCS = 60  # the first 60 held-out documents: 14 rows


@early_fixture
def rows_task_run(folder):
    """`lm_eval` on the rows task with L' = 1, run early (tests/early.py)."""
    return folder, run_lm_eval("--model", "bd3", "--model_args", f"pretrained={checkpoint_path(1)},greedy_check=False",
                               "--tasks", "synthetic_ppl_rows", "--include_path", ROOT / "lm_eval_tasks", "--metadata",
                               json.dumps({"n_docs": N_DOCS}), "--output_path", folder, cwd=folder)


@pytest.mark.cli
def test_rows_task_through_lm_eval_reports_the_exact_token_perplexity(rows_task_run):
    ckpt = checkpoint_path(1)  # L' = 1: the bound is the exact NLL, so the check is exact
    tmp_path, r = rows_task_run
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(sorted(tmp_path.rglob("results_*.json"))[-1].read_text())["results"]["synthetic_ppl_rows"]

    loaded = load_checkpoint(ckpt)
    tok, length = loaded.tokenizer, loaded.config.model_length
    ids = [tok.encode(d.text + " <eos>", add_special_tokens=False) for d in read_heldout()[:N_DOCS]]
    rows = reference_rows(ids, length)
    rows = [[tok.bos_token_id] + r[1:-1] + [tok.eos_token_id] for r in rows]
    assert len(rows) == sum(map(len, ids)) // (length - 2) > 10
    nll = _exact_row_nll(loaded.model, rows)
    expected = math.exp(nll / (len(rows) * (length - 1)))
    assert res["token_perplexity,none"] == pytest.approx(expected, rel=1e-5)


def test_adapter_scores_a_corpus_in_rows_or_per_document():
    from lm_eval.api.instance import Instance

    from bd3_plugin.evals.lm_eval_adapter import BD3EvalLM
    from bd3_plugin.likelihood.scoring import score_windows
    from bd3_plugin.likelihood.zeroshot import row_windows

    lm = BD3EvalLM(pretrained=str(checkpoint_path(4)), batch_size=8, mc_samples=2)
    records = [d.text + " <eos>" for d in read_heldout()[:40]]
    corpus = join_records(records)

    def rolling(texts, protocol):
        lm.args = dataclasses.replace(lm.args, protocol=protocol)
        return lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i)
                                         for i, t in enumerate(texts)], disable_tqdm=True)

    (rows_ll,) = rolling([corpus], "auto")
    tok = lm.tokenizer
    rows = reference_rows([tok.encode(r, add_special_tokens=False) for r in records], 128)
    rows = [[tok.bos_token_id] + r[1:-1] + [tok.eos_token_id] for r in rows]
    expected = -score_windows(lm.model, row_windows(rows, 0), mc_samples=2, seed=1234).mean(dim=1).sum().item()
    assert rows_ll == pytest.approx(expected, rel=1e-6) and rows_ll.tokens == len(rows) * 127 > 0

    (docs_ll,) = rolling([corpus], "documents")
    per_doc = rolling(records, "documents")
    assert docs_ll == pytest.approx(sum(per_doc), rel=1e-6)
    assert docs_ll.tokens == sum(x.tokens for x in per_doc) == sum(len(tok.encode(r)) for r in records)
