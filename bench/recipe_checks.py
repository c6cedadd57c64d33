"""The whole-recipe table and issue 9's checks from an eval table with PRM reranking.

Per model: greedy, pass@1, maj@k, PRM@k (best of k by the PRM's score) and pass@k, with
standard errors over problems; then the paired checks: the distilled student's pass@1 as a
share of its teacher's, the student against the same student trained by SFT on the cold-start
data, and PRM@k against maj@k for every model.

    dagrun export eval.results -p pipelines/r1.yaml /tmp/eval.parquet
    python3 bench/recipe_checks.py /tmp/eval.parquet [teacher student baseline]
    # defaults: second_sft student student_sft; needs pyarrow, pandas
"""

import sys

import numpy as np
import pyarrow.parquet as pq

table = pq.read_table(sys.argv[1]).to_pandas()
teacher, student, baseline = (sys.argv[2:5] + ["second_sft", "student", "student_sft"][len(sys.argv[2:5]):])
models = list(dict.fromkeys(table["model"]))


def column(model, name):
    return table[table.model == model].set_index("id")[name].astype(float)


def mean_se(x):
    x = x.dropna()
    return x.mean() * 100, x.std(ddof=1) / np.sqrt(len(x)) * 100


def cell(x):
    m, se = mean_se(x)
    return f"{m:.1f} ± {se:.1f}"


k = int(table["k"].iloc[0])
has_prm = "prm_correct" in table.columns and table["prm_correct"].notna().any()
print(f"| model | greedy | pass@1 | maj@{k} | PRM@{k} | pass@{k} |")
print("|---|---:|---:|---:|---:|---:|")
for m in models:
    prm = cell(column(m, "prm_correct")) if has_prm else "-"
    print(
        f"| {m} | {cell(column(m, 'correct'))} | {cell(column(m, 'pass1'))} | "
        f"{cell(column(m, 'maj_correct'))} | {prm} | {cell(column(m, 'passk'))} |"
    )

print()
if teacher in models and student in models:
    t, s = column(teacher, "pass1"), column(student, "pass1")
    print(f"{student} pass@1 / {teacher} pass@1: {s.mean() / t.mean():.3f} (check: ≥ 0.90)")
if student in models and baseline in models:
    d = column(student, "pass1") - column(baseline, "pass1")
    print(f"{student} − {baseline} pass@1: {cell(d)} points (check: ≥ +10)")
if has_prm:
    for m in models:
        d = column(m, "prm_correct") - column(m, "maj_correct")
        print(f"{m}: PRM@{k} − maj@{k}: {cell(d)} points (check: ≥ +2)")
