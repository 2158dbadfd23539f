"""Request validation for a BD3 server: bad sampler settings are a 400 with a message, never a broken step.

- `BD3RequestValidator`, a `vllm.logits_processors` plugin: vLLM calls its `validate_params` on every
  request in the front end (offline `LLM.generate` and the server alike). It acts only in a process that
  serves a BD3 checkpoint.
- `check_request`, an HTTP middleware (`--middleware vllm_backend.validate.check_request`, added by
  `bd3 serve`): streaming requests are validated lazily by vLLM, after the 200 has been sent, so their
  sampler settings and lengths are checked here first.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import torch
from vllm.v1.sample.logits_processor import LogitsProcessor

from . import hf_config
from .params import sampler_config


def check_params(params, block_size: int) -> None:
    sampler_config(params, block_size)
    if getattr(params, "logprobs", None) is not None or getattr(params, "prompt_logprobs", None) is not None:
        raise ValueError("logprobs are not supported by the BD3 backend")


class BD3RequestValidator(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        if hf_config.ACTIVE_BLOCK_SIZE is not None:
            check_params(sampling_params, hf_config.ACTIVE_BLOCK_SIZE)

    def __init__(self, vllm_config, device, is_pin_memory) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        pass


def _error(message: str):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}},
                        status_code=400)


async def check_request(request, call_next):
    if request.method != "POST" or request.url.path not in ("/v1/completions", "/v1/chat/completions"):
        return await call_next(request)
    vllm_config = getattr(request.app.state, "vllm_config", None)
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        return await call_next(request)  # vLLM answers malformed JSON itself
    if vllm_config is None or not isinstance(body, dict) or not body.get("stream"):
        return await call_next(request)
    params = SimpleNamespace(extra_args=body.get("vllm_xargs"), temperature=body.get("temperature", 1.0) or 0.0,
                             top_p=body.get("top_p", 1.0) or 1.0, max_tokens=body.get("max_tokens"),
                             logprobs=body.get("logprobs"), prompt_logprobs=None)
    try:
        check_params(params, vllm_config.model_config.hf_config.block_size)
        _check_lengths(request.app.state, body, vllm_config.model_config.max_model_len)
    except (ValueError, TypeError) as err:
        return _error(str(err))
    return await call_next(request)


def _check_lengths(state, body: dict, max_model_len: int) -> None:
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        n = len(prompt)
    elif isinstance(prompt, str):
        n = len(_tokenizer(state).encode(prompt, add_special_tokens=False))
    else:
        return  # batched prompts: vLLM checks each itself
    max_tokens = body.get("max_tokens") or 0
    if n >= max_model_len or n + max_tokens > max_model_len:
        raise ValueError(f"This model's maximum context length is {max_model_len} tokens; the prompt has {n} "
                         f"tokens and max_tokens is {max_tokens}")


def _tokenizer(state):
    tok = getattr(state, "_bd3_tokenizer", None)
    if tok is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(state.vllm_config.model_config.tokenizer)
        state._bd3_tokenizer = tok
    return tok
