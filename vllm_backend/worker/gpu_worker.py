"""The BD3 worker and runner for vLLM's GPU (CUDA) build: vLLM's GPU `Worker` with the BD3 runner built
by the worker's own runner factory, `_make_model_runner`. Imports no CPU worker module."""
from __future__ import annotations

from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from vllm_backend.worker.runner import BD3RunnerMixin, BD3WorkerMixin
from vllm_backend.worker.weights import BD3WeightSync

V2_REFUSED = ("BD3 checkpoints run on vLLM's V1 model runner (several model passes per step); "
              "unset VLLM_USE_V2_MODEL_RUNNER or set it to 0")


class BD3GPUModelRunner(BD3RunnerMixin, GPUModelRunner):
    pass


class BD3GPUWorker(BD3WorkerMixin, BD3WeightSync, Worker):
    def _make_model_runner(self) -> BD3GPUModelRunner:
        if self.use_v2_model_runner:
            raise ValueError(V2_REFUSED)
        return BD3GPUModelRunner(self.vllm_config, self.device)
