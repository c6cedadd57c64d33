"""Paired differences between the models of an eval table, with standard errors over problems.

The eval stage pairs every model with the first one; this pairs each model with the one
before it too (e.g. the second SFT round against the RL model).

    dagrun export eval.results -p pipelines/r1.yaml /tmp/eval.parquet
    python3 bench/paired_eval.py /tmp/eval.parquet      # needs pyarrow, pandas
"""

import sys

import numpy as np
import pyarrow.parquet as pq

table = pq.read_table(sys.argv[1]).to_pandas()
models = list(dict.fromkeys(table["model"]))


def column(model, name):
    return table[table.model == model].set_index("id")[name].astype(float)


pairs = list(zip(models, models[1:])) + [(models[0], m) for m in models[2:]]
print("| model | against | Δ greedy | Δ pass@1 | Δ maj@k |")
print("|---|---|---:|---:|---:|")
for before, after in pairs:
    cells = []
    for name in ["correct", "pass1", "majk"]:
        d = (column(after, name) - column(before, name)).dropna()
        cells.append(f"{d.mean() * 100:+.1f} ± {d.std(ddof=1) / np.sqrt(len(d)) * 100:.1f}")
    print(f"| {after} | {before} | " + " | ".join(cells) + " |")
