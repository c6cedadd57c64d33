#!/usr/bin/env bash
# Runtime benchmark: dagrun vs PyTorch eager (2 threads) on the same Llama shape.
# Prints tokens/s for an AdamW training step and for KV-cache greedy generation, the ratios, and
# dagrun's achieved GFLOP/s against this machine's practical f32 matmul peak (~220 on 2 cores).
#
#   pip install torch transformers      # ~3 GB with CUDA libraries; not needed by CI
#   bash bench/runtime.sh [--layers 4 --hidden 256 ...]   # flags go to both sides
set -euo pipefail
cd "$(dirname "$0")/.."
PEAK_GFLOPS="${PEAK_GFLOPS:-220}"
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-2}"

cargo build --release --quiet --bin dagrun
DAGRUN=("${CARGO_TARGET_DIR:-target}/release/dagrun" bench)
# Alternate the two sides a few times and report medians (and the median of the pairwise
# ratios): on a shared 2-core machine a single run can be slowed by anything else that wakes up.
RUNS="${RUNS:-5}"
ours=()
theirs=()
for _ in $(seq "$RUNS"); do
    ours+=("$("${DAGRUN[@]}" "$@" --json | tail -n 1)")
    theirs+=("$(python3 bench/torch_llama.py "$@" | tail -n 1)")
done

python3 - "$PEAK_GFLOPS" "$RUNS" "${ours[@]}" "${theirs[@]}" <<'PY'
import json, sys
peak, runs = float(sys.argv[1]), int(sys.argv[2])
rows = [json.loads(a) for a in sys.argv[3:]]
from statistics import median
keys = ("train_tok_s", "gen_tok_s", "gflops")
med = lambda rs: {k: median(r[k] for r in rs) for k in keys}
ours, theirs = med(rows[:runs]), med(rows[runs:])
pair = {k: median(a[k] / b[k] for a, b in zip(rows[:runs], rows[runs:])) for k in keys}
print(f"medians of {runs} alternating runs (ratio: median of the pairwise ratios)")
print(f"{'':14}{'dagrun':>10}{'pytorch':>10}{'ratio':>8}")
for key in ("train_tok_s", "gen_tok_s"):
    print(f"{key:14}{ours[key]:10.0f}{theirs[key]:10.0f}{pair[key]:8.2f}x")
print(f"{'gflops':14}{ours['gflops']:10.1f}{theirs['gflops']:10.1f}   ({100 * ours['gflops'] / peak:.0f}% of ~{peak:.0f} GFLOP/s peak)")
PY
