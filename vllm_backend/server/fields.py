"""Every request field's fate in the BD3 backend: honoured, refused when set, or harmless.

vLLM accepts many sampling fields that its own sampler applies; the BD3 runner decodes blocks with
`bd3_plugin`'s samplers instead, so a field it does not apply would be silently ignored. Each field of
`SamplingParams` and of the OpenAI request bodies (`/v1/completions`, `/v1/chat/completions`) is listed
here once; `refusal` names the first one a request sets to something the backend does not do. A vLLM
upgrade that adds a field fails `tests/test_vllm_fields.py` until the field is classified.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Refused:
    is_set: Callable[[Any], bool]  # True when the value asks for something the backend does not do
    why: str


def _not_none(v) -> bool:
    return v is not None


def _truthy(v) -> bool:
    return bool(v)


# Applied by the BD3 runner (bd3_plugin's samplers), vLLM's scheduler, or vLLM's front end.
HONOURED = {
    "n": "each of the n samples is its own request (seed + i when seeded)",
    "temperature": "the block sampler's temperature; 0 is greedy",
    "top_p": "the block sampler's nucleus (the token that crosses p is excluded)",
    "top_k": "the block sampler keeps the k most probable tokens (ties: lowest id), then applies top_p",
    "seed": "a per-request generator owned by the runner",
    "extra_args": "the request's vllm_xargs: algorithm, steps, threshold, block_size, bd3_trajectory, resume_block",
    "max_tokens": "the scheduler cuts the block at the limit",
    "stop": "stop strings, applied by the detokenizer",
    "stop_token_ids": "the scheduler stops at the token inside the block",
    "ignore_eos": "the scheduler keeps going past EOS",
    "include_stop_str_in_output": "detokenizer",
    "detokenize": "detokenizer",
    "skip_special_tokens": "detokenizer",
    "spaces_between_special_tokens": "detokenizer",
    "output_kind": "streamed or final output",
    "stream_interval": "tokens per streamed chunk (a block step delivers a whole block at once)",
    "logprobs": "reveal-time log-probabilities of each token and its top alternatives (--logprobs-mode raw_logprobs "
                "or processed_logprobs)",
    "flat_logprobs": "vLLM's container for the logprobs",
}

# Accepted and without effect on the tokens, for the reason given.
HARMLESS = {
    "skip_clone": "vLLM internal",
    "output_text_buffer_length": "vLLM internal",
    "_eos_token_id": "vLLM internal",
    "_all_stop_token_ids": "vLLM internal",
    "_watermarking_skipped": "vLLM internal",
    "_bad_words_token_ids": "vLLM internal",
    "skip_reading_prefix_cache": "prefix caching is off for BD3 checkpoints",
    "routed_experts_prompt_start": "mixture-of-experts routing only",
}


def _penalty(neutral: float) -> Callable[[Any], bool]:
    return lambda v: v is not None and v != neutral


_NO_PROMPT_LOGPROBS = ("a prompt token's log-probability is a NELBO term under block diffusion, not one number "
                       "(also set by echo with logprobs); score prompts with lm_eval --model bd3 or "
                       "bd3_plugin.likelihood.scoring")

# SamplingParams fields the runner does not apply: a request that sets one gets a 400 naming it.
REFUSED = {
    "presence_penalty": Refused(_penalty(0.0), "the block sampler applies no penalties"),
    "frequency_penalty": Refused(_penalty(0.0), "the block sampler applies no penalties"),
    "repetition_penalty": Refused(_penalty(1.0), "the block sampler applies no penalties"),
    "min_p": Refused(lambda v: bool(v and v > 0), "the block sampler filters by top_k and top_p only"),
    "min_tokens": Refused(lambda v: bool(v and v > 0), "a block can end in EOS at any length"),
    "prompt_logprobs": Refused(_not_none, _NO_PROMPT_LOGPROBS),
    "prompt_logprob_token_ids": Refused(_not_none, _NO_PROMPT_LOGPROBS),
    "prompt_logprob_start": Refused(_not_none, _NO_PROMPT_LOGPROBS),
    "logprob_token_ids": Refused(_truthy, "logprobs of chosen token ids are not computed; use logprobs (top k)"),
    "structured_outputs": Refused(_not_none, "the block sampler has no grammar constraints"),
    "logit_bias": Refused(_truthy, "the block sampler applies no logit bias"),
    "allowed_token_ids": Refused(_not_none, "the block sampler does not restrict the vocabulary"),
    "bad_words": Refused(_truthy, "the block sampler does not restrict the vocabulary"),
    "thinking_token_budget": Refused(_not_none, "no reasoning budget for block decoding"),
    "repetition_detection": Refused(_not_none, "not supported for block decoding"),
    "trace_decode_token_ids": Refused(_not_none, "forced decoding is not supported"),
    "watermarking": Refused(lambda v: v is True, "the block sampler does not watermark"),
}

# Request-body fields that SamplingParams does not carry (or carries under another name).
BODY_REFUSED = {
    "use_beam_search": Refused(_truthy, "beam search extends one token at a time; blocks are decoded whole"),
    "length_penalty": Refused(_penalty(1.0), "beam search only, which is refused"),
    "suffix": Refused(_not_none, "no fill-in-the-middle"),
    "prompt_embeds": Refused(_not_none, "the model takes token ids"),
    "kv_transfer_params": Refused(_truthy, "no KV transfer for block decoding"),
    "ec_transfer_params": Refused(_truthy, "no encoder-cache transfer"),
    "response_format": Refused(lambda v: v is not None and getattr(v, "type", "text") != "text",
                               "the block sampler has no grammar constraints"),
    "tool_choice": Refused(lambda v: v not in (None, "none", "auto"),
                           "a required or named tool call needs grammar constraints"),
}

# Request-body fields handled by vLLM's front end (prompt rendering, tokenisation, response format)
# or bookkeeping; those that map to a SamplingParams field are decided there.
BODY_FRONT_END = {
    "model", "prompt", "messages", "stream", "stream_options", "echo", "user", "request_id", "session_id",
    "priority", "cache_salt", "add_special_tokens", "truncate_prompt_tokens", "truncation_side",
    "return_token_ids", "return_token_offsets", "return_tokens_as_token_ids", "return_prompt_text",
    "mm_payload", "return_mm_kwargs", "media_io_kwargs", "mm_processor_kwargs", "vllm_xargs",
    "max_completion_tokens", "top_logprobs", "tools", "parallel_tool_calls", "documents", "chat_template",
    "chat_template_kwargs", "add_generation_prompt", "continue_final_message", "reasoning_effort",
    "include_reasoning",
}


def refusal(params) -> tuple[str, str] | None:
    """(field, message) for the first refused SamplingParams field that `params` sets, else None."""
    return _first(params, REFUSED)


def body_refusal(request) -> tuple[str, str] | None:
    """(field, message) for a refused request-body field of a parsed vLLM request model, else None.
    Fields vLLM does not know are refused too: vLLM would ignore them."""
    unknown = sorted(getattr(request, "model_extra", None) or {})
    if unknown:
        return unknown[0], (f"unknown request field(s) {', '.join(unknown)}: not supported by the BD3 backend "
                            f"(vLLM would ignore them)")
    return _first(request, BODY_REFUSED)


def _first(obj, table: dict[str, Refused]) -> tuple[str, str] | None:
    for name, rule in table.items():
        if hasattr(obj, name) and rule.is_set(getattr(obj, name)):
            return name, f"{name} is not supported by the BD3 backend: {rule.why}"
    return None
