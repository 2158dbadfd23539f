"""The engine side: BD3 model, runner, block metadata, scheduler and proposer, recording, resumed blocks,
per-request sampler settings and weight updates. `cpu_worker` is imported only inside a CPU worker process."""
