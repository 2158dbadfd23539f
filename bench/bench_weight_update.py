"""Seconds to put new weights into a running vLLM engine (`vllm_backend.rollout.update_weights`) from a
checkpoint folder and from an in-memory state dict, against starting a fresh engine on the same checkpoint,
side by side in one run.

    python bench/bench_weight_update.py [--checkpoint PATH] [--repeats 20] [--multiprocess]

`--multiprocess` runs the engine in its own processes with the worker extension (state dicts then travel
as one safetensors buffer); the default is an in-process engine, where the update runs as a callable.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
if "--multiprocess" not in sys.argv:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def seconds(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default=None, help="default: tiny-bd3-L4")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--multiprocess", action="store_true")
    args = parser.parse_args()

    import torch
    from safetensors.torch import load_file
    from vllm import LLM

    from bd3_plugin.tinyworld.data import checkpoint_path
    from vllm_backend.rollout import update_weights

    folder = args.checkpoint or str(checkpoint_path(4))
    kwargs = {"max_model_len": 128, "seed": 0, "enforce_eager": True}
    start = time.perf_counter()
    llm = LLM(folder, **kwargs)
    fresh = time.perf_counter() - start
    state = load_file(os.path.join(folder, "model.safetensors"))
    numel = sum(t.numel() for t in state.values())
    from_folder = seconds(lambda: update_weights(llm, folder, "folder"), args.repeats)
    from_state = seconds(lambda: update_weights(llm, state, "state"), args.repeats)
    print(f"# {platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{'engine in its own processes' if args.multiprocess else 'in-process engine'}, "
          f"{folder.rstrip('/').split('/')[-1]} ({len(state)} tensors, {numel / 1e6:.2f} M parameters)")
    print(f"fresh engine {fresh:7.2f} s   update from folder {from_folder * 1e3:7.1f} ms   "
          f"from state dict {from_state * 1e3:7.1f} ms   "
          f"ratio {fresh / from_folder:6.0f}x / {fresh / from_state:6.0f}x")


if __name__ == "__main__":
    main()
