"""Checks the README's Python snippet for a likelihood-head PRM against dagrun itself.

Runs the snippet as the README prints it (its `path` pointed at the exported PRM) on every
held-out solution of the `prm` stage's labels, and compares the binary cross-entropy of its
step scores against the labels with the stage's own `heldout/loss` metric, which dagrun
computed from its scores of the same steps. Prints both and their difference.

    dagrun export prm.model -p pipelines/r1.yaml /tmp/prm
    dagrun export prm.labels -p pipelines/r1.yaml /tmp/labels.parquet
    dagrun export prm.metrics -p pipelines/r1.yaml /tmp/metrics.parquet
    python3 bench/prm_python_check.py /tmp/prm /tmp/labels.parquet /tmp/metrics.parquet

Needs torch, transformers, safetensors and pyarrow.
"""

import math
import pathlib
import re
import sys

import pyarrow.parquet as pq

prm_dir, labels_path, metrics_path = sys.argv[1:4]
readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
snippet = re.search(r"From Python \(transformers loads the likelihood PRM.*?```python\n(.*?)```", readme, re.S)
code = snippet.group(1).replace('path = "prm"', f"path = {prm_dir!r}", 1)
scope = {}
exec(code, scope)

rows = [r for r in pq.read_table(labels_path).to_pylist() if r["heldout"] and r["steps"]]
losses = []
for r in rows:
    for q, y in zip(scope["step_scores"](r["prompt"], r["steps"]).tolist(), r["labels"]):
        q = min(max(q, 1e-7), 1 - 1e-7)
        losses.append(-(y * math.log(q) + (1 - y) * math.log(1 - q)))
ours = sum(losses) / len(losses)
metrics = pq.read_table(metrics_path).to_pylist()
theirs = next(m["value"] for m in metrics if m["metric"] == "heldout/loss")
print(f"{len(rows)} held-out solutions, {len(losses)} steps: held-out BCE {ours:.9f} from the README's "
      f"snippet, {theirs:.9f} from dagrun (difference {abs(ours - theirs):.1e})")
