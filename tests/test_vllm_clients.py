"""The clients people point at a vLLM server work against `bd3 serve` unchanged, each run in this process
against the session's server (tests/conftest.py: tiny-bd3-L4, an API key, a chat template): the OpenAI
Python SDK, lm-eval's `local-completions` model, and vLLM's own load generator (`vllm bench serve`).
A chat request to a server without a chat template is tested in tests/test_vllm_bad_bodies.py."""
from pathlib import Path

import pytest
import requests

from bd3_plugin.core.checkpoint import load_checkpoint
from bd3_plugin.tinyworld.data import checkpoint_path
from helpers import greedy_generation

pytest.importorskip("vllm")
pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt():
    return load_checkpoint(checkpoint_path(4))


def test_openai_sdk_completions_and_chat_streamed_or_not_equal_plain_http_and_the_core(bd3_server, ckpt):
    import openai

    client = openai.OpenAI(base_url=f"{bd3_server.base}/v1", api_key=bd3_server.key, timeout=120, max_retries=0)
    model = bd3_server.model
    prompt = "<eos> the old cow"  # the session's chat template renders a message as its content alone
    kw = dict(model=model, max_tokens=24, temperature=0.0)
    plain = requests.post(f"{bd3_server.base}/v1/completions", json=kw | {"prompt": prompt},
                          headers=bd3_server.headers, timeout=120).json()["choices"][0]["text"]
    completion = client.completions.create(prompt=prompt, **kw)
    streamed = "".join(c.choices[0].text for c in client.completions.create(prompt=prompt, stream=True, **kw))
    messages = [{"role": "user", "content": prompt}]
    chat = client.chat.completions.create(messages=messages, **kw)
    chat_streamed = "".join(c.choices[0].delta.content or "" for c in
                            client.chat.completions.create(messages=messages, stream=True, **kw) if c.choices)
    core = greedy_generation(ckpt, prompt, 24)
    assert plain == " " + ckpt.decode(core.tokens)
    assert [completion.choices[0].text, streamed, chat.choices[0].message.content, chat_streamed] == [plain] * 4
    assert completion.usage.prompt_tokens == chat.usage.prompt_tokens == len(ckpt.encode(prompt))
    assert completion.usage.completion_tokens == chat.usage.completion_tokens
    assert chat.choices[0].finish_reason == completion.choices[0].finish_reason


def _task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(ROOT / "lm_eval_tasks"), include_defaults=False)


def _local_completions(bd3_server, tasks, **model_args):
    """lm-eval's `local-completions` model against the session's server (the key in OPENAI_API_KEY, where
    lm-eval's OpenAI models read it), in this process."""
    import lm_eval

    args = dict(base_url=f"{bd3_server.base}/v1/completions", model=bd3_server.model, tokenizer=bd3_server.model,
                tokenizer_backend="huggingface") | model_args
    return lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=tasks, limit=10,
                                   task_manager=_task_manager(), log_samples=True, system_instruction="<eos> ")


def test_lm_eval_local_completions_gives_what_the_bd3_model_gives(bd3_server, monkeypatch):
    """copy_gen (greedy: do_sample false) through the server equals `--model bd3` with its default sampler,
    document by document. `--model bd3` starts every prompt after <eos>, as training documents do;
    local-completions sends the prompt as the task renders it, so the run adds <eos> with lm-eval's own
    `system_instruction` (`--system_instruction '<eos> '` on its command line)."""
    import lm_eval

    monkeypatch.setenv("OPENAI_API_KEY", bd3_server.key)
    served = _local_completions(bd3_server, ["copy_gen"])
    local = lm_eval.simple_evaluate(model="bd3", model_args=f"pretrained={bd3_server.model}", tasks=["copy_gen"],
                                    limit=10, task_manager=_task_manager(), log_samples=True)
    texts = [[s["filtered_resps"][0].strip() for s in run["samples"]["copy_gen"]] for run in (served, local)]
    assert len(texts[0]) == 10 and all(texts[0]) and texts[0] == texts[1]
    prompts = [[s["doc"]["prompt"] for s in run["samples"]["copy_gen"]] for run in (served, local)]
    assert prompts[0] == prompts[1]
    exact = [run["results"]["copy_gen"]["exact,none"] for run in (served, local)]
    assert exact[0] == exact[1]


def test_lm_eval_loglikelihood_through_local_completions_is_a_400_naming_the_bd3_model(bd3_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", bd3_server.key)
    with pytest.raises(requests.HTTPError) as err:  # one try: lm-eval retries every failed request
        _local_completions(bd3_server, ["synthetic_mc"], max_retries=1)
    assert err.value.response.status_code == 400
    message = err.value.response.json()["error"]["message"]
    assert message.startswith("prompt_logprobs ") and "lm_eval --model bd3" in message


def test_vllm_bench_serve_random_dataset(bd3_server, monkeypatch, capsys):
    """vLLM's load generator, its entry function called with the arguments its command line parses: every
    request completes, with exactly the tokens asked for (the random dataset ignores EOS)."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    monkeypatch.setenv("OPENAI_API_KEY", bd3_server.key)
    n, out_len = 8, 12
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(["--base-url", bd3_server.base, "--model", bd3_server.model, "--dataset-name", "random",
                              "--random-input-len", "8", "--random-output-len", str(out_len), "--num-prompts",
                              str(n), "--max-concurrency", "4", "--temperature", "1.0", "--seed", "3",
                              "--disable-tqdm", "--ready-check-timeout-sec", "0", "--save-detailed"])
    result = main(args)
    assert result["failed"] == 0 and result["completed"] == n, result.get("errors")
    assert result["output_lens"] == [out_len] * n and result["total_output_tokens"] == n * out_len
    assert "Successful requests:" in capsys.readouterr().out
