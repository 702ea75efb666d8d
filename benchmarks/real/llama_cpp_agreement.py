"""By hand: does llama.cpp, given mobizo's export, compute what mobizo computes on a real model?

    python benchmarks/real/llama_cpp_agreement.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf \
        [--adapter RUN/adapter] [--random-adapter] [--out results.json]

For each adapter (a trained one, and/or a random one on every attention/MLP projection with B large
enough to move the logits by several units): export it as a llama.cpp LoRA GGUF and as merged GGUFs
(F16, Q8_0), then run ~8 prompts through llama.cpp (llama-cpp-python's bindings, tests/_llamacpp.py:
F32 KV cache, no flash attention, no repacked weights) and through mobizo (the GGUF dequantized to
fp32, the adapter loaded with ``mobizo.load_adapter``): the max |logit diff| over every position,
the same for the base alone (the floor: llama.cpp runs the quantized file with its quantized
kernels, which also round the activations to 8 bits, while mobizo runs fp32; so the LoRA file is
also run on an F32 copy of the base, the weights exactly as mobizo sees them), and the 32-token greedy
continuations (how many prompts agree on all 32 tokens, and the first divergence otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Q: What is 12 times 7?\nA:",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Translate to French: Good morning, how are you?",
    "Review: the food was cold and the service was slow. Sentiment:",
]
N_NEW = 32


def mobizo_run(model, prompts):
    """(per-prompt logits (T, V), greedy tokens, smallest top-2 gap along them) with a KV cache."""
    logits, tokens, gap = [], [], float("inf")
    with torch.no_grad():
        for ids in prompts:
            out = model(input_ids=torch.tensor([ids]), use_cache=True)
            logits.append(out.logits[0].float().numpy())
            past, last, new = out.past_key_values, out.logits[0, -1], []
            for _ in range(N_NEW):
                top = torch.topk(last, 2).values
                gap = min(gap, float(top[0] - top[1]))
                new.append(int(last.argmax()))
                out = model(input_ids=torch.tensor([[new[-1]]]), past_key_values=past, use_cache=True)
                past, last = out.past_key_values, out.logits[0, -1]
            tokens.append(new)
    return logits, tokens, gap


def llama_cpp_run(model_path, loras, prompts):
    from _llamacpp import LlamaCpp

    with LlamaCpp(model_path, loras, n_ctx=512) as llm:
        return [llm.logits(p) for p in prompts], [llm.greedy(p, N_NEW) for p in prompts]


def compare(name, got, want, want_tokens, gap):
    logits, tokens = got
    diff = max(float(np.abs(a - b).max()) for a, b in zip(logits, want))
    agree = sum(a == b for a, b in zip(tokens, want_tokens))
    first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(tokens, want_tokens)]
    row = {"what": name, "max_abs_logit_diff": diff, "greedy_prompts_agree": f"{agree}/{len(tokens)}"}
    row["first_divergence"] = [f for f in first if f is not None]
    row["argmax_agree"] = float(np.mean([(a.argmax(-1) == b.argmax(-1)).mean() for a, b in zip(logits, want)]))
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--adapter", help="a trained adapter (e.g. RUN/adapter)")
    ap.add_argument("--random-adapter", action="store_true", help="also a random adapter on every projection")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from mobizo.api import load_adapter, save_adapter
    from mobizo.deploy import export_adapter
    from mobizo.models import load_model
    from mobizo.mplora import MPLoRAConfig, get_mplora_model, lora_layers

    work = Path(tempfile.mkdtemp(prefix="llama-cpp-agreement-"))
    base, tok = load_model(args.gguf)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    rows = [{"model": args.gguf, "prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts]}]
    b_logits, b_tokens, b_gap = mobizo_run(base, prompts)
    rows.append({"what": "mobizo base: smallest top-2 logit gap on the greedy path", "gap": b_gap})
    rows.append(compare("base alone", llama_cpp_run(args.gguf, [], prompts), b_logits, b_tokens, b_gap))
    # the base's weights exactly as mobizo sees them (dequantized, F32): the adapter merged with B = 0
    model, _ = load_model(args.gguf)
    get_mplora_model(model, MPLoRAConfig(rank=1, alpha=1.0, target_modules=["q_proj"]))
    save_adapter(model, work / "zero")
    f32_base = work / "base-f32.gguf"
    export_adapter(work / "zero", "merged-gguf", f32_base, model=args.gguf, outtype="f32")
    del model
    rows.append(compare("base dequantized to F32", llama_cpp_run(f32_base, [], prompts), b_logits, b_tokens, b_gap))

    adapters = []
    if args.adapter:
        adapters.append(("trained", Path(args.adapter)))
    if args.random_adapter:
        model, _ = load_model(args.gguf)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        get_mplora_model(model, MPLoRAConfig(rank=8, alpha=16.0, target_modules=targets))
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.01)
        save_adapter(model, work / "random")
        del model
        adapters.append(("random", work / "random"))

    for label, path in adapters:
        model, _ = load_model(args.gguf)
        load_adapter(model, path)
        logits, tokens, gap = mobizo_run(model, prompts)
        effect = max(float(np.abs(a - b).max()) for a, b in zip(logits, b_logits))
        rows.append({"what": f"{label} adapter: mobizo", "effect_on_logits": effect, "gap": gap})
        print(json.dumps(rows[-1]), flush=True)
        for fmt, outtype in (
            ("lora-gguf", "f32"),
            ("merged-gguf", "f32"),
            ("merged-gguf", "f16"),
            ("merged-gguf", "q8_0"),
        ):
            out = work / f"{label}-{fmt}-{outtype}.gguf"
            t0 = time.perf_counter()
            export_adapter(path, fmt, out, model=args.gguf, outtype=outtype, overwrite=True)
            took = time.perf_counter() - t0
            if fmt == "lora-gguf":
                got = llama_cpp_run(args.gguf, [out], prompts)
            else:
                got = llama_cpp_run(out, [], prompts)
            row = compare(f"{label} adapter, {fmt} {outtype}", got, logits, tokens, gap)
            row.update(export_seconds=took, bytes=out.stat().st_size)
            rows.append(row)
            if fmt == "lora-gguf":  # the same LoRA file on the F32 copy of the base: no quantized kernels
                got = llama_cpp_run(f32_base, [out], prompts)
                rows.append(compare(f"{label} adapter, {fmt} {outtype} on the F32 base", got, logits, tokens, gap))
            out.unlink()
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
