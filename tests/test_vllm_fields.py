"""Every request field's fate, checked without an engine: the classification covers vLLM's SamplingParams and
OpenAI request models field by field, each refused field is refused by name, the README's table lists them
all, and `bd3 serve` hands each argument to `vllm serve` exactly once."""
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest  # noqa: E402
from vllm.entrypoints.openai.completion.protocol import CompletionRequest  # noqa: E402
from vllm.sampling_params import RepetitionDetectionParams, SamplingParams, StructuredOutputsParams  # noqa: E402

from bd3_plugin.cli import main as cli  # noqa: E402
from bd3_plugin.tinyworld.data import checkpoint_path  # noqa: E402
from vllm_backend.server import fields, serve  # noqa: E402
from vllm_backend.registration import hf_config
from vllm_backend.worker.params import sampler_config  # noqa: E402
from vllm_backend.server.validate import BD3RequestValidator, LOGLIKELIHOOD_HINT, check_params  # noqa: E402

README = Path(__file__).parents[1] / "vllm_backend" / "README.md"

# A value that asks for the feature, for every refused SamplingParams field.
ASKS = {
    "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.2, "min_p": 0.1,
    "min_tokens": 3, "prompt_logprobs": 0, "prompt_logprob_start": 0, "logprob_token_ids": [5],
    "structured_outputs": StructuredOutputsParams(regex="a+"), "logit_bias": {5: 1.0},
    "allowed_token_ids": [5, 6], "bad_words": ["cow"], "thinking_token_budget": 4,
    "repetition_detection": RepetitionDetectionParams(max_pattern_size=2, min_count=2),
    "trace_decode_token_ids": [5], "watermarking": True,
}


def sampling_fields() -> set[str]:
    return set(SamplingParams.__struct_fields__)


def test_every_sampling_params_field_has_exactly_one_fate():
    tables = (set(fields.HONOURED), set(fields.HARMLESS), set(fields.REFUSED))
    assert set().union(*tables) == sampling_fields()
    assert sum(len(t) for t in tables) == len(sampling_fields())  # no field in two tables


def test_every_request_body_field_has_a_fate():
    body = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
    decided_here = set(fields.BODY_REFUSED) | fields.BODY_FRONT_END
    assert body - sampling_fields() <= decided_here, sorted(body - sampling_fields() - decided_here)
    assert not (decided_here & sampling_fields())


def test_default_params_and_honoured_settings_pass():
    check_params(SamplingParams(), 4)
    check_params(SamplingParams(n=3, temperature=0.7, top_p=0.9, seed=3, stop=["."], stop_token_ids=[2],
                                ignore_eos=True, max_tokens=9, top_k=-1, include_stop_str_in_output=True,
                                extra_args={"algorithm": "ddpm", "steps": 3}), 4)
    check_params(SamplingParams(temperature=0.0, top_k=7), 4)  # vLLM resets top_k at greedy: nothing to refuse


def test_top_k_reaches_the_block_sampler():
    assert sampler_config(SamplingParams(temperature=0.7, top_k=5), 4).top_k == 5
    for off in (0, -1):  # vLLM's two spellings of "off" are the core's 0
        assert sampler_config(SamplingParams(temperature=0.7, top_k=off), 4).top_k == 0
    assert sampler_config(SamplingParams(temperature=0.0, top_k=7), 4).top_k == 0  # vLLM resets it at greedy


@pytest.mark.parametrize("name", sorted(ASKS))
def test_each_refused_field_is_refused_by_name(name):
    assert set(ASKS) == set(fields.REFUSED) - {"prompt_logprob_token_ids"}  # that one needs an array
    params = SamplingParams(temperature=1.0, **{name: ASKS[name]})
    with pytest.raises(ValueError, match=rf"^{name} is not supported by the BD3 backend"):
        check_params(params, 4)


def test_refused_body_fields_and_unknown_fields_are_named():
    for body, name in ((dict(prompt="a", use_beam_search=True), "use_beam_search"),
                       (dict(prompt="a", length_penalty=2.0), "length_penalty"),
                       (dict(prompt="a", suffix="b"), "suffix"),
                       (dict(prompt="a", kv_transfer_params={"x": 1}), "kv_transfer_params"),
                       (dict(prompt="a", response_format={"type": "json_object"}), "response_format"),
                       (dict(prompt="a", best_of=2, guided_json={}), "best_of")):
        refused = fields.body_refusal(CompletionRequest.model_validate(body))
        assert refused is not None and refused[0] == name and name in refused[1]
    chat = ChatCompletionRequest.model_validate(dict(messages=[{"role": "user", "content": "a"}],
                                                     tool_choice="required",
                                                     tools=[{"type": "function", "function": {"name": "f"}}]))
    assert fields.body_refusal(chat)[0] == "tool_choice"
    assert fields.body_refusal(CompletionRequest.model_validate(dict(prompt="a", echo=True, n=2))) is None
    assert fields.body_refusal(CompletionRequest.model_validate(dict(prompt="a", response_format={"type": "text"}))) \
        is None


def test_readme_table_lists_every_field_with_its_fate():
    text = README.read_text()
    section = text[text.index("## Request fields"):]
    section = section[: section.index("\n## ", 3)] if "\n## " in section[3:] else section
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (honoured|refused|harmless|front end)", section, flags=re.M))
    expected = {**{f: "honoured" for f in fields.HONOURED}, **{f: "refused" for f in fields.REFUSED},
                **{f: "harmless" for f in fields.HARMLESS}, **{f: "refused" for f in fields.BODY_REFUSED},
                **{f: "front end" for f in fields.BODY_FRONT_END}}
    assert rows == expected


def test_lm_eval_loglikelihood_request_is_one_line_that_names_the_bd3_model(monkeypatch, capsys):
    monkeypatch.setattr(hf_config, "ACTIVE_BLOCK_SIZE", 4)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/lm_eval", "--model", "vllm"])
    with pytest.raises(SystemExit) as exit_:
        BD3RequestValidator.validate_params(SamplingParams(temperature=0, prompt_logprobs=1, max_tokens=1))
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: {LOGLIKELIHOOD_HINT}\n" and "--model bd3" in LOGLIKELIHOOD_HINT
    monkeypatch.setattr(sys, "argv", ["my_script.py"])  # elsewhere: an ordinary 400-style ValueError
    with pytest.raises(ValueError, match="^prompt_logprobs is not supported"):
        BD3RequestValidator.validate_params(SamplingParams(temperature=0, prompt_logprobs=1, max_tokens=1))


# ---- bd3 serve: each argument reaches `vllm serve` exactly once ----------------------------------------
def serve_argv(monkeypatch, *argv) -> list[str]:
    seen = []
    monkeypatch.setattr(serve.os, "execve", lambda path, args, env: seen.append(args))
    assert cli.main(["serve", *argv]) == 0
    return seen[0]


def flag_values(argv: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for i, a in enumerate(argv):
        if a.startswith("--"):
            out.setdefault(a, []).append(argv[i + 1] if i + 1 < len(argv) else "")
    return out


@pytest.mark.parametrize("argv, expect", [
    (["--port", "8123"], {"--port": ["8123"], "--host": ["127.0.0.1"]}),
    (["--", "--api-key", "K"], {"--api-key": ["K"], "--port": ["8000"]}),
    (["--port", "8123", "--", "--api-key", "K"], {"--api-key": ["K"], "--port": ["8123"]}),
    (["--max-num-seqs", "4", "--port", "8123"], {"--max-num-seqs": ["4"], "--port": ["8123"]}),
    (["--", "--port", "8124", "--dtype", "bfloat16", "--max_model_len=64"],
     {"--port": ["8124"], "--dtype": ["bfloat16"]}),
])
def test_bd3_serve_passes_each_argument_once(monkeypatch, argv, expect):
    ckpt = str(checkpoint_path(4))
    out = serve_argv(monkeypatch, ckpt, *argv)
    assert out[1:3] == ["serve", ckpt] and "--" not in out
    flags = flag_values(out)
    for flag, values in expect.items():
        assert flags[flag] == values
    assert flags["--middleware"] == list(serve.MIDDLEWARE)
    names = [a.split("=", 1)[0].replace("_", "-") for a in out if a.startswith("--")]  # as vLLM reads them
    once = [n for n in names if n != "--middleware"]  # vLLM appends every --middleware; the others are single
    assert len(once) == len(set(once)), names  # no flag twice
    assert {"--host", "--port", "--dtype", "--max-model-len", "--middleware"} <= set(names)


def test_bd3_serve_refuses_a_flag_given_twice(monkeypatch, capsys):
    monkeypatch.setattr(serve.os, "execve", lambda *a: pytest.fail("must not start"))
    assert cli.main(["serve", str(checkpoint_path(4)), "--port", "1", "--", "--port", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["bd3 serve: error: --port is given twice (to bd3 serve and among the vLLM arguments)"]


def test_a_default_config_built_after_the_checkpoints_keeps_its_block_size(monkeypatch):
    """transformers builds default-argument configs (to diff against); they must not reset the block size
    and vocabulary that request validation reads from the served checkpoint's config."""
    monkeypatch.setattr(hf_config, "ACTIVE_BLOCK_SIZE", None)
    monkeypatch.setattr(hf_config, "ACTIVE_VOCAB_SIZE", None)
    hf_config.BD3HFConfig(block_size=16, vocab_size=70, architectures=["BD3LM"])
    hf_config.BD3HFConfig()
    assert (hf_config.ACTIVE_BLOCK_SIZE, hf_config.ACTIVE_VOCAB_SIZE) == (16, 70)


# ---- bd3 serve --ray-replicas: the same vLLM arguments, in Ray Serve's config ----------------------------
def replicas_call(monkeypatch, *argv) -> dict:
    import ray_jobs.serve

    seen = {}
    monkeypatch.setattr(ray_jobs.serve, "serve_replicas", lambda *a: seen.setdefault("call", a))
    assert cli.main(["serve", *argv]) == 0
    return dict(zip(("checkpoint", "kwargs", "replicas", "address", "root"), seen["call"]))


def test_ray_replicas_get_the_command_line_of_bd3_serve(monkeypatch, tmp_path):
    from ray_jobs.serve import llm_config

    ckpt = str(checkpoint_path(4))
    argv = [ckpt, "--port", "8123", "--weight-update-root", str(tmp_path), "--", "--api-key", "K",
            "--max-num-seqs", "4", "--served-model-name", "tiny"]
    call = replicas_call(monkeypatch, "--ray-replicas", "2", *argv)
    # What `bd3 serve` alone would exec, read by vLLM's own parser: what differs from its defaults.
    kwargs = call["kwargs"]
    assert kwargs == serve.engine_kwargs(serve_argv(monkeypatch, *argv))
    assert (call["replicas"], call["address"], call["root"]) == (2, None, tmp_path.resolve())
    assert kwargs == {"host": "127.0.0.1", "port": 8123, "dtype": "float32", "max_model_len": 128,
                      "middleware": list(serve.MIDDLEWARE), "api_key": ["K"], "max_num_seqs": 4,
                      "served_model_name": ["tiny"]}
    config = llm_config(ckpt, kwargs, 2, {"num_cpus": 1}, tmp_path)
    assert not {"host", "port"} & set(config.engine_kwargs)  # Serve's HTTP options, not a replica's
    assert config.model_loading_config.model_id == "tiny" and config.model_loading_config.model_source == ckpt
    assert "served_model_name" not in config.engine_kwargs and config.engine_kwargs["api_key"] == ["K"]
    assert config.runtime_env["env_vars"][serve.WEIGHT_ROOT_ENV] == str(tmp_path)
    assert config.deployment_config["num_replicas"] == 2
    assert config.deployment_config["ray_actor_options"] == {"num_cpus": 0}  # the engine's bundle is its CPU
    monkeypatch.setenv(serve.WEIGHT_ROOT_ENV, "/inherited")  # never reaches a replica without the flag
    assert llm_config(ckpt, kwargs, 1, {"num_cpus": 1}, None).runtime_env["env_vars"][serve.WEIGHT_ROOT_ENV] == ""


@pytest.mark.parametrize("argv, message", [
    (["--ray-replicas", "0"], "--ray-replicas must be >= 1, got 0"),
    (["--ray-address", "auto"], "--ray-address needs --ray-replicas"),
    (["--ray-replicas", "2", "--", "--no-such-flag"], "vllm serve: unrecognized arguments: --no-such-flag"),
    (["--ray-replicas", "2", "--", "--max-num-seqs", "many"],
     "vllm serve: argument --max-num-seqs: invalid int value: 'many'"),
])
def test_ray_replicas_bad_input_is_one_line(monkeypatch, capsys, argv, message):
    import ray_jobs.serve

    monkeypatch.setattr(ray_jobs.serve, "serve_replicas", lambda *a: pytest.fail("must not start"))
    monkeypatch.setattr(serve.os, "execve", lambda *a: pytest.fail("must not start"))
    assert cli.main(["serve", str(checkpoint_path(4)), *argv]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"bd3 serve: error: {message}"]
