"""`bd3 info | nelbo | sample` against the library, and each user's mistake as one line and exit status 2.

The commands run in this process through `main(argv)` (what the console script calls); one test runs the
installed `bd3` console script itself."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bd3_plugin.cli.main import main
from bd3_plugin.core.checkpoint import load_checkpoint, save_checkpoint
from bd3_plugin.likelihood.estimators import Estimator
from bd3_plugin.likelihood.scoring import report, score_documents
from helpers import random_model, tiny_config, word_tokenizer

TEXT = "the cat sees a dog . the big dog runs over the tree , and a small bird sleeps . " * 3
BD3 = str(Path(sys.executable).with_name("bd3"))


@pytest.fixture
def bd3(capsys):
    """`bd3 ARGS` in this process: its exit status, stdout and stderr."""
    def run(*args):
        capsys.readouterr()  # what earlier calls printed
        rc = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=rc, stdout=out, stderr=err)

    return run


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(random_model(), path, tokenizer=word_tokenizer())
    return path


@pytest.mark.cli
def test_info_through_the_console_script(ckpt):
    r = subprocess.run([BD3, "info", str(ckpt), "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (info["block_size"], info["model_length"], info["mask_id"]) == (4, 32, 22)
    assert "model.safetensors" in info["files"] and "tokenizer.json" in info["files"]


def test_nelbo_matches_the_library(bd3, ckpt, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    r = bd3("nelbo", ckpt, "--text-file", text, "--mc-samples", 3, "--seed", 4, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    c = load_checkpoint(ckpt)
    ids = c.encode(TEXT)
    expect = report(score_documents(c.model, [ids], bos_id=None, mc_samples=3, seed=4), len(ids))
    assert out["tokens"] == len(ids) == 60
    assert out["nll_per_token"] == pytest.approx(expect.nll_per_token, rel=1e-5)
    assert out["ppl_bound"] == pytest.approx(torch.tensor(expect.nll_per_token).exp().item(), rel=1e-5)
    assert out["mc_stderr"] > 0


def test_nelbo_estimators(bd3, ckpt, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    c = load_checkpoint(ckpt)
    ids = c.encode(TEXT)
    r = bd3("nelbo", ckpt, "--text-file", text, "--estimator", "stratified", "--passes", 5, "--seed", 4, "--json")
    assert r.returncode == 0, r.stderr
    expect = score_documents(c.model, [ids], bos_id=None, estimator=Estimator("stratified", 5), seed=4).item()
    assert json.loads(r.stdout)["nll_per_token"] == pytest.approx(expect / len(ids), rel=1e-5)
    # The default (auto, 16 passes) enumerates L' = 4 blocks: the bound itself, whatever the seed.
    a, b = (json.loads(bd3("nelbo", ckpt, "--text-file", text, "--seed", s, "--json").stdout) for s in (1, 2))
    assert a["nll_per_token"] == b["nll_per_token"] and a["estimator"] == "auto/16" and a["mc_stderr"] is None


def test_sample(bd3, ckpt):
    r = bd3("sample", ckpt, "--prompt", "the cat", "--max-new-tokens", 9, "--algorithm", "threshold",
            "--num-samples", 2, "--seed", 1, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    c = load_checkpoint(ckpt)
    for s in out["samples"]:
        assert s["text"] == c.decode(s["tokens"]) and 0 < len(s["tokens"]) <= 9
    assert out["forward_passes"] == out["denoise_passes"] + out["commit_passes"]
    again = json.loads(bd3("sample", ckpt, "--prompt", "the cat", "--max-new-tokens", 9, "--algorithm",
                           "threshold", "--num-samples", 2, "--seed", 1, "--json").stdout)
    assert again["samples"] == out["samples"]


def test_sample_top_k_reaches_the_sampler(bd3, ckpt):
    """--top-k 1 makes every threshold proposal certain (probability 1 after the filter), so the text is the
    core's with top_k 1 whatever the random draws."""
    from bd3_plugin.sampling.config import SamplerConfig
    from bd3_plugin.sampling.generate import generate
    from bd3_plugin.core.generators import seeded_generators

    r = bd3("sample", ckpt, "--prompt", "the cat", "--max-new-tokens", 9, "--algorithm", "threshold",
            "--top-k", 1, "--seed", 3, "--json")
    assert r.returncode == 0, r.stderr
    c = load_checkpoint(ckpt)
    cfg = SamplerConfig(algorithm="threshold", max_new_tokens=9, temperature=1.0, top_k=1)
    expect = generate(c.model, [c.encode("the cat")], cfg, seeded_generators([12345]),
                      eos_id=c.eos_id).generations[0].tokens
    assert json.loads(r.stdout)["samples"][0]["tokens"] == expect


def _one_line_error(r, needle):
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_bad_input_gives_one_line(bd3, ckpt, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    _one_line_error(bd3("nelbo", ckpt, "--text-file", tmp_path / "nope.txt"), "no such text file")
    _one_line_error(bd3("nelbo", ckpt, "--text-file", empty), "is empty")
    _one_line_error(bd3("nelbo", ckpt, "--estimator", "bogus"), "estimator must be one of")
    _one_line_error(bd3("nelbo", ckpt, "--passes", 0), "passes must be a positive integer")
    _one_line_error(bd3("nelbo", ckpt, "--estimator", "exact", "--mc-samples", 2), "mc_samples applies to the mc")
    _one_line_error(bd3("nelbo", ckpt, "--estimator", "exact", "--passes", 3), "exact needs 15 passes")
    _one_line_error(bd3("info", tmp_path / "missing"), "no checkpoint folder")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _one_line_error(bd3("info", bad), "not a BD3-LM config")
    (bad / "config.json").write_text(json.dumps(tiny_config().to_dict() | {"block_size": 5}))
    _one_line_error(bd3("sample", bad), "block_size 5 does not divide model_length 32")
    _one_line_error(bd3("sample", ckpt, "--top-p", 0), "top_p must lie in (0, 1]")
    _one_line_error(bd3("sample", ckpt, "--top-k", -1), "top_k must be an integer >= 0")
