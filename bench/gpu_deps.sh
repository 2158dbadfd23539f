#!/usr/bin/env bash
# Collects the pure-Python packages that bench/gpu_check.sh needs beyond torch and transformers (pytest and
# lm-eval's model API, without its 75 MB of task files) from this machine's .venv into runs/gpu_deps, for a
# CUDA machine that has torch but not these. gpu_check.sh puts runs/gpu_deps on PYTHONPATH when it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
out=runs/gpu_deps
rm -rf "$out" && mkdir -p "$out"
for name in pytest _pytest pluggy iniconfig py.py sqlitedict.py; do
    [ -e "$site/$name" ] && cp -r "$site/$name" "$out/"
done
cp -r "$site"/pytest-*.dist-info "$site"/pluggy-*.dist-info "$site"/iniconfig-*.dist-info \
      "$site"/lm_eval-*.dist-info "$out/"
mkdir -p "$out/lm_eval/tasks"
(cd "$site/lm_eval" && tar --exclude=./tasks --exclude=__pycache__ -cf - .) | tar -xf - -C "$out/lm_eval"
cp "$site/lm_eval/tasks/__init__.py" "$out/lm_eval/tasks/"
find "$out" -name __pycache__ -prune -exec rm -rf {} +
du -sh "$out"
