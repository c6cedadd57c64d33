#!/usr/bin/env python3
"""PyTorch eager reference for `dagrun bench`: the same Llama shape, AdamW training steps and
KV-cache greedy generation, on 2 CPU threads. Prints one JSON object (train_tok_s, gen_tok_s,
gflops), with the same definitions as dagrun's bench.rs.

    pip install torch transformers
    python bench/torch_llama.py [--layers 4 --hidden 256 --heads 4 --kv-heads 4 --ffn 688
                                 --vocab 512 --batch 16 --seq 128 --new-tokens 128]
"""

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    p = argparse.ArgumentParser()
    for name, default in [("layers", 4), ("hidden", 256), ("heads", 4), ("kv-heads", 4), ("ffn", 688),
                          ("vocab", 512), ("batch", 16), ("seq", 128), ("new-tokens", 128),
                          ("prompt-len", 8), ("train-steps", 3), ("threads", 2)]:
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
                         num_hidden_layers=a.layers, num_attention_heads=a.heads,
                         num_key_value_heads=a.kv_heads, max_position_embeddings=4096,
                         rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq))

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    step()  # warm-up
    t = time.perf_counter()
    for _ in range(a.train_steps):
        step()
    train_step_s = (time.perf_counter() - t) / a.train_steps

    model.eval()
    prompts = torch.randint(0, a.vocab, (a.batch, a.prompt_len))
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        model.generate(prompts, max_new_tokens=2, min_new_tokens=2, **kw)
        t = time.perf_counter()
        out = model.generate(prompts, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, **kw)
        gen_s = time.perf_counter() - t
    generated = (out.shape[1] - a.prompt_len) * a.batch

    n_params = sum(p.numel() for p in model.parameters())
    linear = n_params - a.vocab * a.hidden
    flops = a.batch * a.seq * (6.0 * linear + 6.0 * a.layers * a.seq * a.hidden)
    print(json.dumps({
        "train_tok_s": a.batch * a.seq / train_step_s,
        "gen_tok_s": generated / gen_s,
        "gflops": flops / train_step_s / 1e9,
        "train_step_s": train_step_s,
        "gen_s": gen_s,
    }))


if __name__ == "__main__":
    main()
