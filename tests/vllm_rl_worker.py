"""Job of tests/vllm_jobs.py for tests/test_rl.py: `bd3 rl --engine vllm ARGS` through the CLI's `main`, the
engine in this process (as `bd3 rl` builds it); returns the exit status."""


def run(spec: dict) -> int:
    from bd3_plugin.cli.main import main

    return main(["rl", *spec["argv"]])
