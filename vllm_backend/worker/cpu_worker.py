"""The BD3 worker and runner for vLLM's CPU build.

The only module that imports vLLM's CPU worker: that import replaces torch.cuda.Event, torch.cuda.Stream and
torch.Tensor.pin_memory process-wide (`vllm/v1/worker/cpu/shm.py`), so it happens only in a worker process
that vLLM told to load this class by name (`worker_cls`).
"""
from __future__ import annotations

import torch
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_backend.worker.runner import BD3RunnerMixin, BD3WorkerMixin
from vllm_backend.worker.weights import BD3WeightSync


class BD3CPUModelRunner(BD3RunnerMixin, CPUModelRunner):
    pass


class BD3CPUWorker(BD3WorkerMixin, BD3WeightSync, CPUWorker):
    def init_device(self) -> None:
        # CPUWorker.init_device builds vLLM's CPUModelRunner itself (no factory method to override) after
        # setting up threads and the distributed environment; the runner holds only empty buffers until
        # load_model, so it is replaced here, before anything is loaded into it.
        super().init_device()
        self.model_runner = self._make_model_runner()

    def _make_model_runner(self) -> BD3CPUModelRunner:
        return BD3CPUModelRunner(self.vllm_config, torch.device("cpu"))
