"""Can a PRM on a dagrun model learn to spot a wrong column sum, given plenty of clean labels?

A PyTorch replica of the `prm` stage's training (transformers' LlamaForTokenClassification with
one label, read at the line break after every step, BCE), on fresh synthetic solutions of
three-3-digit sums every step: half have one column's result digit changed (and the digit its
`write` copies, as in a real slip), and that step and every later one are labelled 0. Prints
held-out step accuracy (the majority label's share is about 0.66) and how often the weakest
step is the planted one.

    dagrun export rl.model -p pipelines/r1.yaml /tmp/rl       # any char-level dagrun model
    python3 bench/prm_probe.py /tmp/rl steps=1000 lr=1e-3 [extra=2] [cut=1] [shortcut=1]
    # extra=N stacks copies of the last N layers on the decoder; cut=1 ends a solution at its
    # planted step (the old layout, learnt by position); shortcut=1 leaves the `write` digit
    # unchanged (the old probe: a copy mismatch a PRM finds without adding); bare=1 leaves out
    # the `<think>` line the stage now puts before the steps; freeze=1 trains only the stacked
    # layers, the final norm and the head. read= where a step's score comes from: `end` (the
    # stage's: the line break after it), `prefixmin` (the lowest token logit of the solution so
    # far), `noisyor` (the product of every token's sigmoid so far), `oracle` (one label per
    # solution on the result digit of one step, 0 where it was planted: the easiest form).
    # Needs torch and transformers.
"""

import copy
import random
import sys
import time

import numpy as np
import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer

path = sys.argv[1]
args = dict(a.split("=") for a in sys.argv[2:])
steps, lr, bs = int(args.get("steps", 1000)), float(args.get("lr", 1e-3)), int(args.get("bs", 16))
cut, extra, every = args.get("cut", "0") == "1", int(args.get("extra", 0)), int(args.get("every", 200))
shortcut = args.get("shortcut", "0") == "1"
# The stage's layout since 2026-12-03: the steps inside the think block; bare=1 is the old one.
opening = "" if args.get("bare", "0") == "1" else "<think>\n"
read, freeze = args.get("read", "end"), args.get("freeze", "0") == "1"
torch.set_num_threads(int(args.get("threads", 2)))
torch.manual_seed(0)
rng = random.Random(0)
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForTokenClassification.from_pretrained(path, num_labels=1)
layers = model.model.layers
for i in range(extra):
    layer = copy.deepcopy(layers[len(layers) - extra + i])
    layer.self_attn.layer_idx = len(layers)
    layers.append(layer)
model.config.num_hidden_layers = len(layers)
sep = tok.encode("\n", add_special_tokens=False)[0]
if freeze:
    for p in model.parameters():
        p.requires_grad_(False)
    for p in [*layers[len(layers) - extra :].parameters(), *model.score.parameters(), *model.model.norm.parameters()]:
        p.requires_grad_(True)


def solution():
    numbers = [rng.randint(100, 999) for _ in range(3)]
    digits = [[int(d) for d in str(n)][::-1] for n in numbers]
    out, carry = [], 0
    for col in range(3):
        terms = [d[col] for d in digits] + ([carry] if carry else [])
        s = sum(terms)
        lhs = "+".join(map(str, terms))
        if col < 2 and s >= 10:
            out.append(f"{lhs}={s} write {s % 10} carry {s // 10}")
        else:
            out.append(f"{lhs}={s} write {s}")
        carry = s // 10 if col < 2 else 0
    return "+".join(map(str, numbers)) + "=", out


def item():
    prompt, steps_ = solution()
    labels, bad, check = [1.0] * len(steps_), None, None
    if rng.random() < 0.5:
        bad = check = rng.randrange(len(steps_))
        lhs, rhs = steps_[bad].split("=", 1)
        result = rhs.split(" ")[0]
        wrong = result[:-1] + str((int(result[-1]) + rng.randint(1, 9)) % 10)
        rest = rhs[len(result):]
        if not shortcut:
            # What `write` copies changes with the result, as in a real slip and the stage's
            # `number` corruption; with shortcut=1 it does not, and a PRM can find the planted
            # step by that copy mismatch alone, without checking the sum.
            written = rest.split(" ")[2]
            rest = rest.replace(f"write {written}", f"write {wrong if written == result else wrong[-1]}", 1)
        steps_[bad] = f"{lhs}={wrong}{rest}"
        labels[bad:] = [0.0] * (len(steps_) - bad)
        if cut:
            steps_, labels = steps_[: bad + 1], labels[: bad + 1]
    elif read == "oracle":
        check = rng.randrange(len(steps_))
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False) + opening
    ids, ends = tok.encode(text, add_special_tokens=False), []
    first, digit_at = len(ids), None
    for n, s in enumerate(steps_):
        if n == check:
            # The last digit of the step's result (one token per character).
            lhs_, rhs_ = s.split("=", 1)
            digit_at = len(ids) + len(lhs_) + len(rhs_.split(" ")[0])
        ids += tok.encode(s, add_special_tokens=False)
        ends.append(len(ids))
        ids.append(sep)
    return ids, ends, labels, bad, first, digit_at, 0.0 if bad is not None else 1.0


def logits(items):
    width = max(len(i[0]) for i in items)
    x, mask = torch.zeros(len(items), width, dtype=torch.long), torch.zeros(len(items), width)
    for b, i in enumerate(items):
        x[b, : len(i[0])], mask[b, : len(i[0])] = torch.tensor(i[0]), 1
    out = model(input_ids=x, attention_mask=mask).logits[..., 0]
    if read == "end":
        return [out[b, i[1]] for b, i in enumerate(items)]
    if read == "oracle":
        return [out[b, i[5]].reshape(1) for b, i in enumerate(items)]
    scores = []
    for b, i in enumerate(items):
        tokens, at = out[b, i[4] : i[1][-1] + 1], torch.tensor(i[1]) - i[4]
        if read == "prefixmin":
            scores.append(torch.cummin(tokens, 0).values[at])
        else:  # noisyor: log P(good) as a logit, logP - log(1 - P), for the BCE below
            logp = torch.cumsum(torch.nn.functional.logsigmoid(tokens), 0)[at].clamp(max=-1e-6)
            scores.append(logp - torch.log(-torch.expm1(logp)))
    return scores


heldout = [item() for _ in range(300)]
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
start = time.time()
for step in range(1, steps + 1):
    batch = [item() for _ in range(bs)]
    target = torch.tensor([i[6] for i in batch] if read == "oracle" else [v for i in batch for v in i[2]])
    loss = torch.nn.functional.binary_cross_entropy_with_logits(torch.cat(logits(batch)), target)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if step % every == 0:
        model.eval()
        hits, weakest = [], []
        with torch.no_grad():
            for i, out in zip(heldout, logits(heldout)):
                s = torch.sigmoid(out).numpy()
                hits += list((s >= 0.5) == (np.array([i[6]] if read == "oracle" else i[2]) >= 0.5))
                if i[3] is not None:
                    weakest.append(int(np.argmin(s)) == i[3])
        model.train()
        print(f"step {step}: loss {loss.item():.3f}, held-out step accuracy {np.mean(hits):.3f}, "
              f"weakest is planted {np.mean(weakest):.3f} ({time.time() - start:.0f} s)", flush=True)
