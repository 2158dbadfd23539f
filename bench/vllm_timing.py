"""Engines for `bench_vllm.py`: the random-weight models it compares against (a Llama of a BD3 checkpoint's
shape, a BD3-LM at the released shape) and one timed run of an in-process vLLM engine over waves of
requests."""
from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass

import torch

MAX_MODEL_LEN = 128  # every prompt plus its new tokens fits; keeps the KV cache small on a shared CPU


def progress(message: str) -> None:
    """One line on stderr, so that stdout holds only the results."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_llama(cfg, tokenizer, folder: str) -> str:
    """A random Llama with a BD3 config's width, depth, heads and vocabulary, and the given tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_dim,
                                         intermediate_size=4 * cfg.hidden_dim, num_hidden_layers=cfg.n_blocks,
                                         num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
                                         max_position_embeddings=cfg.model_length, tie_word_embeddings=False))
    llama.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_released_bd3(block_size: int, tokenizer, folder: str):
    """A random-weight BD3-LM at the released checkpoints' shape (12 layers × 768, 12 heads, vocabulary
    50,258, L = 1024), written as a checkpoint folder vLLM serves. The tokenizer only encodes the prompts:
    generated ids run past its vocabulary, so requests must not detokenize."""
    from bd3_plugin.core.checkpoint import save_checkpoint
    from bd3_plugin.core.config import BD3Config
    from bd3_plugin.core.model import BD3LM

    cfg = BD3Config(vocab_size=50258, model_length=1024, block_size=block_size, hidden_dim=768, n_heads=12,
                    n_blocks=12, cond_dim=128, dropout=0.0)
    model = BD3LM(cfg)
    model.reset_parameters(torch.Generator().manual_seed(0), adaln_zero=False)
    save_checkpoint(model, folder, tokenizer)
    return cfg


def _count_positions(worker) -> None:
    """Wrap the worker's model so that every pass adds its token positions through the layers, and every
    output-layer call its rows: the same count for the BD3 runner and for vLLM's own AR runner."""
    model = worker.model_runner.model
    counts = {"passes": 0, "layers": 0, "logits": 0}
    worker.bench_counts = counts
    forward = model.forward
    logits = model.compute_logits

    def counted_forward(*args, **kwargs):
        positions = kwargs["positions"] if "positions" in kwargs else args[1]
        counts["passes"] += 1
        counts["layers"] += positions.shape[-1]
        return forward(*args, **kwargs)

    def counted_logits(hidden_states, *args, **kwargs):
        counts["logits"] += hidden_states.shape[0]
        return logits(hidden_states, *args, **kwargs)

    model.forward = counted_forward
    model.compute_logits = counted_logits


def _read_counts(worker) -> dict[str, int]:
    return dict(worker.bench_counts)


@dataclass(frozen=True)
class Run:
    """One concurrency level of one engine: what came back, how long it took, what the model computed."""

    concurrency: int
    tokens: int  # generated tokens returned, summed over requests
    seconds: float  # wall-clock
    cpu_seconds: float  # this process's CPU time (all its threads): less sensitive to other jobs' load
    passes: int  # model passes (batched: one pass serves every request in the step)
    layer_positions: int  # token positions through the layers, prompts included
    logit_positions: int  # positions through the output layer
    outputs: tuple[tuple[tuple[int, ...], str], ...]  # per request: (token ids, finish reason)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.tokens / self.cpu_seconds

    def per_token(self, count: int) -> float:
        return count / max(self.tokens, 1)


def _waves(llm, prompts, params, c: int) -> Run:
    from vllm.inputs import TokensPrompt

    before = llm.collective_rpc(_read_counts)[0]
    outputs = []
    start = time.perf_counter()
    cpu = time.process_time()
    for i in range(0, len(prompts), c):
        wave = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts[i : i + c]], params, use_tqdm=False)
        outputs += [(tuple(o.outputs[0].token_ids), str(o.outputs[0].finish_reason)) for o in wave]
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    after = llm.collective_rpc(_read_counts)[0]
    delta = {k: after[k] - before[k] for k in after}
    return Run(c, sum(len(t) for t, _ in outputs), seconds, cpu, delta["passes"], delta["layers"], delta["logits"],
               tuple(outputs))


def run_engine(model: str, prompts, params, concurrency: tuple[int, ...], repeats: int = 1,
               waves: int | None = None) -> list[Run]:
    """Send `prompts` in waves of each concurrency through one engine, one warm-up request first per
    level; of `repeats` rounds per level the fastest is kept (the others differ only in the machine's load).
    With `waves`, each level sends only its first `waves × concurrency` prompts."""
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    progress(f"starting vLLM on {model}")
    llm = LLM(model, dtype="float32", max_model_len=MAX_MODEL_LEN, seed=0)
    runs = []
    try:
        llm.collective_rpc(_count_positions)  # the engine runs in this process: the callable needs no pickling
        for c in concurrency:
            llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], params, use_tqdm=False)
            sent = prompts if waves is None else prompts[: waves * c]
            rounds = [_waves(llm, sent, params, c) for _ in range(repeats)]
            runs.append(min(rounds, key=lambda r: r.seconds))
            progress(f"  concurrency {c}: " + ", ".join(f"{r.tokens_per_s:.1f}" for r in rounds) + " tok/s")
    finally:
        del llm
        gc.collect()
    return runs
