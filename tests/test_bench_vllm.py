"""bench/bench_vllm.py's pieces that need no engine: the cost per position it prints, checked against the
parameters of the models it compares, and its flags (a bad one ends the run with one line)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from bench_args import parse_args  # noqa: E402
from position_arithmetic import dit_cost, first_hitting_positions, llama_cost, predicted_ratio  # noqa: E402

from bd3_plugin.core.config import BD3Config  # noqa: E402
from bd3_plugin.core.model import BD3LM  # noqa: E402


def _weights(module: torch.nn.Module, names: tuple[str, ...]) -> int:
    """Entries of the weight matrices whose names end in one of `names` (one MAC per entry per position)."""
    return sum(p.numel() for n, p in module.named_parameters() if n.endswith(names) and p.dim() == 2)


CFG = BD3Config(vocab_size=50, model_length=32, block_size=4, hidden_dim=64, n_heads=2, n_blocks=3, cond_dim=16)


def test_dit_cost_counts_the_per_position_weights_of_the_model():
    model = BD3LM(CFG)
    layers = _weights(model.backbone.blocks, ("attn_qkv.weight", "attn_out.weight", "mlp.0.weight", "mlp.2.weight"))
    cost = dit_cost(CFG)
    assert cost.layers == layers
    assert cost.output == model.backbone.output_layer.linear.weight.numel()


def test_llama_cost_counts_the_per_position_weights_of_the_bench_llama(tmp_path):
    from transformers import LlamaForCausalLM

    from bd3_plugin.core.checkpoint import load_checkpoint
    from bd3_plugin.tinyworld.data import checkpoint_path
    from vllm_timing import make_llama

    make_llama(CFG, load_checkpoint(checkpoint_path(4)).tokenizer, str(tmp_path))
    llama = LlamaForCausalLM.from_pretrained(str(tmp_path))
    layers = _weights(llama.model.layers, ("_proj.weight",))  # q, k, v, o, gate, up, down
    cost = llama_cost(CFG)
    assert cost.layers == layers
    assert cost.output == llama.lm_head.weight.numel()


def test_fusing_the_commit_moves_no_layer_work_and_leaves_one_logit_per_token():
    for size in (1, 4, 16):
        separate, fused = first_hitting_positions(size, False), first_hitting_positions(size, True)
        assert separate[0] == fused[0] == size + 1
        assert fused[1] == 1.0 and separate[1] > size
    # equal positions and equal costs predict equal speed
    assert predicted_ratio(dit_cost(CFG), (1.0, 1.0), dit_cost(CFG), (1.0, 1.0)) == 1.0


@pytest.mark.parametrize("argv, message", [
    (["--only", "nope"], "invalid choice"),
    (["--requests", "0"], "--requests must be at least 1"),
    (["--concurrency", "1,a"], "comma-separated integers"),
    (["--sweep", "0.5,1.5"], "thresholds must lie in (0, 1]"),
    (["--released-block-size", "5"], "--released-block-size must be one of 4, 8, 16"),
    (["--tokens", "200"], "must be ≤ 122"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_bad_flags_end_with_one_line(argv, message):
    with pytest.raises(SystemExit) as err:
        parse_args(argv)
    text = str(err.value.code)
    assert text.startswith("bench_vllm.py: ") and message in text and "\n" not in text


@pytest.mark.cli
def test_bad_flag_from_the_command_line_is_one_line_and_no_traceback():
    out = subprocess.run([sys.executable, str(BENCH / "bench_vllm.py"), "--only", "copy", "--requests", "300"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and out.stdout == ""
    assert out.stderr.strip().splitlines() == ["bench_vllm.py: the copy task has 200 held-out items: --requests and "
                                               "--sweep-items must be ≤ 200"]
