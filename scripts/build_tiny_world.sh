#!/usr/bin/env bash
# Rebuilds the tiny world shipped in bd3_plugin/: the held-out documents with their exact log-probs and
# one checkpoint per block size, each trained by the one `bd3 train` command below (about 13 minutes on
# 2 CPU cores). Training runs go to runs/ (resumable there); the checkpoint files are then copied in.
#   bash scripts/build_tiny_world.sh [L ...]        # default: 1 4 16 128
# With `copy` it rebuilds the copy task instead: its held-out items, the L' = 16 checkpoint from scratch, then
# L' = 4 fine-tuned from it (trained with OMP_NUM_THREADS=1, one thread each).
#   bash scripts/build_tiny_world.sh copy
set -euo pipefail
cd "$(dirname "$0")/.."
bd3=.venv/bin/bd3
if [ "${1:-}" = copy ]; then
    .venv/bin/python -c "from bd3_plugin.tinyworld.data import COPY_HELDOUT, write_copy_heldout; write_copy_heldout(COPY_HELDOUT, 200)"
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    common=(--source copy --batch-size 16 --ema 0.995 --n-docs 100000 --resume)
    $bd3 train --out runs/tiny-bd3-copy-L16 --block-size 16 --steps 800 --lr 2e-3 "${common[@]}"
    # From scratch at L' = 4 the copy is not found within 400 steps; the L' = 16 weights already copy at
    # L' = 4 (only the attention masks change), so L' = 4 is fine-tuned from them.
    $bd3 train --out runs/tiny-bd3-copy-L4 --block-size 4 --steps 300 --lr 1e-3 --warmup 20 \
        --init-from runs/tiny-bd3-copy-L16 "${common[@]}"
    for size in 16 4; do
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
