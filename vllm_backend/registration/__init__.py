"""What vLLM loads for every model: the general plugin, the transformers config classes, and the engine
arguments that a BD3 checkpoint needs (auto-configuration). Imports no worker module of vLLM."""
