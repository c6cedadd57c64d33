"""Would a verifier that reads a model's own likelihood of each step pass the PRM check?

The `prm` stage's scalar head does not learn to check a column sum (README, "What `r1.yaml`
learns"). This measures the other channel: best-of-k picked by the lowest per-step
log-likelihood that a model gives a sample's reasoning steps, against maj@k, on the policy's
own samples of the held-out problems (T 0.6, top-p 0.95, 128 new tokens, as `eval` samples).
Scored by:
- the policy itself;
- every model in `score=` (e.g. the recipe's second_sft and student: models that know more
  arithmetic than the policy);
- with `train=N`, a copy of the policy trained with the language-model loss on the good step
  prefixes of labelled solutions of the first N training problems: `samples=` of the policy's
  own samples per problem (a step is good while every step up to it is the reference's, what
  Math-Shepherd's rollouts estimate) and `perturb=` references with one planted slip each;
- with `references=N`, a copy of the policy trained the same way on the reference solutions
  of the first N training problems (no sampling; the `prm` stage's `head: likelihood` takes
  the problems after its labelled ones).

Prints each picker's accuracy and its paired difference from maj@k (± standard error over
problems).

    dagrun export rl.model -p pipelines/r1.yaml /tmp/rl
    dagrun export problems.test -p pipelines/r1.yaml /tmp/test.parquet
    dagrun export problems.train -p pipelines/r1.yaml /tmp/train.parquet
    python3 bench/likelihood_verifier.py /tmp/rl /tmp/test.parquet /tmp/train.parquet \
        [score=/tmp/second_sft,/tmp/student] [train=1000] [samples=2] [perturb=2] \
        [references=5000] [steps=200] [lr=3e-4] [bs=32] [k=8] [seed=0]

Needs torch, transformers and pyarrow; addition problems (`r1.yaml`'s). About a minute to
sample, and a minute per 200 training steps on 2 cores.
"""

import collections
import copy
import random
import re
import sys

import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

policy_dir, test_path, train_path = sys.argv[1:4]
args = dict(a.split("=", 1) for a in sys.argv[4:])
K, seed = int(args.get("k", 8)), int(args.get("seed", 0))
n_train, n_samples, n_perturb = int(args.get("train", 0)), int(args.get("samples", 2)), int(args.get("perturb", 2))
n_references = int(args.get("references", 0))
steps, lr, bs = int(args.get("steps", 200)), float(args.get("lr", 3e-4)), int(args.get("bs", 32))
torch.set_num_threads(2)
torch.manual_seed(seed)
rng = random.Random(seed)
tok = AutoTokenizer.from_pretrained(policy_dir)
tok.padding_side = "left"
policy = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
stops = {tok.pad_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
newline = tok.encode("\n", add_special_tokens=False)[0]


def prompt_text(prompt):
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)


def is_step(line):
    return line and not line.startswith("<answer>") and line != "</think>"


def reasoning_steps(text):
    return [s for s in (line.replace("<think>", "").strip() for line in text.split("\n")) if is_step(s)]


def sample(rows, k):
    """k samples per row: text, answer, whether it is correct, and which step prefixes are good."""
    out = []
    for b in range(0, len(rows), 32):
        batch = rows[b : b + 32]
        enc = tok([prompt_text(r["prompt"]) for r in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            seqs = policy.generate(**enc, do_sample=True, temperature=0.6, top_p=0.95, max_new_tokens=128,
                                   num_return_sequences=k, pad_token_id=tok.pad_token_id)
        for i, row in enumerate(seqs[:, enc.input_ids.shape[1] :].tolist()):
            r = batch[i // k]
            n = next((j for j, t in enumerate(row) if t in stops), len(row))
            text = tok.decode(row[:n])
            m = re.search(r"<answer>(.*?)</answer>", text)
            answer = m.group(1).strip() if m else None
            good, ok = [], True
            for j, s in enumerate(reasoning_steps(text)):
                ok = ok and j < len(r["steps"]) and s == r["steps"][j]
                good.append(ok)
            if i % k == 0:
                out.append([])
            out[-1].append(dict(prompt=r["prompt"], text=text, answer=answer, correct=answer == r["answer"], good=good))
    return out


def encode(prompt, text):
    """Token ids of prompt and completion, and each reasoning step's token span."""
    ids, spans = tok.encode(prompt_text(prompt), add_special_tokens=False), []
    for line in text.split("\n"):
        start = len(ids)
        ids += tok.encode(line, add_special_tokens=False)
        if is_step(line.replace("<think>", "").strip()):
            spans.append((start, len(ids)))
        ids.append(newline)
    return ids, spans[: len(reasoning_steps(text))]


def token_logp(model, items):
    """[batch, width - 1] log-probability of each next token, and the padded ids."""
    width = max(len(ids) for ids, _ in items)
    x = torch.zeros(len(items), width, dtype=torch.long)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    for b, (ids, _) in enumerate(items):
        x[b, : len(ids)], mask[b, : len(ids)] = torch.tensor(ids), 1
    logp = torch.log_softmax(model(input_ids=x, attention_mask=mask).logits.float(), -1)
    return logp[:, :-1].gather(-1, x[:, 1:].unsqueeze(-1))[..., 0], x


def lowest_step_logp(model, groups):
    flat = [s for g in groups for s in g]
    with torch.no_grad():
        for b in range(0, len(flat), 128):
            items = [encode(s["prompt"], s["text"]) for s in flat[b : b + 128]]
            logp, _ = token_logp(model, items)
            for j, (s, (_, spans)) in enumerate(zip(flat[b : b + 128], items)):
                s["score"] = min((logp[j, a - 1 : e - 1].sum().item() for a, e in spans), default=-1e9)


def majority_hits(groups, rows):
    hits = []
    for g, r in zip(groups, rows):
        votes = collections.Counter(s["answer"] for s in g if s["answer"] is not None)
        top = max(votes.values(), default=0)
        first = next((s["answer"] for s in g if s["answer"] is not None and votes[s["answer"]] == top), None)
        hits.append(first == r["answer"])
    return np.array(hits, dtype=float)


def report(name, groups, maj):
    picked = np.array([max(g, key=lambda s: s["score"])["correct"] for g in groups], dtype=float)
    d = 100 * (picked - maj)
    print(f"best-of-{K} by {name}: {100 * picked.mean():.1f} "
          f"({d.mean():+.1f} ± {d.std(ddof=1) / np.sqrt(len(d)):.1f} against maj@{K})", flush=True)


def planted(r):
    """The reference solution with one column's result (and the digit it writes) changed."""
    st = list(r["steps"])
    j = rng.randrange(len(st))
    lhs, rhs = st[j].split("=", 1)
    result = rhs.split(" ")[0]
    wrong = result[:-1] + str((int(result[-1]) + rng.randint(1, 9)) % 10)
    rest = rhs[len(result) :]
    written = rest.split(" ")[2]
    rest = rest.replace(f"write {written}", f"write {wrong if written == result else wrong[-1]}", 1)
    st[j] = f"{lhs}={wrong}{rest}"
    text = "<think>\n" + "\n".join(st) + "\n</think>\n<answer>" + r["answer"] + "</answer>"
    return dict(prompt=r["prompt"], text=text, correct=False, good=[i < j for i in range(len(st))])


test = pq.read_table(test_path).to_pylist()
held_out = sample(test, K)
maj = majority_hits(held_out, test)
flat = [s["correct"] for g in held_out for s in g]
print(f"{len(test)} problems, k = {K}: pass@1 {100 * np.mean(flat):.1f}, maj@{K} {100 * maj.mean():.1f}, "
      f"pass@{K} {100 * np.mean([any(s['correct'] for s in g) for g in held_out]):.1f}", flush=True)
lowest_step_logp(policy, held_out)
report("the policy's lowest step log-likelihood", held_out, maj)
for path in filter(None, args.get("score", "").split(",")):
    lowest_step_logp(AutoModelForCausalLM.from_pretrained(path).eval(), held_out)
    report(f"{path}'s lowest step log-likelihood", held_out, maj)

def train_copy(data):
    """A copy of the policy trained with the language-model loss on `data`'s good steps."""
    model = copy.deepcopy(policy).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        batch = rng.sample(data, min(bs, len(data)))
        items = [encode(s["prompt"], s["text"]) for s in batch]
        logp, _ = token_logp(model, items)
        target = torch.zeros_like(logp)
        for b, (s, (ids, spans)) in enumerate(zip(batch, items)):
            if s["correct"] and spans:  # the whole completion, answer included
                target[b, spans[0][0] - 1 : len(ids) - 1] = 1
            for (a, e), good in zip(spans, s["good"]):
                if good:  # the step and the line break after it
                    target[b, a - 1 : e] = 1
        loss = -(logp * target).sum() / target.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval()


train_rows = pq.read_table(train_path).to_pylist()
if n_train:
    rows = train_rows[:n_train]
    data = [s for g in sample(rows, n_samples) for s in g] if n_samples else []
    data += [planted(r) for r in rows for _ in range(n_perturb)]
    print(f"training on {len(data)} solutions of {len(rows)} problems "
          f"({sum(not g for s in data for g in s['good'])} bad steps of {sum(len(s['good']) for s in data)})")
    lowest_step_logp(train_copy(data), held_out)
    report(f"the policy trained {steps} steps on them (lowest step log-likelihood)", held_out, maj)
if n_references:
    text = "<think>\n{}\n</think>\n<answer>{}</answer>"
    data = [dict(prompt=r["prompt"], text=text.format("\n".join(r["steps"]), r["answer"]), correct=True,
                 good=[True] * len(r["steps"])) for r in train_rows[:n_references]]
    lowest_step_logp(train_copy(data), held_out)
    report(f"the policy trained {steps} steps on {len(data)} references (lowest step log-likelihood)", held_out, maj)
