"""vLLM general plugin: teaches transformers the bd3lm/mdlm config types and vLLM the BD3LM/MDLM
architectures. vLLM calls `register` in every process (API server, engine core, workers), for every model; it
is idempotent, and it imports no vLLM worker or runner module (vLLM's CPU worker patches torch globals on
import): the BD3 workers are named by string and loaded by vLLM only where a BD3 checkpoint runs."""
from __future__ import annotations

MODEL = "vllm_backend.worker.model:BD3ForVLLM"


def register() -> None:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from vllm import ModelRegistry

    from vllm_backend.registration.hf_config import BD3HFConfig, MDLMHFConfig

    for cls in (BD3HFConfig, MDLMHFConfig):
        if cls.model_type not in CONFIG_MAPPING:
            AutoConfig.register(cls.model_type, cls)
    for arch in ("BD3LM", "MDLM"):
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, MODEL)
    from vllm_backend.registration.autoconfig import install

    install()
