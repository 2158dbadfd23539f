#!/usr/bin/env bash
# Rebuilds the tiny world shipped in bd3_plugin/: the held-out documents with their exact log-probs and
# one checkpoint per block size, each trained by the one `bd3 train` command below (about 13 minutes on
# 2 CPU cores). Training runs go to runs/ (resumable there); the checkpoint files are then copied in.
#   bash scripts/build_tiny_world.sh [L ...]        # default: 1 4 16 128
# With `copy` first it rebuilds the copy task instead: its held-out items and one checkpoint per block size
# (about 7 minutes each on one CPU thread, OMP_NUM_THREADS=1 as they were trained).
#   bash scripts/build_tiny_world.sh copy [L ...]   # default: 4 16
set -euo pipefail
cd "$(dirname "$0")/.."
bd3=.venv/bin/bd3
if [ "${1:-}" = copy ]; then
    shift
    .venv/bin/python -c "from bd3_plugin.tinyworld.data import COPY_HELDOUT, write_copy_heldout; write_copy_heldout(COPY_HELDOUT, 200)"
    for size in ${@:-4 16}; do
        OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} $bd3 train --source copy --out "runs/tiny-bd3-copy-L$size" \
            --block-size "$size" --steps 800 --batch-size 16 --lr 2e-3 --ema 0.995 --n-docs 100000 --resume
        dest="bd3_plugin/checkpoints/tiny-bd3-copy-L$size"
        mkdir -p "$dest"
        cp "runs/tiny-bd3-copy-L$size"/{config.json,model.safetensors,tokenizer.json,tokenizer_config.json} "$dest/"
    done
    exit 0
fi
.venv/bin/python -c "from bd3_plugin.tinyworld.data import HELDOUT, write_heldout; write_heldout(HELDOUT, 400)"
for L in "${@:-1 4 16 128}"; do
    for size in $L; do
        extra=()
        # L' = 1 trains with full masking (t = 1): the AR objective, the tight end of the family.
        [ "$size" = 1 ] && extra=(--eps-min 1 --eps-max 1)
        $bd3 train --out "runs/tiny-bd3-L$size" --block-size "$size" --steps 1500 --n-docs 100000 \
            --resume "${extra[@]}"
        dest="bd3_plugin/checkpoints/tiny-bd3-L$size"
        mkdir -p "$dest"
        cp "runs/tiny-bd3-L$size"/{config.json,model.safetensors,tokenizer.json,tokenizer_config.json} "$dest/"
    done
done
