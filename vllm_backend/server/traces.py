"""Rollout trajectories from the vLLM engine, one `bd3_plugin.sampling.trajectory.Trajectory` per choice.

The runner records a request whose `vllm_xargs.bd3_trajectory` holds a trace key (`recording.py`); the
front ends here make a fresh key per request, and after the request has finished fetch its choices'
trajectories from the worker by that key (`collective_rpc("bd3_take_trajectories")`, which works whether
the engine runs in this process or in its own), telling the worker where vLLM stopped each choice.

- Python: `generate_with_trajectories(llm, prompts, params)`.
- Server: the middleware `attach_trajectories` (added by `bd3 serve`) takes `"vllm_xargs":
  {"bd3_trajectory": true}` on `/v1/completions` (one prompt) and `/v1/chat/completions` and adds
  `bd3_trajectory` (Trajectory.to_json) to every choice of the response. Streaming with a trajectory is
  refused with a 400: the trajectory is complete only once the request is.

Where vLLM stopped a choice: the core's output excludes the EOS (or stop token) it stopped at, while vLLM
returns it among the token ids; the EOS slot stays in the trajectory, revealed and not in the output, as
in `bd3_plugin.sampling.generate`. With n > 1, vLLM gives choice i the seed `seed + i` (none: each draws its own).
"""
from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING

from bd3_plugin.sampling.greedy_completion import completion_start
from bd3_plugin.sampling.trajectory import Trajectory

from vllm_backend.worker.params import RESUME_KEY, TRACE_KEY, TRACE_PREFIX
from vllm_backend.server.guard import authenticated, error_response, guarded, json_body
from vllm_backend.server.validate import _is_bd3

if TYPE_CHECKING:
    import vllm

ROUTES = ("/v1/completions", "/v1/chat/completions")
NO_STREAM = ("bd3_trajectory cannot be streamed: a trajectory is complete only when the request is; send the "
             "request with stream false")
ONE_PROMPT = "bd3_trajectory takes one prompt per request (use n for several choices of one prompt)"
NOT_BOOL = "bd3_trajectory must be true or false, got {!r}"


def new_key() -> str:
    return TRACE_PREFIX + uuid.uuid4().hex


def choice_end(n_tokens: int, finish_reason: str | None, stop_reason) -> tuple[int, str]:
    """(output tokens as the core counts them, the trajectory's finish reason) from what vLLM returned."""
    if finish_reason == "stop" and (stop_reason is None or isinstance(stop_reason, int)):
        # EOS (stop_reason None) or a stop token: vLLM returns the token, the core's output stops before it.
        return n_tokens - 1, "eos" if stop_reason is None else "stop"
    return n_tokens, finish_reason or "length"


def generate_with_trajectories(llm: vllm.LLM, prompts: list[list[int]], params: vllm.SamplingParams
                               ) -> list[list[Trajectory]]:
    """`llm.generate` on token-id prompts with `params` (a vllm.SamplingParams), returning each prompt's
    choices' trajectories (outer list: prompts in order; inner: the n choices in order). The tokens are
    those `llm.generate` returns for the same request: recording draws nothing."""
    from vllm.inputs import TokensPrompt

    if not hasattr(llm.llm_engine.vllm_config.model_config.hf_config, "to_bd3"):
        raise ValueError(f"{llm.llm_engine.vllm_config.model_config.model} is not a BD3 checkpoint")
    keys = [new_key() for _ in prompts]
    per_prompt = []
    for key in keys:
        p = params.clone()
        p.extra_args = {**(params.extra_args or {}), TRACE_KEY: key}
        per_prompt.append(p)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], per_prompt, use_tqdm=False)
    wanted = [(key, [choice_end(len(c.token_ids), c.finish_reason, c.stop_reason)
                     for c in sorted(out.outputs, key=lambda c: c.index)])
              for key, out in zip(keys, outputs)]
    rows = llm.collective_rpc("bd3_take_trajectories", args=(wanted,))[0]
    return [[Trajectory.from_json(d) for d in row] for row in rows]


def greedy_completions(llm: vllm.LLM, states: list[tuple[Trajectory, int, int]],
                       max_new_tokens: int | None = None) -> list[list[int]]:
    """The engine's `bd3_plugin.sampling.greedy_completion.greedy_completions`, from the same starts
    (`completion_start`): block b as it stood at pass p with its masked slots filled by argmax in one pass,
    then each later block in one pass, to the engine's EOS (not returned) or the length limit.
    Each state is one request that resumes from the partly revealed block (`vllm_xargs.resume_block`)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    vocab = llm.llm_engine.vllm_config.model_config.get_vocab_size()
    done = []
    requests = []
    for traj, b, p in states:
        start = completion_start(traj, b, p, max_new_tokens)
        done.append(start.head[: start.limit])
        if len(start.head) < start.limit:
            params = SamplingParams(temperature=0.0, max_tokens=start.limit - len(start.head), extra_args={
                "algorithm": "threshold", "threshold": 1.0 / vocab, RESUME_KEY: start.block.tolist()})
            requests.append((len(done) - 1, TokensPrompt(prompt_token_ids=start.prefix + start.prompt_tail), params))
    if requests:
        outputs = llm.generate([r[1] for r in requests], [r[2] for r in requests], use_tqdm=False)
        for (i, _, _), out in zip(requests, outputs):
            c = out.outputs[0]
            n, _ = choice_end(len(c.token_ids), c.finish_reason, c.stop_reason)
            done[i] += list(c.token_ids[:n])
    return done


# ---- server ----------------------------------------------------------------------------------------------
def _asks(body) -> bool:
    xargs = body.get("vllm_xargs") if isinstance(body, dict) else None
    return isinstance(xargs, dict) and xargs.get(TRACE_KEY) not in (None, False, 0)


def _several_prompts(prompt) -> bool:
    return isinstance(prompt, list) and len(prompt) > 0 and not isinstance(prompt[0], int)


@guarded
async def attach_trajectories(request, call_next):
    """HTTP middleware for `vllm serve --middleware vllm_backend.server.traces.attach_trajectories`."""
    if request.method != "POST" or request.url.path not in ROUTES:
        return await call_next(request)
    vllm_config = getattr(request.app.state, "vllm_config", None)
    if vllm_config is None or not _is_bd3(vllm_config) or not authenticated(request):
        return await call_next(request)
    try:
        body = json_body(await request.body())
    except ValueError:
        return await call_next(request)  # vLLM answers malformed JSON itself
    if not _asks(body):
        return await call_next(request)
    if body["vllm_xargs"][TRACE_KEY] is not True:
        return error_response(NOT_BOOL.format(body["vllm_xargs"][TRACE_KEY]), TRACE_KEY)
    if body.get("stream"):
        return error_response(NO_STREAM, TRACE_KEY)
    if request.url.path == ROUTES[0] and _several_prompts(body.get("prompt")):
        return error_response(ONE_PROMPT, TRACE_KEY)
    key = new_key()
    asked_ids = bool(body.get("return_token_ids"))
    body["vllm_xargs"][TRACE_KEY] = key
    body["return_token_ids"] = True  # the choices' token counts: where vLLM stopped each one
    request._body = json.dumps(body).encode()  # Starlette's cached request replays `_body` to the app
    response = await call_next(request)
    raw = b"".join([chunk async for chunk in response.body_iterator])
    data = json.loads(raw) if response.status_code == 200 else None
    if not isinstance(data, dict):  # an error, or the `null` vLLM answers once the client has gone away
        from starlette.responses import Response

        return Response(raw, response.status_code, media_type=response.media_type)
    return await _with_trajectories(request.app.state.engine_client, data, key, asked_ids)


async def _with_trajectories(engine, data: dict, key: str, asked_ids: bool):
    from fastapi.responses import JSONResponse

    choices = sorted(data["choices"], key=lambda c: c["index"])
    wanted = [(key, [choice_end(len(c["token_ids"]), c.get("finish_reason"), c.get("stop_reason"))
                     for c in choices])]
    rows = (await engine.collective_rpc("bd3_take_trajectories", args=(wanted,)))[0]
    for choice, trajectory in zip(choices, rows[0]):
        choice[TRACE_KEY] = trajectory
        if not asked_ids:
            choice.pop("token_ids", None)
            choice.pop("prompt_token_ids", None)
    if not asked_ids:
        data.pop("prompt_token_ids", None)
    return JSONResponse(data)


__all__ = ["attach_trajectories", "choice_end", "generate_with_trajectories", "greedy_completions", "new_key"]
