"""No commit pass in the vLLM backend: the clean K/V of block b is written by the first pass over block b+1,
further passes run over the denoised rows only, and a request that ends needs no extra pass. Checked
through vLLM's real engine (one engine per case, in the session's engine process: tests/vllm_fusion_worker.py)
against the core model's block-causal forward and the core sampler."""
import pytest
import torch

from bd3_plugin.core.checkpoint import load_checkpoint
from bd3_plugin.sampling.config import SamplerConfig
from bd3_plugin.sampling.generate import generate
from bd3_plugin.core.generators import seeded_generators
from bd3_plugin.tinyworld.data import checkpoint_path

pytestmark = pytest.mark.engine
TEXTS = ["<eos> the old cow", "<eos> some ships run . a", "<eos>"]  # 4, 6 and 1 tokens: tails 0, 2 and 1


def run_worker(engines, tmp_path, block_size: int, spec: dict) -> list[dict]:
    out = tmp_path / "runs.pt"
    engines.run("fusion", spec | {"checkpoint": str(checkpoint_path(block_size)), "out": str(out)})
    return torch.load(out)


def core_tokens(ckpt, request: dict) -> list[int]:
    cfg = SamplerConfig(algorithm=request["algorithm"], temperature=request["temperature"],
                        max_new_tokens=request["max_tokens"], stop_at_eos=False)
    return generate(ckpt.model, [request["prompt"]], cfg, seeded_generators([request["seed"]])).generations[0].tokens


def reference_logits(ckpt, sequence: list[int], call: dict) -> torch.Tensor:
    """The core model's block-causal forward over the clean sequence up to the block, then the block as
    the runner held it: the block's logits (L', V)."""
    (start,), block = call["positions"], call["block"][0]
    ids = torch.tensor(sequence[:start] + block.tolist())[None]
    with torch.no_grad():
        return ckpt.model(ids)[0, start:].float()


def max_error(ckpt, request: dict, tokens: list[int], calls: list[dict]) -> list[float]:
    """Per call, over the slots the sampler read, the largest difference from the core's logits relative to the largest logit (at least 1):
    float32 rounding in vLLM's attention and the core's grows with the sequence, about 1e-6 of the logits."""
    sequence = request["prompt"] + tokens
    errors = []
    for c in calls:
        want = reference_logits(ckpt, sequence, c)
        read = torch.ones(len(want), dtype=torch.bool) if c["read"] is None else c["read"][0].cpu()
        assert read.any()  # the slots the sampler reads are the ones the runner must get right
        want, got = want[read], c["logits"][0][read]
        errors.append(float((want - got).abs().max() / want.abs().max().clamp(min=1)))
    return errors


def test_fused_first_pass_writes_the_clean_kv_of_the_previous_block(engines, tmp_path):
    """Every logits call of a request, first pass of a step or a pass over its block alone, equals the
    core's block-causal forward over the clean sequence within 1e-5 (relative to the largest logit): the previous block's K/V in the
    paged cache is the clean one, though no pass committed it. Without the recompute it is not."""
    ckpt = load_checkpoint(checkpoint_path(4))
    runs = [[{"prompt": ckpt.encode(t), "algorithm": "first_hitting", "temperature": 1.0, "max_tokens": 13,
              "seed": 3}] for t in TEXTS]
    fused = run_worker(engines, tmp_path, 4, {"runs": runs})
    for run, got in zip(runs, fused):
        assert got["tokens"] == [core_tokens(ckpt, run[0])]
        errors = max_error(ckpt, run[0], got["tokens"][0], got["calls"])
        assert len(errors) > 8 and max(errors) < 1e-5, errors
    stale = run_worker(engines, tmp_path, 4, {"runs": runs, "fuse": False})
    for run, got in zip(runs, stale):
        # the first block step reads only the prefill's K/V; every later one reads a block left noisy
        later = [e for c, e in zip(got["calls"], max_error(ckpt, run[0], got["tokens"][0], got["calls"]))
                 if c["positions"][0] >= len(run[0]["prompt"]) + 4]
        assert later and min(later) > 1e-4, later


def test_first_hitting_needs_one_pass_per_token_and_no_pass_after_the_last_block(engines, tmp_path):
    """First-hitting reveals one token per pass: after the prompt's prefill (one pass), a request needs
    exactly one pass per masked slot it decodes, so one per token when it ends on a block boundary; a
    request cut by max_tokens inside its last block stops there, with no commit or other extra pass."""
    ckpt = load_checkpoint(checkpoint_path(4))
    runs = []
    for text in TEXTS:
        prompt = ckpt.encode(text)
        aligned = 16 - len(prompt) % 4 if len(prompt) % 4 else 16  # ends on a block boundary
        runs += [[{"prompt": prompt, "algorithm": "first_hitting", "temperature": t, "max_tokens": n, "seed": 9}]
                 for n in (aligned, aligned - 2) for t in (0.0, 1.0)]
    for run, got in zip(runs, run_worker(engines, tmp_path, 4, {"runs": runs})):
        request = run[0]
        assert got["tokens"] == [core_tokens(ckpt, request)]
        end = len(request["prompt"]) + request["max_tokens"]
        masks = -(-end // 4) * 4 - len(request["prompt"])  # the slots of every block it decoded, whole
        assert got["passes"] == 1 + masks, (request, got["passes"])
        if end % 4 == 0:
            assert got["passes"] == 1 + request["max_tokens"]


def test_mixed_steps_stay_token_identical_to_the_core(engines, tmp_path):
    """A small token budget puts one request's prefill chunks beside another's block steps, and three
    sampler settings put several sampler groups in one step; every request still gets the core's tokens.
    Each logits call is asked again for its masked slots only: a pass over the group's blocks alone gives
    the logits the step's first pass (over every token of the step) gave, and zeros where not read."""
    ckpt = load_checkpoint(checkpoint_path(4))
    long_prompt = ckpt.encode("<eos> the wolf sees a fox . many owls sleep . the old cow sees the ships . a") * 2
    settings = [("first_hitting", 1.0), ("threshold", 0.0), ("ddpm", 1.0), ("first_hitting", 0.0)]
    prompts = [ckpt.encode(TEXTS[0]), ckpt.encode(TEXTS[1]), long_prompt, ckpt.encode(TEXTS[2])]
    run = [{"prompt": p, "algorithm": a, "temperature": t, "max_tokens": 14, "seed": 20 + i}
           for i, (p, (a, t)) in enumerate(zip(prompts, settings))]
    spec = {"runs": [run], "engine": {"enable_chunked_prefill": True, "max_num_batched_tokens": 20},
            "read_check": True}
    (got,) = run_worker(engines, tmp_path, 4, spec)
    assert got["tokens"] == [core_tokens(ckpt, r) for r in run]
    steps = got["steps"]
    assert any(s["blocks"] and s["tokens"] > s["block_tokens"] for s in steps), steps  # a prefill beside blocks
    assert any(s["groups"] >= 2 for s in steps), steps
    assert any(s["block_tokens"] == 2 * 4 * s["blocks"] for s in steps if s["blocks"]), steps  # fused rows
    for c in got["calls"]:
        read = c["masked"] if c["read"] is None else c["read"]  # the slots the sampler's own call read
        assert read.any() and torch.allclose(c["again"][read], c["logits"][read], atol=1e-5, rtol=0)
        assert not c["again"][~c["masked"]].any()
