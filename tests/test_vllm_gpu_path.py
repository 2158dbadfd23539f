"""What a CPU-only machine can check of the backend's GPU path: import hygiene of the plugin, the runner
composition and its drift guard against vLLM's V1 GPUModelRunner, the GPU worker's runner factory, runner
and attention-backend selection under a (faked) CUDA build, and that the plugin is inert for other models.
The block-causal metadata is checked against FlashAttention/Triton semantics in test_vllm_block_metadata.py."""
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bd3_plugin.tinyworld.data import checkpoint_path
from early import early_fixture

HYGIENE = r"""
import json, sys, torch
before = (torch.cuda.Event, torch.cuda.Stream, torch.Tensor.pin_memory)
import vllm.plugins
vllm.plugins.load_general_plugins()
from vllm import ModelRegistry
from vllm.engine.arg_utils import EngineArgs
import vllm_backend.registration.autoconfig, vllm_backend.worker.engine, vllm_backend.worker.runner, vllm_backend.worker.gpu_worker
import vllm_backend.server.validate  # the logits-processor entry point, also loaded for every model
config = EngineArgs(model=sys.argv[1], max_model_len=128).create_engine_config()  # the configuration path
def state():
    same = [a is b for a, b in zip(before, (torch.cuda.Event, torch.cuda.Stream, torch.Tensor.pin_memory))]
    return {"cpu_modules": sorted(m for m in sys.modules if m.startswith("vllm.v1.worker.cpu")), "same": same}
out = {"registered": "BD3LM" in ModelRegistry.get_supported_archs(), "worker": config.parallel_config.worker_cls,
       "after_config": state()}
import vllm_backend.worker.cpu_worker as cw  # what vLLM does in a CPU worker process, and only there
out["after_cpu_worker"] = state()
out["cpu_mro"] = [c.__name__ for c in cw.BD3CPUModelRunner.__mro__[:4]]
print("RESULT " + json.dumps(out))
"""


def _run(code: str, *args: str, timeout: int = 300, env: dict | None = None) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@early_fixture
def hygiene(folder):
    """The HYGIENE probe in a fresh process, run early (tests/early.py)."""
    return _run(HYGIENE, str(checkpoint_path(4)))


@pytest.mark.cli  # a fresh process
def test_plugin_registration_and_configuration_leave_torch_and_the_cpu_worker_alone(hygiene):
    out = hygiene
    assert out["registered"] and out["worker"] == "vllm_backend.worker.cpu_worker.BD3CPUWorker"
    assert out["after_config"] == {"cpu_modules": [], "same": [True, True, True]}
    # The probe can see the damage: vLLM's CPU worker module patches all three on import.
    assert "vllm.v1.worker.cpu.shm" in out["after_cpu_worker"]["cpu_modules"]
    assert out["after_cpu_worker"]["same"] == [False, False, False]
    assert out["cpu_mro"] == ["BD3CPUModelRunner", "BD3RunnerMixin", "CPUModelRunner", "GPUModelRunner"]


# ---- composition and drift guard ----------------------------------------------------------------
def _params(fn) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_gpu_runner_is_the_mixin_over_vllms_v1_gpu_runner():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    from vllm_backend.worker.gpu_worker import BD3GPUModelRunner, BD3GPUWorker
    from vllm_backend.worker.runner import BD3RunnerMixin, BD3WorkerMixin
    from vllm_backend.worker.weights import BD3WeightSync

    assert BD3GPUModelRunner.__mro__[1:3] == (BD3RunnerMixin, GPUModelRunner)
    assert BD3GPUWorker.__mro__[1:4] == (BD3WorkerMixin, BD3WeightSync, Worker)
    assert BD3GPUWorker._make_model_runner is not Worker._make_model_runner


def test_every_hook_the_mixin_overrides_exists_on_gpu_model_runner_with_the_same_signature():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker
    from vllm.v1.worker.utils import AttentionGroup

    from vllm_backend.worker.runner import BD3RunnerMixin

    own = {name: fn for name, fn in vars(BD3RunnerMixin).items() if inspect.isfunction(fn)}
    hooks = {name for name in own if hasattr(GPUModelRunner, name)}
    assert hooks == {"__init__", "execute_model", "_update_states", "_prepare_inputs", "_model_forward",
                     "_sample", "_input_fits_in_drafter", "initialize_metadata_builders", "_dummy_sampler_run"}
    for name in hooks:
        assert _params(own[name]) == _params(getattr(GPUModelRunner, name)), name
    # The wrapper around AttentionGroup.build_metadata passes the metadata first, the rest through.
    assert [p[0] for p in _params(AttentionGroup.build_metadata)][:2] == ["self", "common_attn_metadata"]
    assert _params(Worker._make_model_runner) == [("self", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                   inspect.Parameter.empty)]


def test_what_the_fused_block_step_reads_of_vllm_exists():
    """The scheduler's and the runner's other contacts with vLLM: the scheduler output fields BD3Scheduler
    reads to track noisy blocks, and the forward-context call the runner makes for a pass over some blocks."""
    import dataclasses

    from vllm.forward_context import ForwardContext, set_forward_context
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.core.sched.scheduler import Scheduler

    fields = {f.name for f in dataclasses.fields(SchedulerOutput)}
    assert {"num_scheduled_tokens", "scheduled_spec_decode_tokens", "finished_req_ids", "preempted_req_ids"} <= fields
    assert [p[0] for p in _params(Scheduler.schedule)] == ["self", "throttle_prefills"]
    assert [p[0] for p in _params(set_forward_context)][:3] == ["attn_metadata", "vllm_config", "num_tokens"]
    assert "slot_mapping" in inspect.signature(set_forward_context).parameters
    assert "slot_mapping" in {f.name for f in dataclasses.fields(ForwardContext)}


# ---- the GPU worker's runner factory, under a real engine config --------------------------------
@pytest.fixture(scope="module")
def l4_config():
    from vllm.engine.arg_utils import EngineArgs

    from vllm_backend.registration.plugin import register

    register()
    return EngineArgs(model=str(checkpoint_path(4)), max_model_len=128).create_engine_config()


def test_gpu_worker_builds_the_bd3_runner_through_vllms_factory(l4_config, monkeypatch):
    import vllm.v1.worker.gpu_worker as gw

    import vllm_backend.worker.gpu_worker as ours

    class StubRunner:
        def __init__(self, vllm_config, device):
            self.args = (vllm_config, device)

    monkeypatch.setattr(ours, "BD3GPUModelRunner", StubRunner)
    monkeypatch.setattr(gw, "init_workspace_manager", lambda *a, **k: None)
    worker = object.__new__(ours.BD3GPUWorker)
    worker.vllm_config, worker.device, worker.rank, worker.use_v2_model_runner = l4_config, torch.device("cpu"), 1, False
    worker._init_workspace_and_model_runner()  # vLLM's own code path from init_device to the factory
    assert isinstance(worker.model_runner, StubRunner) and worker.model_runner.args == (l4_config, worker.device)
    worker.use_v2_model_runner = True
    with pytest.raises(ValueError, match="VLLM_USE_V2_MODEL_RUNNER"):
        worker._make_model_runner()


def _matmul_state() -> tuple:
    return (os.environ.get("TRITON_F32_DEFAULT"), torch.get_float32_matmul_precision(),
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)


def _set_matmul_state(precision: str, tf32: bool) -> None:
    torch.set_float32_matmul_precision(precision)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


@pytest.mark.parametrize("dtype, ieee", [("auto", True), ("float32", True), ("bfloat16", False),
                                         ("float16", False)])
def test_a_float32_gpu_worker_makes_every_float32_matmul_ieee(dtype, ieee, monkeypatch):
    """The worker's own constructor (vLLM's Worker.__init__ stubbed: it needs a device) on the engine config
    the plugin builds for the dtype: float32 turns TF32 off in Triton, cuBLAS and cuDNN; half precision
    leaves the fast settings it found."""
    from vllm.v1.worker.gpu_worker import Worker

    from vllm_backend.registration.plugin import register
    from vllm_backend.worker.gpu_worker import BD3GPUWorker

    register()
    config = _args(dtype=dtype, max_model_len=128).create_engine_config()
    seen = []

    def vllm_worker_init(self, **kw):  # what WorkerBase keeps of its arguments
        seen.append(kw)
        self.vllm_config = kw["vllm_config"]

    monkeypatch.setattr(Worker, "__init__", vllm_worker_init)
    monkeypatch.setenv("TRITON_F32_DEFAULT", "unset")
    monkeypatch.delenv("TRITON_F32_DEFAULT")  # restored to unset after the test
    before = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
              torch.backends.cudnn.allow_tf32)
    _set_matmul_state("high", True)  # what a user may have set: TF32 allowed everywhere
    try:
        BD3GPUWorker(vllm_config=config, local_rank=0, rank=0, distributed_init_method="env://")
        after = _matmul_state()
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cuda.matmul.allow_tf32 = before[1]
        torch.backends.cudnn.allow_tf32 = before[2]
    assert seen and seen[0]["vllm_config"] is config  # vLLM's constructor ran with the worker's arguments
    expected = ("ieee", "highest", False, False) if ieee else (None, "high", True, True)
    assert after == expected, (dtype, config.model_config.dtype)


def test_a_gpu_build_selects_the_v1_runner(l4_config, monkeypatch):
    import vllm.config.vllm as config_module

    monkeypatch.setattr(config_module, "HAS_TRITON", True)  # what a CUDA build has
    assert "speculative method 'custom_class'" in l4_config._get_v2_model_runner_unsupported_features()
    assert l4_config.use_v2_model_runner is False


# ---- auto-configuration under a fake CUDA platform ----------------------------------------------
CUDA = SimpleNamespace(is_cpu=lambda: False, is_cuda=lambda: True, device_name="cuda")


def _args(**kw):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(checkpoint_path(4)), **kw)


@pytest.mark.parametrize("dtype, backend", [("auto", "TRITON_ATTN"), ("float32", "TRITON_ATTN"),
                                            ("bfloat16", "FLASH_ATTN"), ("float16", "FLASH_ATTN")])
def test_cuda_gets_the_gpu_worker_and_a_backend_for_the_dtype(dtype, backend):
    from vllm_backend.registration.autoconfig import apply

    args = _args(dtype=dtype)
    apply(args, CUDA)
    assert args.worker_cls == "vllm_backend.worker.gpu_worker.BD3GPUWorker" and args.attention_backend == backend
    assert args.enforce_eager is True and args.enable_prefix_caching is False
    explicit = _args(dtype="bfloat16", attention_backend="TRITON_ATTN")
    apply(explicit, CUDA)
    assert explicit.attention_backend == "TRITON_ATTN"  # a user's valid choice stands


@pytest.mark.parametrize("kw, flag", [
    (dict(attention_backend="FLASHINFER", dtype="bfloat16"), "--attention-backend FLASHINFER"),
    (dict(attention_backend="FLEX_ATTENTION"), "--attention-backend FLEX_ATTENTION"),
    (dict(attention_backend="FLASH_ATTN", dtype="float32"), "--attention-backend FLASH_ATTN"),
    (dict(tensor_parallel_size=2), "--tensor-parallel-size 2"),
    (dict(pipeline_parallel_size=2), "--pipeline-parallel-size 2"),
    (dict(compilation_config={"cudagraph_mode": "FULL"}), "--compilation-config.cudagraph_mode FULL"),
    (dict(compilation_config={"cudagraph_mode": "FULL_AND_PIECEWISE"}), "cudagraph_mode FULL_AND_PIECEWISE"),
    (dict(compilation_config={"cudagraph_mode": "PIECEWISE"}), "--compilation-config.cudagraph_mode PIECEWISE"),
    (dict(compilation_config={"cudagraph_mode": "FULL_DECODE_ONLY"}), "cudagraph_mode FULL_DECODE_ONLY"),
    (dict(async_scheduling=True), "--async-scheduling"),
    (dict(worker_cls="vllm.v1.worker.gpu_worker.Worker"), "--worker-cls"),
    (dict(enable_prefix_caching=True), "--enable-prefix-caching"),
])
def test_cuda_refusals_are_one_line_naming_the_flag(kw, flag):
    from vllm_backend.registration.autoconfig import BD3ConfigError, apply

    with pytest.raises(BD3ConfigError) as info:
        apply(_args(**kw), CUDA)
    assert flag in str(info.value) and "\n" not in str(info.value)


@pytest.fixture(scope="module")
def cli_args():
    """EngineArgs from a `vllm serve` command line, through vLLM's own parser."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    return lambda argv: EngineArgs.from_cli_args(parser.parse_args(["--model", str(checkpoint_path(4)), *argv]))


@pytest.mark.parametrize("argv, flag", [
    (["--no-enforce-eager"], "--no-enforce-eager: "),
    (["--no_enforce_eager"], "--no-enforce-eager: "),
    (["--async-scheduling"], "--async-scheduling: "),
    (["-cc.cudagraph_mode", "PIECEWISE"], "--compilation-config.cudagraph_mode PIECEWISE: "),
    (["--compilation-config", '{"cudagraph_mode": "FULL_AND_PIECEWISE"}'],
     "--compilation-config.cudagraph_mode FULL_AND_PIECEWISE: "),
])
def test_eager_and_synchronous_steps_given_on_the_command_line_are_refused(cli_args, argv, flag):
    from vllm_backend.registration.autoconfig import BD3ConfigError, apply

    for platform in (CUDA, None):  # the fake CUDA build, and this CPU build
        with pytest.raises(BD3ConfigError) as info:
            apply(cli_args(argv), platform, argv)
        assert str(info.value).startswith(flag) and "\n" not in str(info.value)


@pytest.mark.parametrize("argv", [[], ["--enforce-eager"], ["--no-async-scheduling"], ["-cc.cudagraph_mode", "NONE"]])
def test_the_defaults_and_what_block_decoding_needs_anyway_run_eager_and_synchronous(cli_args, argv):
    from vllm_backend.registration.autoconfig import apply

    for platform in (CUDA, None):
        args = cli_args(argv)
        apply(args, platform, argv)
        assert args.enforce_eager is True and args.async_scheduling is False


def test_vllm_serve_reads_an_explicit_no_enforce_eager_from_its_command_line(monkeypatch):
    from vllm.usage.usage_lib import UsageContext

    from vllm_backend.registration.plugin import register

    register()
    args = _args(max_model_len=128)
    assert args.enforce_eager is False  # what EngineArgs holds with and without --no-enforce-eager
    monkeypatch.setattr(sys, "argv", ["vllm", "serve", str(checkpoint_path(4)), "--no-enforce-eager"])
    with pytest.raises(SystemExit) as info:
        args.create_engine_config(UsageContext.OPENAI_API_SERVER)
    assert str(info.value).startswith("Error: --no-enforce-eager: ") and "\n" not in str(info.value)
    args.create_engine_config()  # vllm.LLM: the script's own command line is not vLLM's


def test_model_runner_v2_and_other_platforms_are_refused(monkeypatch):
    from vllm_backend.registration.autoconfig import BD3ConfigError, apply

    rocm = SimpleNamespace(is_cpu=lambda: False, is_cuda=lambda: False, device_name="rocm")
    with pytest.raises(BD3ConfigError, match="CPU and CUDA builds, not on rocm"):
        apply(_args(), rocm)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(BD3ConfigError, match="^VLLM_USE_V2_MODEL_RUNNER=1: .*unset it or set it to 0$"):
        apply(_args(), CUDA)


def test_the_cpu_platform_keeps_the_cpu_worker_and_its_backend():
    from vllm_backend.registration.autoconfig import BD3ConfigError, apply

    args = _args()
    apply(args)  # vLLM's current platform: this CPU build
    assert args.worker_cls == "vllm_backend.worker.cpu_worker.BD3CPUWorker" and args.attention_backend is None
    with pytest.raises(BD3ConfigError, match="--attention-backend TRITON_ATTN"):
        apply(_args(attention_backend="TRITON_ATTN"))


@pytest.mark.parametrize("kw, flag", [(dict(max_num_batched_tokens=3), "--max-num-batched-tokens 3"),
                                      (dict(max_model_len=126), "--max-model-len 126")])
def test_budgets_that_cannot_hold_whole_blocks_are_refused_at_start_up(kw, flag):
    from vllm.usage.usage_lib import UsageContext

    from vllm_backend.registration.autoconfig import BD3ConfigError
    from vllm_backend.registration.plugin import register

    register()
    with pytest.raises(BD3ConfigError, match=flag):
        _args(**kw).create_engine_config()  # vllm.LLM: the ValueError, raised in the caller's process
    with pytest.raises(SystemExit) as info:  # vllm serve: one line and exit status 1
        _args(**kw).create_engine_config(UsageContext.OPENAI_API_SERVER)
    assert str(info.value).startswith(f"Error: {flag}") and "\n" not in str(info.value)
    _args(max_num_batched_tokens=10, max_model_len=128).create_engine_config()  # 10 at L' = 4 is fine


@early_fixture
def refused_serve(folder):
    """`vllm serve` with a flag BD3 refuses, run early (tests/early.py)."""
    vllm = str(Path(sys.executable).with_name("vllm"))
    return subprocess.run([vllm, "serve", str(checkpoint_path(4)), "--tensor-parallel-size", "2"],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.cli
def test_vllm_serve_prints_one_line_for_a_refusal(refused_serve):
    r = refused_serve
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith("Error: --tensor-parallel-size 2: BD3 checkpoints run on one")


# ---- the plugin is inert for other models --------------------------------------------------------------
# A random stock Llama saved to argv[1] (head_dim 32), then its greedy tokens through vLLM as if bd3-plugin
# were not installed: none of its entry points exist in this process (tests/vllm_llama_worker.py's job).
WITHOUT_PLUGIN = r"""
import importlib.metadata as md, json, os, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))
llama.save_pretrained(sys.argv[1])
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
everything = md.entry_points
def entry_points(**kw):
    found = everything(**kw)
    if "group" not in kw:
        return found
    return md.EntryPoints(e for e in found if not e.value.startswith("vllm_backend"))
md.entry_points = entry_points
sys.path.insert(0, sys.argv[2])
import vllm_llama_worker
print("RESULT " + json.dumps(vllm_llama_worker.run({"checkpoint": sys.argv[1]})))
"""


@early_fixture
def llama_without_plugin(folder):
    """The Llama checkpoint and its tokens without the plugin, from a fresh process run early (tests/early.py)."""
    return folder, _run(WITHOUT_PLUGIN, str(folder), str(Path(__file__).parent), timeout=600)


@pytest.mark.engine
def test_a_stock_llama_gives_the_same_greedy_tokens_with_and_without_the_plugin(engines, llama_without_plugin):
    checkpoint, without = llama_without_plugin
    with_plugin = engines.run("llama", {"checkpoint": str(checkpoint)})  # the session's engine process
    assert with_plugin["plugin"] and not without["plugin"]
    assert with_plugin["worker"] == without["worker"] == "vllm.v1.worker.cpu_worker.CPUWorker"
    assert with_plugin["tokens"] == without["tokens"] and len(set(map(tuple, without["tokens"]))) > 1
