"""Request validation for a BD3 server: a field the backend does not apply, or a bad sampler setting, is a
400 that names it, never an ignored field or a broken step.

- `BD3RequestValidator`, a `vllm.logits_processors` plugin: vLLM calls its `validate_params` on every
  request in the front end (offline `LLM.generate` and the server alike). It acts only in a process that
  serves a BD3 checkpoint.
- `check_request`, an HTTP middleware (`--middleware vllm_backend.server.validate.check_request`, added by
  `bd3 serve`): checks the request body before vLLM sees it, for streaming requests too (vLLM validates
  those lazily, after the 200 has been sent), and refuses body fields that never reach SamplingParams. A
  body that is not JSON, or that one of vLLM's own validators fails on with an exception other than a
  validation error (they assume the types they check: `"messages": null` raises TypeError), is a 400 here,
  naming the field where one can be named; vLLM's validation errors get vLLM's own 400. So is a value the
  engine cannot carry (text with a lone surrogate, an integer beyond 64 bits), and more choices (n) than
  `--max-num-queued-reqs` admits at once. A streamed request that passes these checks but that vLLM refuses
  once its stream has begun (a prompt token id outside the vocabulary, ...) gets vLLM's error as a 4xx
  instead of a 200 whose only event is the error. A chat request to a server without a chat template gets a
  400 that says how to give one (`chat_template.explaining`).
"""
from __future__ import annotations

import os
import sys
from http import HTTPStatus

import torch
from vllm.exceptions import VLLMClientError, VLLMValidationError
from vllm.v1.sample.logits_processor import LogitsProcessor

from vllm_backend.server import fields
from vllm_backend.server.chat_template import explaining
from vllm_backend.server.guard import (authenticated, error_response, guarded, json_body, stream_error_first,
                                       unencodable)
from vllm_backend.registration import hf_config
from vllm_backend.worker.params import RESUME_KEY, check_resume_block, sampler_config

LOGLIKELIHOOD_HINT = ("lm_eval --model vllm cannot score log-likelihoods with a BD3 checkpoint (the vLLM "
                      "backend computes no prompt logprobs); use --model bd3 for loglikelihood tasks")


def check_params(params, block_size: int) -> None:
    """ValueError naming the field when `params` (a SamplingParams) asks for something the backend does not do."""
    refused = fields.refusal(params)
    if refused is not None:
        raise ValueError(refused[1])
    sampler_config(params, block_size)


def _under_lm_eval() -> bool:
    return os.path.basename(sys.argv[0]) in ("lm_eval", "lm-eval")


class BD3RequestValidator(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        if hf_config.ACTIVE_BLOCK_SIZE is None:
            return
        if getattr(sampling_params, "prompt_logprobs", None) is not None and _under_lm_eval():
            # lm_eval's vllm model asks for prompt logprobs for every loglikelihood request; under its
            # command line the run ends with one line that says what to use instead, not a traceback.
            print(f"error: {LOGLIKELIHOOD_HINT}", file=sys.stderr)
            raise SystemExit(2)
        check_params(sampling_params, hf_config.ACTIVE_BLOCK_SIZE)
        check_resume_block((sampling_params.extra_args or {}).get(RESUME_KEY), hf_config.ACTIVE_BLOCK_SIZE,
                           hf_config.ACTIVE_VOCAB_SIZE)

    def __init__(self, vllm_config, device, is_pin_memory) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        pass


_ROUTES = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
# vLLM's batched chat route takes a list of conversations that the checks here do not read: refused, so that
# no field they refuse elsewhere is silently ignored there.
_UNCHECKED_ROUTES = {"/v1/chat/completions/batch": "send each conversation to /v1/chat/completions"}


@guarded
async def check_request(request, call_next):
    return await _checked(request, explaining(call_next))


async def _checked(request, call_next):
    route = _ROUTES.get(request.url.path)
    unchecked = _UNCHECKED_ROUTES.get(request.url.path)
    vllm_config = getattr(request.app.state, "vllm_config", None)
    if request.method != "POST" or (route or unchecked) is None or vllm_config is None or not _is_bd3(vllm_config):
        return await call_next(request)
    if not authenticated(request):
        return await call_next(request)  # vLLM's authentication, further in, answers 401 first
    if unchecked is not None:
        return error_response(f"{request.url.path} is not served for a BD3 checkpoint: {unchecked}",
                              status=HTTPStatus.NOT_FOUND, kind="NotFoundError")
    raw = await request.body()
    try:
        body = json_body(raw)
    except ValueError as err:  # one nested too deeply would get FastAPI's bare {"detail": ...} from vLLM
        return error_response(f"the request body is not JSON: {err}")
    bad = unencodable(raw, body)
    if bad is not None:
        return error_response(f"{bad[0] or 'the request body'} holds {bad[1]}", bad[0] or None)
    model = _request_model(route)
    try:
        parsed = model.model_validate(body)
    except (ValueError, VLLMClientError):
        return await call_next(request)  # malformed fields: vLLM answers with its own 400 that names them
    except Exception as err:  # vLLM's validators assume the types they check: TypeError on `"messages": null`
        field = field_at_fault(model, body, err)
        return error_response(f"invalid {field or 'request body'}: {err}", field)
    refused = _refusal(request.app.state, route, body, parsed)
    if refused is not None:
        return error_response(refused[1], refused[0])
    if parsed.stream:
        return await stream_error_first(await call_next(request))
    return await call_next(request)


def _refusal(state, route: str, body: dict, parsed) -> tuple[str | None, str] | None:
    """(the field or None, the message) for what a server for a BD3 checkpoint refuses in a request that vLLM's
    model has parsed: a field the backend does not apply, bad sampler settings, what vLLM's own checks of the
    sampling parameters refuse; else None."""
    try:
        refused = fields.body_refusal(parsed)
        if refused is not None:
            return refused
        params = parsed.to_sampling_params(_max_tokens(parsed), _defaults(state))
        refused = fields.refusal(params)
        if refused is not None:
            return refused
        hf = state.vllm_config.model_config.hf_config
        sampler_config(params, hf.block_size)
        check_resume_block((params.extra_args or {}).get(RESUME_KEY), hf.block_size, hf.vocab_size)
        _check_admissible(params.n, state.vllm_config.scheduler_config)
        if route == "completion" and parsed.stream:
            _check_lengths(state, body, state.vllm_config.model_config.max_model_len)
    except (ValueError, TypeError, VLLMClientError) as err:  # vLLM's own checks of SamplingParams included
        return getattr(err, "parameter", None), str(err)
    return None


def _check_admissible(n: int, scheduler_config) -> None:
    """vLLM counts a request's n choices against `--max-num-queued-reqs` and answers 503 (busy: retry later)
    when they do not fit beside the requests in flight; more choices than the limit never fit, so that is the
    client's error."""
    limit = getattr(scheduler_config, "max_num_queued_reqs", None)
    if limit is not None and n > limit:
        raise VLLMValidationError(f"n is more than this server admits at once (--max-num-queued-reqs {limit})",
                                  parameter="n", value=n)


# A body with more top-level fields than this is not searched for the one at fault (each try validates it).
_MOST_FIELDS_SEARCHED = 64


def field_at_fault(model, body, err: Exception) -> str | None:
    """The top-level field of `body` without which `model.model_validate` no longer fails as it did with
    `err`; None when there is no such field, or several."""
    if not isinstance(body, dict) or len(body) > _MOST_FIELDS_SEARCHED:
        return None
    at_fault = [name for name in body if not _fails_alike(model, {k: v for k, v in body.items() if k != name}, err)]
    return at_fault[0] if len(at_fault) == 1 else None


def _fails_alike(model, body: dict, err: Exception) -> bool:
    try:
        model.model_validate(body)
    except Exception as other:
        return type(other) is type(err) and str(other) == str(err)
    return False


def _is_bd3(vllm_config) -> bool:
    return getattr(vllm_config.model_config.hf_config, "model_type", None) in ("bd3lm", "mdlm")


def _request_model(route: str):
    if route == "completion":
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        return CompletionRequest
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest


def _max_tokens(parsed) -> int:
    """The budget the request names (only its sign matters for validation; vLLM checks the length)."""
    n = getattr(parsed, "max_completion_tokens", None) or parsed.max_tokens
    return n if isinstance(n, int) and n > 0 else 1


def _defaults(state) -> dict:
    """The server's default sampling parameters (from the model's generation config), as vLLM applies them."""
    defaults = getattr(state, "_bd3_sampling_defaults", None)
    if defaults is None:
        defaults = state.vllm_config.model_config.get_diff_sampling_param()
        state._bd3_sampling_defaults = defaults
    return defaults


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
