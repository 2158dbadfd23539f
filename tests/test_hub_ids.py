"""Hub ids not yet downloaded: tiny-bd3-L4 served as `org/name` by a stand-in for the hub (tests/fake_hub.py),
each entry point started from an empty cache and compared with the same checkpoint as a local folder; hub ids
whose config cannot be read, and repos that are not BD3 checkpoints; the model class refusing an engine that was
not configured for block decoding."""
import copy
import json
from pathlib import Path

import pytest

from bd3_plugin.tinyworld.data import checkpoint_path
from fake_hub import FakeHub, pointed_at

L4 = checkpoint_path(4)
REPO = "org/name"
TEXTS = ["<eos> the old cow", "<eos> some ships run . a", "<eos>"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """org/name: tiny-bd3-L4; org/llama: a config.json of another model type; org/no-config: no config.json."""
    root = tmp_path_factory.mktemp("repos")
    (root / "llama").mkdir()
    llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    (root / "llama" / "config.json").write_text(json.dumps(llama))
    (root / "no-config").mkdir()
    (root / "no-config" / "README.md").write_text("weights only\n")
    with FakeHub({REPO: L4, "org/llama": root / "llama", "org/no-config": root / "no-config"}) as running:
        yield running


@pytest.fixture
def empty_cache(hub, tmp_path):
    """huggingface_hub (and vLLM's hub client) in this process pointed at the fake hub, with an empty cache."""
    with pointed_at(hub.url, tmp_path / "hf"):
        yield tmp_path / "hf"


def same_files(folder: Path) -> bool:
    """The downloaded snapshot holds the local checkpoint, file for file."""
    names = sorted(p.name for p in L4.iterdir())
    return sorted(p.name for p in folder.iterdir()) == names and all(
        (folder / n).read_bytes() == (L4 / n).read_bytes() for n in names)


# ---- vllm serve / vllm.LLM: auto-configuration ------------------------------------------------------------------
def _engine_config(model: str, **kw):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    from vllm_backend.registration.plugin import register

    register()
    # What `vllm serve MODEL` runs to configure its engine (build_async_engine_client_from_engine_args).
    return AsyncEngineArgs(model=model, max_model_len=128, **kw).create_engine_config(UsageContext.OPENAI_API_SERVER)


def test_vllm_serve_configures_a_hub_id_as_the_local_folder(hub, empty_cache):
    local = _engine_config(str(L4))
    hub.requests.clear()
    remote = _engine_config(REPO, hf_token="hf_test_token")
    assert remote.model_config.model == REPO
    for read in (lambda c: c.parallel_config.worker_cls, lambda c: c.scheduler_config.scheduler_cls,
                 lambda c: c.speculative_config.num_speculative_tokens, lambda c: c.model_config.enforce_eager,
                 lambda c: c.cache_config.enable_prefix_caching, lambda c: c.model_config.dtype,
                 lambda c: c.model_config.hf_config.to_bd3()):
        assert read(remote) == read(local)
    assert remote.parallel_config.worker_cls == "vllm_backend.worker.cpu_worker.BD3CPUWorker"
    # The plugin's read came first, from the hub, with the token vLLM was given.
    first = next(r for r in hub.requests if r[1].endswith("/config.json"))
    assert first == ("HEAD", f"/{REPO}/resolve/main/config.json", "Bearer hf_test_token")


@pytest.mark.parametrize("model, kw, reason", [
    ("org/missing", {}, "no such repository on http://127.0.0.1:"),
    (REPO, {"revision": "v9"}, "the repository has no revision v9"),
])
def test_a_hub_id_whose_config_cannot_be_read_is_refused_in_one_line(empty_cache, model, kw, reason):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_backend.registration.autoconfig import BD3ConfigError, apply

    with pytest.raises(BD3ConfigError) as info:  # vllm.LLM: the ValueError
        apply(EngineArgs(model=model, **kw))
    message = str(info.value)
    assert message.startswith(f"{model}: cannot tell whether it is a BD3 checkpoint") and reason in message
    assert "\n" not in message
    with pytest.raises(SystemExit) as exit_info:  # vllm serve: `Error: ...` and exit status 1
        _engine_config(model, **kw)
    assert str(exit_info.value) == f"Error: {message}"


def test_offline_and_not_cached_is_refused_and_cached_is_read(hub, tmp_path):
    from vllm_backend.registration.autoconfig import BD3ConfigError, bd3_block_size

    with pointed_at(hub.url, tmp_path / "hf", offline=True), pytest.raises(BD3ConfigError) as info:
        bd3_block_size(REPO)
    assert str(info.value).endswith("HF_HUB_OFFLINE is set and the file is not in the Hugging Face cache")
    with pointed_at(hub.url, tmp_path / "hf"):
        assert bd3_block_size(REPO) == 4  # fetched
    hub.requests.clear()
    with pointed_at(hub.url, tmp_path / "hf", offline=True):
        assert bd3_block_size(REPO) == 4  # from the cache
    assert hub.requests == []


@pytest.mark.parametrize("model", ["org/llama", "org/no-config"])
def test_a_repo_that_is_not_a_bd3_checkpoint_leaves_vllm_untouched(empty_cache, model):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_backend.registration.autoconfig import apply

    args = EngineArgs(model=model)
    before = copy.deepcopy(vars(args))
    apply(args)
    assert vars(args) == before
    assert apply(EngineArgs(model=model, config_format="mistral")) is None  # other formats are not read at all


@pytest.mark.engine
def test_vllm_llm_on_a_hub_id_gives_the_local_folders_greedy_tokens(engines, hub, tmp_path):
    from bd3_plugin.core.checkpoint import load_checkpoint
    from bd3_plugin.core.generators import seeded_generators
    from bd3_plugin.sampling.config import SamplerConfig
    from bd3_plugin.sampling.generate import generate

    ckpt = load_checkpoint(L4)
    prompts = [ckpt.encode(t) for t in TEXTS]
    got = engines.run("hub", {"url": hub.url, "home": str(tmp_path / "hf"), "model": REPO, "prompts": prompts,
                              "max_tokens": 12})
    assert got["model"] == REPO and got["worker"] == "vllm_backend.worker.cpu_worker.BD3CPUWorker"
    cfg = SamplerConfig(temperature=0.0, max_new_tokens=12, stop_at_eos=False)
    core = generate(ckpt.model, prompts, cfg, seeded_generators([0] * len(prompts)))
    assert got["tokens"] == [g.tokens for g in core.generations]
    assert len({tuple(t) for t in got["tokens"]}) > 1


# ---- the model class's own guard --------------------------------------------------------------------------------
def test_the_model_class_refuses_an_engine_not_configured_for_block_decoding(monkeypatch):
    import vllm_backend.registration.autoconfig as autoconfig
    from vllm_backend.worker.model import BD3ForVLLM, check_block_decoding

    configured = _engine_config(str(L4))
    check_block_decoding(configured)  # the plugin's configuration passes
    monkeypatch.setattr(autoconfig, "apply", lambda *args, **kwargs: None)  # as if the config had not been read
    stock = _engine_config(str(L4))
    assert stock.parallel_config.worker_cls != configured.parallel_config.worker_cls
    with pytest.raises(ValueError) as info:
        BD3ForVLLM(vllm_config=stock)
    message = str(info.value)
    assert message.startswith("a BD3 checkpoint on an engine not configured for block decoding (worker ")
    assert "engine_kwargs(block_size, device)" in message and "\n" not in message


# ---- lm-eval, bd3 serve, bd3-sweep: the core's checkpoint resolution ---------------------------------------------
def test_lm_eval_on_a_hub_id_gives_the_local_folders_loglikelihoods(empty_cache):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    pairs = [("the old cow", " sleeps . <eos>"), ("", "a ship runs ."), ("some wolves", " follow the owl")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    scores = {}
    for name in (REPO, str(L4)):  # lm_eval --model bd3 --model_args pretrained=NAME,mc_samples=2
        lm = get_model("bd3").create_from_arg_string(f"pretrained={name},mc_samples=2",
                                                     {"batch_size": 8, "device": None})
        scores[name] = lm.loglikelihood(requests, disable_tqdm=True)
        assert lm.ckpt.path == L4 or same_files(lm.ckpt.path)
    assert scores[REPO] == scores[str(L4)]


def test_bd3_serve_starts_vllm_on_the_downloaded_folder(empty_cache, monkeypatch):
    import vllm_backend.server.serve as serve
    from bd3_plugin.cli.main import main

    started = []

    def execve(path, argv, env):
        started.append(argv)

    monkeypatch.setattr(serve.os, "execve", execve)
    assert main(["serve", REPO, "--port", "8123"]) == 0
    assert main(["serve", str(L4), "--port", "8123"]) == 0
    hub_argv, local_argv = started
    assert same_files(Path(hub_argv[2])) and str(empty_cache) in hub_argv[2]
    assert hub_argv[3:] == local_argv[3:]  # the same flags, --max-model-len read from the downloaded config


def test_bd3_sweep_units_resolve_a_hub_id_to_the_downloaded_checkpoint(empty_cache, monkeypatch):
    import lm_eval

    from ray_jobs.plan import plan
    from ray_jobs.unit import evaluate

    calls = []

    def simple_evaluate(**kwargs):  # the unit's lm-eval run, whose hub-id path the adapter test covers
        calls.append(kwargs["model_args"])
        return {"results": {}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", simple_evaluate)
    unit, = plan([REPO], [["synthetic_ppl"]], limit=2)
    assert unit.checkpoint == REPO  # a hub id is kept as given, not globbed away
    local, = plan([str(L4)], [["synthetic_ppl"]], limit=2)
    assert evaluate(unit, "cpu") == evaluate(local, "cpu")  # block size and length read from the downloaded config
    assert calls == [f"pretrained={REPO}", f"pretrained={L4}"]
    snapshot, = (empty_cache / "hub" / "models--org--name" / "snapshots").iterdir()
    assert same_files(snapshot)
