"""The vLLM backend against the core sampler, through vLLM's real engine (one engine per checkpoint, in the
session's engine process: tests/vllm_parity_worker.py)."""
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from bd3_plugin.core.checkpoint import load_checkpoint
from bd3_plugin.sampling.config import SamplerConfig
from bd3_plugin.sampling.generate import generate
from bd3_plugin.core.generators import seeded_generators
from bd3_plugin.tinyworld.data import checkpoint_path
from vllm_backend.worker.params import sampler_config

TEXTS = ["<eos> the old cow", "<eos> some ships run . a", "<eos>", "<eos> the wolf sees a fox . many owls sleep . the",
         "<eos> a"]
CASES = [{"algorithm": a, "temperature": t, "max_tokens": 21, "seed": 5}
         for a in ("first_hitting", "ddpm", "threshold") for t in (0.0, 1.0)]
CASES.append({"algorithm": "threshold", "temperature": 1.0, "max_tokens": 21, "seed": 5, "top_k": 3})


@pytest.mark.engine
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_engine_matches_the_core_sampler_token_for_token(engines, block_size):
    ckpt = load_checkpoint(checkpoint_path(block_size))
    prompts = [ckpt.encode(t) for t in TEXTS]  # lengths 1..12: every tail length of the first block
    results = engines.run("parity", {"checkpoint": str(checkpoint_path(block_size)), "prompts": prompts,
                                     "cases": CASES, "max_model_len": 128})
    for case, got in zip(CASES, results):
        cfg = SamplerConfig(algorithm=case["algorithm"], temperature=case["temperature"],
                            max_new_tokens=case["max_tokens"], stop_at_eos=False, top_k=case.get("top_k", 0))
        core = generate(ckpt.model, prompts, cfg, seeded_generators([case["seed"]] * len(prompts)))
        expect = [g.tokens for g in core.generations]
        if cfg.top_k:  # the case tells a backend that drops top_k from one that applies it
            off = generate(ckpt.model, prompts, dataclasses.replace(cfg, top_k=0),
                           seeded_generators([case["seed"]] * len(prompts)))
            assert [g.tokens for g in off.generations] != expect, case
        assert got["batch"] == expect, case
        assert got["alone"] == expect[:1], case


def test_sampler_settings_are_validated():
    def params(**kw):
        base = dict(extra_args=None, temperature=1.0, top_p=1.0, top_k=0, max_tokens=8)
        return SimpleNamespace(**(base | kw))

    assert sampler_config(params(), 4) == SamplerConfig(max_new_tokens=8)
    assert sampler_config(params(temperature=0.0, extra_args={"algorithm": "ddpm", "steps": 8}), 4).steps == 8
    for extra, needle in [({"algorithm": "beam"}, "algorithm must be one of"), ({"threshold": 0}, "threshold must lie"),
                          ({"threshold": 1.5}, "threshold must lie"),
                          ({"threshold": "high"}, "threshold must lie"), ({"steps": True}, "steps must be"), ({"block_size": 16}, "does not match"),
                          ({"steps": 0}, "steps must be"), ({"foo": 1}, "unknown vllm_xargs key")]:
        with pytest.raises(ValueError, match=needle):
            sampler_config(params(extra_args=extra), 4)


def test_block_split_attention_metadata():
    """Queries cut at absolute multiples of L': each piece sees the KV up to its own last token."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from vllm_backend.worker.block_metadata import split_into_blocks

    # Request 0: a prefill of positions 0..9; request 1: a block query at positions 12..15; request 2: 6..7.
    positions = torch.tensor(list(range(10)) + [12, 13, 14, 15] + [6, 7])
    qsl = torch.tensor([0, 10, 14, 16], dtype=torch.int32)
    cm = CommonAttentionMetadata(query_start_loc=qsl, query_start_loc_cpu=qsl,
                                 seq_lens=torch.tensor([10, 16, 8], dtype=torch.int32), num_reqs=3,
                                 num_actual_tokens=16, max_query_len=10, max_seq_len=16,
                                 block_table_tensor=torch.tensor([[0], [1], [2]]), slot_mapping=torch.arange(16),
                                 positions=positions)
    out = split_into_blocks(cm, 4)
    assert out.query_start_loc_cpu.tolist() == [0, 4, 8, 10, 14, 16]
    assert out.seq_lens.tolist() == [4, 8, 10, 16, 8]
    assert out.block_table_tensor.flatten().tolist() == [0, 0, 0, 1, 2]
    assert out.causal is False and out.num_reqs == 5 and out.max_query_len == 4 and out.max_seq_len == 16


def test_plain_vllm_args_get_block_decoding(tmp_path):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_backend.registration.autoconfig import apply, bd3_block_size

    assert bd3_block_size(str(checkpoint_path(4))) == 4 and bd3_block_size(str(tmp_path)) is None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mdlm", "model_length": 64}))
    assert bd3_block_size(str(tmp_path)) == 64  # MDLM: one block of the model length
    args = EngineArgs(model=str(checkpoint_path(4)))
    apply(args)
    assert args.speculative_config["num_speculative_tokens"] == 4 and args.enable_prefix_caching is False
    assert args.worker_cls == "vllm_backend.worker.cpu_worker.BD3CPUWorker" and args.dtype == "float32"
    with pytest.raises(ValueError, match="--enable-prefix-caching: not supported"):
        apply(EngineArgs(model=str(checkpoint_path(4)), enable_prefix_caching=True))
