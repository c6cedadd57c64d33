"""What a verifier would have to beat: best-of-k by a dagrun PRM and by the policy's own
likelihood, against majority voting, on the same samples.

Samples k completions per held-out problem from a dagrun policy with transformers (T 0.6,
top-p 0.95, 128 new tokens, as `eval` samples), checks their `<answer>` against the problem's,
and picks one per problem by: the PRM's solution score (`min`, `last`, `product` of its step
scores, the PRM input laid out as the README's snippet does), and the policy's log-likelihood
of the completion (sum, mean, lowest token). Prints pass@1, maj@k and each picker's accuracy.

    dagrun export rl.model -p pipelines/r1.yaml /tmp/rl
    dagrun export prm.model -p pipelines/r1.yaml /tmp/prm
    dagrun export problems.test -p pipelines/r1.yaml /tmp/test.parquet
    python3 bench/prm_rerank.py /tmp/rl /tmp/prm /tmp/test.parquet [k=8] [seed=0]

Needs torch, transformers and pyarrow. About a minute on 2 cores for 500 problems.
"""

import collections
import re
import sys

import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

policy_dir, prm_dir, problems = sys.argv[1:4]
args = dict(a.split("=") for a in sys.argv[4:])
K, seed = int(args.get("k", 8)), int(args.get("seed", 0))
torch.set_num_threads(2)
torch.manual_seed(seed)
rows = pq.read_table(problems).to_pylist()
tok = AutoTokenizer.from_pretrained(policy_dir)
tok.padding_side = "left"
lm = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
stops = {tok.pad_token_id, tok.convert_tokens_to_ids("<|im_end|>")}


def prompt_text(prompt):
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)


samples = []  # per problem, K dicts: answer, correct, log-probs, text
for b in range(0, len(rows), 32):
    batch = rows[b : b + 32]
    enc = tok([prompt_text(r["prompt"]) for r in batch], return_tensors="pt", padding=True, add_special_tokens=False)
    width = enc.input_ids.shape[1]
    with torch.no_grad():
        seqs = lm.generate(**enc, do_sample=True, temperature=0.6, top_p=0.95, max_new_tokens=128,
                           num_return_sequences=K, pad_token_id=tok.pad_token_id)
        mask = (seqs != tok.pad_token_id).long()
        mask[:, :width] = enc.attention_mask.repeat_interleave(K, 0)
        # The untempered policy's log-probability of every generated token.
        logp = torch.log_softmax(lm(input_ids=seqs, attention_mask=mask).logits[:, width - 1 : -1].float(), -1)
    gen = seqs[:, width:]
    chosen = logp.gather(-1, gen.unsqueeze(-1))[..., 0]
    for i in range(gen.shape[0]):
        ids = gen[i].tolist()
        n = next((j for j, t in enumerate(ids) if t in stops), len(ids))
        text = tok.decode(ids[:n])
        m = re.search(r"<answer>(.*?)</answer>", text)
        answer = m.group(1).strip() if m else None
        if i % K == 0:
            samples.append([])
        samples[-1].append(dict(text=text, answer=answer, correct=answer == batch[i // K]["answer"],
                                logp=chosen[i, :n].tolist()))

prm_tok = AutoTokenizer.from_pretrained(prm_dir)
prm = AutoModelForTokenClassification.from_pretrained(prm_dir).eval()
block = prm.config.prm
sep, think = block["step_token_id"], block.get("think_block", False)


def prm_ids(prompt, text):
    steps = [s for s in (line.replace("<think>", "").replace("</think>", "").strip() for line in text.split("\n")) if s]
    user = [{"role": "user", "content": prompt}]
    head = prm_tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    opened = head[len(prm_tok.apply_chat_template(user, tokenize=False)) :]  # the generation prompt
    ids = prm_tok.encode(head + ("<think>\n" if think and "<think>" not in opened else ""), add_special_tokens=False)
    ends = []
    for s in steps:
        if think and s.startswith("<answer>") and "</think>" not in opened:
            ids += prm_tok.encode("</think>", add_special_tokens=False) + [sep]
        ids += prm_tok.encode(s, add_special_tokens=False)
        ends.append(len(ids))
        ids.append(sep)
    return ids, ends


flat = [(p, s) for p, group in enumerate(samples) for s in group]
for b in range(0, len(flat), 64):
    items = [prm_ids(rows[p]["prompt"], s["text"]) for p, s in flat[b : b + 64]]
    width = max(len(ids) for ids, _ in items)
    x = torch.zeros(len(items), width, dtype=torch.long)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    for j, (ids, _) in enumerate(items):
        x[j, : len(ids)], mask[j, : len(ids)] = torch.tensor(ids), 1
    with torch.no_grad():
        logits = prm(input_ids=x, attention_mask=mask).logits[..., 0]
    for j, (_, ends) in enumerate(items):
        flat[b + j][1]["prm"] = torch.sigmoid(logits[j, ends]).tolist() if ends else []


def best_of(score):
    """Accuracy (%) of the first highest-scored sample per problem."""
    return 100 * np.mean([max(g, key=lambda s: score(s))["correct"] for g in samples])


def majority():
    hits = []
    for p, g in enumerate(samples):
        votes = collections.Counter(s["answer"] for s in g if s["answer"] is not None)
        top = max(votes.values(), default=0)
        first = next((s["answer"] for s in g if s["answer"] is not None and votes[s["answer"]] == top), None)
        hits.append(first == rows[p]["answer"])
    return 100 * np.mean(hits)


maj = majority()
print(f"{len(rows)} problems, k = {K}: pass@1 {100 * np.mean([s['correct'] for g in samples for s in g]):.1f}, "
      f"maj@{K} {maj:.1f}, pass@{K} {100 * np.mean([any(s['correct'] for s in g) for g in samples]):.1f}")
pickers = {
    "PRM min": lambda s: min(s["prm"], default=-1.0),
    "PRM last": lambda s: s["prm"][-1] if s["prm"] else -1.0,
    "PRM product": lambda s: float(np.prod(s["prm"])) if s["prm"] else -1.0,
    "policy log-likelihood (sum)": lambda s: sum(s["logp"]),
    "policy log-likelihood (lowest token)": lambda s: min(s["logp"], default=0.0),
}
for name, score in pickers.items():
    acc = best_of(score)
    print(f"best-of-{K} by {name}: {acc:.1f} ({acc - maj:+.1f} against maj@{K})")
