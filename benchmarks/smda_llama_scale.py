"""How long the Llama preset's SMDA steps take, on a randomly initialised model of
Llama-3.2-3B's shape (no hub access needed): scoring the policy prompts (h and Y), one
influence step (SGD step on a pair + rescoring + bit-exact restore), and one SFT step.

Usage (on a GPU; bf16 autocast through `compute`, weights float32 as the preset runs):
    python benchmarks/smda_llama_scale.py [--prompts 160] [--prompt-len 60] [--pairs 3] [--json out.json]
Multiply by the preset's sizes (`presets/smda-llama-3.2-3b.yaml`) for the stage times.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=160)
    ap.add_argument("--prompt-len", type=int, default=60)
    ap.add_argument("--response-len", type=int, default=40)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from mda.core.compute import runtime
    from mda.core.config import Compute, SmdaSft
    from mda.smda.influence import SgdProbe
    from mda.smda.lm import LM, hidden_and_logprob
    from mda.smda.sft import fine_tune

    rt = runtime(Compute(device="cuda", dtype="bfloat16"))
    config = LlamaConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=args.layers,
                         num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=4096,
                         tie_word_embeddings=True, rope_theta=500000.0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).float().eval()
    lm = LM(model, tokenizer=type("T", (), {"pad_token_id": 0, "eos_token_id": 1})(), chat_template=False,
            batch_size=args.batch_size, rt=rt)
    g = torch.Generator().manual_seed(0)
    tokens = lambda n: torch.randint(2, 128000, (n,), generator=g).tolist()
    prompts = [tokens(args.prompt_len) for _ in range(args.prompts)]
    prefixes = [[40, 649, 956], [40, 4250]]  # three- and two-token prefixes, as "I can't" / "I cannot"
    sync = torch.cuda.synchronize
    out = {"params_billion": sum(p.numel() for p in model.parameters()) / 1e9,
           "gpu": torch.cuda.get_device_name(), **vars(args)}

    hidden_and_logprob(lm, prompts[:4], prefixes, layer=10)  # warm-up
    sync(); t = time.perf_counter()
    hidden_and_logprob(lm, prompts, prefixes, layer=10)
    sync(); out["score_prompts_s"] = time.perf_counter() - t

    probe = SgdProbe(lm, lr=1e-4)
    reference = [p.detach().clone() for p in probe.params]
    pair = (tokens(args.prompt_len), tokens(args.response_len))
    probe.step(pair, prompts[:4], prefixes, 10)  # warm-up
    sync(); t = time.perf_counter()
    for _ in range(args.pairs):
        probe.step(pair, prompts, prefixes, 10)
    sync(); out["influence_per_pair_s"] = (time.perf_counter() - t) / args.pairs
    out["restored_bit_for_bit"] = probe.restored(reference)
    del probe, reference

    pairs = [(tokens(args.prompt_len), tokens(args.response_len)) for _ in range(32)]
    sync(); t = time.perf_counter()
    fine_tune(lm, pairs, SmdaSft(epochs=1, batch_size=16, lr=2e-5), seed=0)
    sync(); out["sft_per_step_s"] = (time.perf_counter() - t) / 2
    out["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
