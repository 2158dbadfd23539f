"""The BD3 worker and runner for vLLM's GPU (CUDA) build: vLLM's GPU `Worker` with the BD3 runner built
by the worker's own runner factory, `_make_model_runner`. Imports no CPU worker module."""
from __future__ import annotations

import os

import torch
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from vllm_backend.worker.runner import BD3RunnerMixin, BD3WorkerMixin
from vllm_backend.worker.weights import BD3WeightSync

V2_REFUSED = ("BD3 checkpoints run on vLLM's V1 model runner (several model passes per step); "
              "unset VLLM_USE_V2_MODEL_RUNNER or set it to 0")


def ieee_float32(dtype: torch.dtype, environ=os.environ) -> bool:
    """For a float32 model, make every float32 matmul IEEE in this process: Triton's `tl.dot` (TRITON_ATTN's
    kernels read TRITON_F32_DEFAULT when they compile, and it is part of Triton's cache key), cuBLAS and cuDNN
    (TF32 off). Without it the attention and the linear layers round their inputs to TF32 and tokens near a
    tie differ from the core's. Half-precision models keep the fast kernels. True when it applied."""
    if dtype != torch.float32:
        return False
    environ["TRITON_F32_DEFAULT"] = "ieee"
    # The legacy switches, as vLLM's Worker uses them: mixing them with torch's fp32_precision API is an error.
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return True


class BD3GPUModelRunner(BD3RunnerMixin, GPUModelRunner):
    pass


class BD3GPUWorker(BD3WorkerMixin, BD3WeightSync, Worker):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # In the worker's own process (the one that compiles the kernels), after vLLM's Worker has set the
        # matmul precision from VLLM_FLOAT32_MATMUL_PRECISION and before the model loads.
        ieee_float32(self.vllm_config.model_config.dtype)

    def _make_model_runner(self) -> BD3GPUModelRunner:
        if self.use_v2_model_runner:
            raise ValueError(V2_REFUSED)
        return BD3GPUModelRunner(self.vllm_config, self.device)
