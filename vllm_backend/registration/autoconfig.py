"""Plain `vllm serve <bd3 checkpoint>` and `vllm.LLM(<bd3 checkpoint>)`: when the model's config.json says
bd3lm/mdlm, the engine arguments that block decoding needs are filled in before vLLM builds its config,
for the platform vLLM runs on (CPU or CUDA). A setting block decoding cannot run under is refused with one
line that names the flag: `vllm serve` prints it and exits with status 1, `vllm.LLM` raises it as a
ValueError.

The checkpoint's config.json is read before vLLM reads it (`hub_config.py`): a hub id not yet downloaded is
fetched as vLLM would fetch it, and one whose config cannot be read is refused rather than started without
block decoding.

On the plugin's registration path: imports no vLLM worker or runner module (see `engine.py`).
"""
from __future__ import annotations

import sys
from pathlib import Path

from bd3_plugin.core.config import BD3Config
from vllm_backend.registration.hub_config import ConfigUnreadable, read_model_config
from vllm_backend.worker.engine import engine_kwargs

_PATCHED = "_bd3_autoconfig"
# Attention backends whose kernels take a batch-wide causal=False over the paged cache with many short
# query pieces: Triton (fp16, bf16, fp32) and FlashAttention (fp16, bf16). FlashInfer and FlexAttention
# keep per-request buffers sized by max_num_seqs, which the block pieces overflow.
BACKENDS = {"float32": "TRITON_ATTN", "bfloat16": "FLASH_ATTN", "float16": "FLASH_ATTN"}
DTYPES = {"auto": "float32", "float": "float32", "float32": "float32", "half": "float16", "float16": "float16",
          "bfloat16": "bfloat16"}


class BD3ConfigError(ValueError):
    """An engine setting block decoding cannot run under; the message is one line naming the flag."""


def bd3_block_size(model: str, revision: str | None = None, token: bool | str | None = None) -> int | None:
    """The block size of a BD3/MDLM checkpoint, a local folder or a hub id (cached, else fetched); None for
    anything else. A hub id whose config.json cannot be read is refused (BD3ConfigError)."""
    try:
        raw = read_model_config(model, revision, token)
    except ConfigUnreadable as err:
        raise BD3ConfigError(f"{model}: cannot tell whether it is a BD3 checkpoint, its config.json could not be "
                             f"read: {err}") from None
    return BD3Config.from_dict(raw).block_size if raw is not None and BD3Config.describes(raw) else None


def _block_size(args) -> int | None:
    """The block size of the checkpoint an EngineArgs names, read where vLLM reads its config (--hf-config-path,
    else the model; the revision and token). Other config formats (e.g. mistral) are not BD3 checkpoints; ids
    on ModelScope are not read (there the model class's own check refuses a BD3 checkpoint)."""
    from vllm import envs

    config_format = str(getattr(args.config_format, "value", args.config_format))
    model = str(args.hf_config_path or args.model)
    if config_format not in ("auto", "hf") or model.endswith(".gguf"):
        return None
    if envs.VLLM_USE_MODELSCOPE and not Path(model).expanduser().exists():
        return None
    return bd3_block_size(model, args.revision, args.hf_token)


def _device(platform) -> str:
    if platform.is_cpu():
        return "cpu"
    if platform.is_cuda():
        return "cuda"
    raise BD3ConfigError(f"BD3 checkpoints run on vLLM's CPU and CUDA builds, not on {platform.device_name}")


def _dtype(args) -> str:
    name = str(args.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise BD3ConfigError(f"--dtype {args.dtype} is not supported for BD3 checkpoints (float32, bfloat16, float16)")
    return DTYPES[name]


def _check_parallel(args) -> None:
    for flag, value in (("--tensor-parallel-size", args.tensor_parallel_size),
                        ("--pipeline-parallel-size", args.pipeline_parallel_size),
                        ("--decode-context-parallel-size", args.decode_context_parallel_size),
                        ("--prefill-context-parallel-size", args.prefill_context_parallel_size)):
        if value not in (None, 1):
            raise BD3ConfigError(f"{flag} {value}: BD3 checkpoints run on one device (the DiT is not sharded)")


def _check_logprobs_mode(args) -> None:
    mode = getattr(args, "logprobs_mode", "raw_logprobs")
    if mode not in ("raw_logprobs", "processed_logprobs"):
        raise BD3ConfigError(f"--logprobs-mode {mode}: BD3 checkpoints return raw_logprobs (the model at temperature "
                             f"1) or processed_logprobs (the distribution sampled), both at each token's reveal pass")


# Why a BD3 step runs eager: after vLLM's own pass, the runner's further denoising passes run the model over
# token counts that vLLM neither pads nor captures in CUDA graphs.
EAGER = ("each BD3 step runs further model passes of sizes vLLM neither pads nor captures, so BD3 checkpoints "
         "run eager")


def given_flags(argv) -> set[str]:
    """The long options on a command line, as vLLM reads them (`--no_enforce_eager` is `--no-enforce-eager`)."""
    return {a.split("=", 1)[0].replace("_", "-") for a in argv if a.startswith("--")}


def _check_eager_and_synchronous(args, argv) -> None:
    """CUDA graphs, compiled mode and async scheduling are refused where the user asked for them. Their
    defaults (cudagraph_mode and async_scheduling None, enforce_eager False) say nothing; an explicit
    `--no-enforce-eager` equals the default in EngineArgs, so it is read from the command line."""
    mode = args.compilation_config.cudagraph_mode
    name = str(getattr(mode, "name", mode)).upper()
    if mode is not None and name != "NONE":
        why = ("full CUDA graphs replay capture-time attention metadata, but every BD3 pass splits it into block "
               "pieces" if "FULL" in name else EAGER)
        raise BD3ConfigError(f"--compilation-config.cudagraph_mode {name}: {why}; use NONE (the default for BD3 "
                             "checkpoints)")
    if "--no-enforce-eager" in given_flags(argv):
        raise BD3ConfigError(f"--no-enforce-eager: {EAGER}; leave --enforce-eager on (the default for BD3 "
                             "checkpoints)")
    if args.async_scheduling:
        raise BD3ConfigError("--async-scheduling: each BD3 step is scheduled from the block the previous step "
                             "decoded (BD3Scheduler rewinds to it); use --no-async-scheduling (the default for BD3 "
                             "checkpoints)")


def _attention_backend(args, device: str, dtype: str):
    """The backend to set (None: leave vLLM's choice), or BD3ConfigError naming --attention-backend."""
    chosen = args.attention_backend or args.attention_config.backend
    name = getattr(chosen, "name", chosen)
    name = None if name in (None, "auto") else str(name).upper()
    if device == "cpu":
        if name not in (None, "CPU_ATTN"):
            raise BD3ConfigError(f"--attention-backend {name}: vLLM's CPU build runs BD3 checkpoints on CPU_ATTN")
        return None
    if name is None:
        return BACKENDS[dtype]
    if name == "FLASH_ATTN" and dtype == "float32":
        raise BD3ConfigError("--attention-backend FLASH_ATTN runs float16/bfloat16 only: use TRITON_ATTN for "
                             "float32, or --dtype bfloat16")
    if name not in ("TRITON_ATTN", "FLASH_ATTN"):
        raise BD3ConfigError(f"--attention-backend {name}: BD3 block pieces need TRITON_ATTN or FLASH_ATTN "
                             "(FlashInfer and FlexAttention size per-request buffers by max_num_seqs)")
    return None


def _take(args, name: str, wanted, flag: str) -> None:
    current = getattr(args, name)
    if current not in (None, "auto", wanted):
        raise BD3ConfigError(f"{flag} {current}: a BD3 checkpoint needs {wanted}")
    setattr(args, name, wanted)


def apply(args, platform=None, argv=()) -> None:
    """Fill in the block-decoding engine arguments on an EngineArgs for a BD3 checkpoint, for `platform`
    (default: vLLM's current platform); `argv` is the command line of a `vllm serve` (flags given there)."""
    size = _block_size(args)
    if size is None:
        return
    from vllm import envs

    if platform is None:
        from vllm.platforms import current_platform as platform
    device = _device(platform)
    if envs.VLLM_USE_V2_MODEL_RUNNER:
        raise BD3ConfigError("VLLM_USE_V2_MODEL_RUNNER=1: BD3 checkpoints run on vLLM's V1 model runner "
                             "(several model passes per step); unset it or set it to 0")
    dtype = _dtype(args)
    _check_logprobs_mode(args)
    _check_parallel(args)
    _check_eager_and_synchronous(args, argv)
    backend = _attention_backend(args, device, dtype)
    wanted = engine_kwargs(size, device)
    _take(args, "speculative_config", wanted["speculative_config"], "--speculative-config")
    _take(args, "scheduler_cls", wanted["scheduler_cls"], "--scheduler-cls")
    _take(args, "worker_cls", wanted["worker_cls"], "--worker-cls")
    if args.enable_prefix_caching:
        raise BD3ConfigError("--enable-prefix-caching: not supported for BD3 checkpoints "
                             "(use --no-enable-prefix-caching)")
    args.enable_prefix_caching = False
    args.enforce_eager = True
    args.async_scheduling = False
    args.dtype = dtype  # auto: float32, the checkpoints' dtype and the core's: tokens match it exactly
    if backend is not None:
        args.attention_backend = backend


def check_blocks(config) -> None:
    """Start-up refusal of a built VllmConfig whose token budget or length cannot hold whole blocks."""
    if not getattr(config.model_config.hf_config, "to_bd3", None):
        return
    size = config.model_config.hf_config.to_bd3().block_size
    budget = config.scheduler_config.max_num_batched_tokens
    length = config.model_config.max_model_len
    if budget < size:
        raise BD3ConfigError(f"--max-num-batched-tokens {budget} cannot hold one block of {size} tokens; "
                             f"use at least {size}")
    if length % size:
        raise BD3ConfigError(f"--max-model-len {length} is not a whole number of blocks of {size} tokens; "
                             f"use {length - length % size} or {length - length % size + size}")


# The usage contexts of vLLM's command-line servers: their refusals are one printed line, and the command
# line they were started with says which flags the user gave.
CLI_CONTEXTS = ("OPENAI_API_SERVER", "API_SERVER", "OPENAI_BATCH_RUNNER")


def _from_cli(usage_context) -> bool:
    return getattr(usage_context, "name", "") in CLI_CONTEXTS


def _refuse(error: BD3ConfigError, usage_context) -> None:
    """`vllm serve` gets one line and exit status 1; the Python API gets the ValueError."""
    if _from_cli(usage_context):
        raise SystemExit(f"Error: {error}") from None
    raise error


def install() -> None:
    """Wrap EngineArgs.create_engine_config once per process."""
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.create_engine_config, _PATCHED, False):
        return
    original = EngineArgs.create_engine_config

    def create_engine_config(self, usage_context=None, *args, **kwargs):
        try:
            apply(self, argv=sys.argv[1:] if _from_cli(usage_context) else ())
            config = original(self, usage_context, *args, **kwargs)
            check_blocks(config)
        except BD3ConfigError as error:
            _refuse(error, usage_context)
        return config

    setattr(create_engine_config, _PATCHED, True)
    EngineArgs.create_engine_config = create_engine_config
