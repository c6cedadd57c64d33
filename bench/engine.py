#!/usr/bin/env python3
"""Engine benchmark: prints figures next to references measured in the same run.

1. No-op re-run of a 10-stage pipeline (everything cached): median wall time, target < 50 ms.
2. No-op re-run of a pipeline whose `init_model from:` directory holds 1 GiB: median wall
   time, target ≤ 50 ms (file digests are remembered by path, size, mtime and inode), next to
   the time `dagrun hash` takes to read that directory (what every plan cost before).
3. blake3 hashing of a 1 GiB file by dagrun (the cache's hashing path) next to `b3sum` and
   `md5sum`: median GiB/s of each, and dagrun's time over b3sum's (target: within 10 %).

Usage: bench/engine.py [--runs N] [--dagrun PATH]   (builds dagrun in release mode first)
"""
import argparse, os, shutil, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def median_seconds(cmd, runs, cwd=None):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)

def ten_stage_pipeline():
    lines = ["stages:", "  gen:", "    kind: cot_generate", "    params: { n_train: 2000, n_test: 200 }"]
    prev = "gen.cot"
    for i in range(1, 10):
        lines += [f"  mix{i}:", "    kind: mix", f"    inputs: {{ a: {prev} }}", f"    params: {{ limit: {2000 - 100 * i} }}"]
        prev = f"mix{i}"
    return "\n".join(lines) + "\n"

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--dagrun")
    ap.add_argument("--size-gib", type=float, default=1.0)
    args = ap.parse_args()
    dagrun = os.path.abspath(args.dagrun) if args.dagrun else None
    if not dagrun:
        target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
        subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
        dagrun = os.path.join(target, "release", "dagrun")
    b3sum = shutil.which("b3sum")
    if not b3sum:
        print("installing b3sum (cargo install b3sum) for the reference…", file=sys.stderr)
        subprocess.run(["cargo", "install", "--locked", "-q", "b3sum"], check=True)
        b3sum = shutil.which("b3sum") or os.path.expanduser("~/.cargo/bin/b3sum")

    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "p.yaml"), "w") as f:
            f.write(ten_stage_pipeline())
        subprocess.run([dagrun, "-q", "run", "p.yaml"], cwd=tmp, check=True)
        med, lo, hi = median_seconds([dagrun, "-q", "run", "p.yaml"], args.runs, cwd=tmp)
        print(f"no-op re-run, 10 stages: median {med * 1000:.1f} ms (min {lo * 1000:.1f}, max {hi * 1000:.1f}; target < 50 ms)")

        # A model directory of 1 GiB: a nano model's files plus a 1 GiB file beside them (a
        # snapshot's extra weights), all of which the key covers.
        size = int(args.size_gib * (1 << 30))
        with open(os.path.join(tmp, "make.yaml"), "w") as f:
            f.write("stages:\n  base:\n    kind: init_model\n    params: { preset: nano }\n")
        subprocess.run([dagrun, "-q", "run", "make.yaml"], cwd=tmp, check=True)
        subprocess.run([dagrun, "-q", "export", "base.model", "model"], cwd=tmp, check=True)
        with open(os.path.join(tmp, "model", "extra_weights.bin"), "wb") as f:
            chunk = os.urandom(1 << 24)
            for _ in range(size // len(chunk)):
                f.write(chunk)
        with open(os.path.join(tmp, "import.yaml"), "w") as f:
            f.write("stages:\n  imported:\n    kind: init_model\n    params: { from: model }\n")
        subprocess.run([dagrun, "-q", "run", "import.yaml"], cwd=tmp, check=True)
        # Digests of files modified in the last 3 s are not remembered (they could change again
        # within one mtime tick): a downloaded model is older than that by its second run.
        time.sleep(3)
        subprocess.run([dagrun, "-q", "run", "import.yaml"], cwd=tmp, check=True)
        med, lo, hi = median_seconds([dagrun, "-q", "run", "import.yaml"], args.runs, cwd=tmp)
        ref, _, _ = median_seconds([dagrun, "hash", "model"], max(3, args.runs // 2), cwd=tmp)
        print(f"no-op re-run, {args.size_gib:g} GiB init_model from: median {med * 1000:.1f} ms (min {lo * 1000:.1f}, max {hi * 1000:.1f}; target ≤ 50 ms); "
              f"re-hashing the directory instead: median {ref * 1000:.0f} ms ({ref / med:.0f}x)")
        shutil.rmtree(os.path.join(tmp, "model"))

        big = os.path.join(tmp, "big.bin")
        size = int(args.size_gib * (1 << 30))
        with open(big, "wb") as f:
            chunk = os.urandom(1 << 24)
            for _ in range(size // len(chunk)):
                f.write(chunk)
        gib = size / (1 << 30)
        results = {}
        for name, cmd in [("dagrun hash", [dagrun, "hash", big]), ("b3sum", [b3sum, big]), ("md5sum", ["md5sum", big])]:
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)  # warm the page cache
            med, lo, hi = median_seconds(cmd, max(3, args.runs // 2))
            results[name] = med
            print(f"hash {gib:.2f} GiB with {name:<11}: median {med:.3f} s = {gib / med:.2f} GiB/s (min {lo:.3f}, max {hi:.3f})")
        ratio = results["dagrun hash"] / results["b3sum"]
        print(f"dagrun / b3sum time: {ratio:.3f} (target ≤ 1.10); dagrun / md5sum time: {results['dagrun hash'] / results['md5sum']:.3f}")

if __name__ == "__main__":
    main()
