"""`bd3 serve`: vLLM's OpenAI-compatible server for a BD3 checkpoint (vllm_backend.server.serve)."""
from __future__ import annotations

import argparse
from pathlib import Path

from bd3_plugin.cli.common import UsageError, checkpoint_arg, subparser, user_input


def add_parser(sub) -> None:
    p = subparser(sub, "serve", help="serve a checkpoint with vLLM's OpenAI-compatible server",
                  usage="bd3 serve [CHECKPOINT] [--host H] [--port N] [--max-model-len M] "
                        "[--weight-update-root DIR] [--ray-replicas N [--ray-address A]] [vllm serve arguments] "
                        "[-- vllm serve arguments]")
    p.add_argument("checkpoint", nargs="?", default=None, help="checkpoint folder (default: tiny-bd3-L4)")
    p.add_argument("--host", default=None, help="default: 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default: 8000")
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model length")
    p.add_argument("--weight-update-root", metavar="DIR", default=None,
                   help="add POST /bd3/update_weights, which loads checkpoints found inside DIR only "
                        "(default: no update route)")
    p.add_argument("--ray-replicas", type=int, default=None, metavar="N",
                   help="serve with N Ray Serve replicas of the engine behind one route (ray_jobs/serve.py; "
                        "default: one vLLM server process, no Ray)")
    p.add_argument("--ray-address", default=None, metavar="A",
                   help="with --ray-replicas: an existing Ray cluster, HOST:PORT or auto (default: start a new "
                        "local instance)")


def parse_serve(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`bd3 serve` arguments: bd3's own options anywhere before `--`; every other argument, and everything
    after `--`, goes to `vllm serve` unchanged, in order, once."""
    cut = argv.index("--") if "--" in argv else len(argv)
    args, unknown = parser.parse_known_args(argv[:cut])
    args.vllm_args = unknown + argv[cut + 1 :]
    return args


def run(args) -> dict:
    from bd3_plugin.core.checkpoint import checkpoint_folder

    checkpoint = str(checkpoint_folder(checkpoint_arg(args)))
    extra = args.vllm_args
    root = None
    if args.weight_update_root is not None:
        root = Path(args.weight_update_root).expanduser().resolve()
        if not root.is_dir():
            raise UsageError(f"--weight-update-root {args.weight_update_root} is not a folder")
    try:
        from vllm_backend.server.serve import command, engine_kwargs, environment, exec_server, warn_open_update
    except ImportError as err:
        raise UsageError(f"vLLM is not installed ({err}); install bd3-plugin[cpu] or bd3-plugin[gpu]") from None
    if args.ray_replicas is None:
        if args.ray_address is not None:
            raise UsageError("--ray-address needs --ray-replicas")
        with user_input():  # a flag given twice, to bd3 serve and to vllm serve
            exec_server(checkpoint, args.host, args.port, args.max_model_len, extra, root)
        return {}
    if args.ray_replicas < 1:
        raise UsageError(f"--ray-replicas must be >= 1, got {args.ray_replicas}")
    try:
        from ray_jobs.cluster import ClusterError
        from ray_jobs.serve import serve_replicas
    except ImportError as err:
        raise UsageError(f"--ray-replicas needs Ray Serve ({err}); install bd3-plugin[ray]") from None
    with user_input():  # as above, and an argument vLLM's parser refuses: before Ray starts
        argv = command(checkpoint, args.host, args.port, args.max_model_len, extra)
        kwargs = engine_kwargs(argv)
    warn_open_update(argv, environment(root), root)
    try:
        serve_replicas(checkpoint, kwargs, args.ray_replicas, args.ray_address, root)
    except ClusterError as err:
        raise UsageError(str(err)) from None
    return {}
