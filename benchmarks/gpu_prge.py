"""P-RGE on an accelerator: prge vs prge-outer vs mezo (and FO for reference) step time, rows/s, peak memory.

    python benchmarks/gpu_prge.py --smollm2 PATH --out gpu-out            # one CUDA GPU, unattended, ~5-8 min
    python benchmarks/gpu_prge.py --smollm2 PATH --device cpu --models smollm2 --queries 1,4 --batches 1,4 \\
        --repeats 3 --warmup 1 --out cpu-out                              # the CPU half, small

Models: SmolLM2-135M (``--smollm2``: a GGUF file or a Hugging Face directory, loaded by mobizo) and a
random TinyLlama-shaped 1.1B Llama (hidden 2048, 22 layers, 32 heads, 4 KV heads, intermediate 5632,
vocab 32000; built on the device, random init). The base runs in ``--dtype`` (default bfloat16 on
CUDA, float32 on the CPU); MP-LoRA rank 8, alpha 16 on q_proj/v_proj, float32 (as ``--dtype`` makes
it in mobizo). Batches: random token ids, ``--seq`` tokens (default 64), the last 8 supervised.

Per (model, q, batch): every estimator runs one step per round, in turn (A B C A B C ...), for
``--warmup`` + ``--repeats`` rounds, through mobizo's eager engine (lr 0, so the work is the same every
step); step time is CUDA-synchronized, the median of the repeats. Reported: seconds per step, forward
rows per second (2 q batch rows per ZO step; batch for FO), peak device memory
(``torch.cuda.max_memory_allocated`` over the block, reset before it; not measured on the CPU), the
CPU time to make the step's noise z alone (:mod:`mobizo.perturb`; off the CPU the step makes the next
step's z on a CPU thread while the device runs, so this is hidden up to the step time), and the
ratios mezo / prge and prge-outer / prge from the same block. FO: LoRA-FA (B trained) with AdamW,
forward + backward + step, after the ZO grid of the model (it turns B into parameters). A cell that
runs out of memory is recorded as ``oom``; cells past ``--budget`` seconds are skipped (recorded as
such), so the script always finishes and writes its files:
``OUT/results.json`` (every number, the environment) and ``OUT/results.md`` (the tables).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from mobizo_bench.common import TINYLLAMA

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ESTIMATORS = ("prge", "prge-outer", "mezo")
ANSWER = 8  # supervised tokens per row (the answer window)


def csv_ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smollm2", help="SmolLM2-135M: a .gguf file or a Hugging Face model directory")
    ap.add_argument("--models", default="smollm2,tinyllama-1.1b", help="comma-separated: smollm2, tinyllama-1.1b")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu", "mps"))
    ap.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16", "float16"),
        help="the base's dtype (default: bfloat16 on cuda, float32 elsewhere)",
    )
    ap.add_argument("--estimators", default=",".join(ESTIMATORS))
    ap.add_argument("--queries", type=csv_ints, default=[1, 4, 16])
    ap.add_argument("--batches", type=csv_ints, default=[1, 4, 16])
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-fo", action="store_true", help="skip the FO (LoRA-FA, AdamW) reference")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds after which remaining cells are skipped")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if "smollm2" in args.models.split(",") and not args.smollm2:
        ap.error("--smollm2 PATH is needed for the smollm2 model (or leave it out of --models)")
    return args


def load(name: str, args, device, dtype):
    """(model with MP-LoRA on q/v, moved to the device, vocab size to draw tokens from)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mobizo.models import load_model
    from mobizo.mplora import inject

    if name == "smollm2":
        model, tok = load_model(args.smollm2, dtype)
        vocab = len(tok)
    elif name == "tinyllama-1.1b":
        torch.manual_seed(0)
        with torch.device(device):  # random init where it runs (fast on a GPU, no host copy of 4 GB)
            model = LlamaForCausalLM(LlamaConfig(**TINYLLAMA)).to(dtype).eval()
        vocab = TINYLLAMA["vocab_size"]
    else:
        raise SystemExit(f"unknown model {name!r}")
    inject(model, ["q_proj", "v_proj"], 8, 16.0, 0)
    model.to(device)
    return model, vocab


def make_batch(vocab: int, rows: int, seq: int, seed: int):
    import torch

    from mobizo.data import Batch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(vocab, 30000), (rows, seq), generator=g)
    return Batch(ids, torch.ones_like(ids), ids[:, -ANSWER:].clone(), rows)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def peak_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def zo_block(model, vocab, q: int, batch: int, args, device) -> dict:
    """One interleaved block: every estimator at (q, batch), one step each per round."""
    import torch

    from mobizo.engines.eager import EagerEngine
    from mobizo.step import ZOConfig

    ests = args.estimators.split(",")
    engines = {e: EagerEngine(model, e, ZOConfig(e, q, seed=1)) for e in ests}
    data = make_batch(vocab, batch, args.seq, seed=q * 1000 + batch)
    times: dict[str, list[float]] = {e: [] for e in ests}
    peak_reset(device)
    for r in range(args.warmup + args.repeats):
        for e in ests:
            # each engine's own consecutive steps, as in training: off the CPU, ZOStep makes step s+1's
            # noise on a CPU thread during step s, which only a consecutive step number uses
            dt = timed(lambda e=e, s=r + 1: engines[e].train_step(data, s, 0.0, 1e-2), device)
            if r >= args.warmup:
                times[e].append(dt)
    peak = peak_mib(device)
    # the CPU cost of making the step's noise z (on the CPU whatever the device), without the prefetch
    zo = engines[ests[0]].step
    z_times = [timed(lambda s=s: zo._noise(torch.tensor(s)), torch.device("cpu")) for s in range(1, 4)]
    numel = sum(z.numel() for z in zo._noise(torch.tensor(1)))
    out = {"q": q, "batch": batch, "rows_per_step": 2 * q * batch, "peak_mib": peak}
    out["noise_seconds"], out["noise_elements"] = statistics.median(z_times), numel
    for e in ests:
        med = statistics.median(times[e])
        out[e] = {"seconds": med, "all": times[e], "rows_per_second": 2 * q * batch / med}
    for e in ests:
        if e != "prge" and "prge" in out:
            out[f"{e}/prge"] = out[e]["seconds"] / out["prge"]["seconds"]
    return out


def fo_block(eng, vocab, batch: int, args, device) -> dict:
    data = make_batch(vocab, batch, args.seq, seed=batch)
    peak_reset(device)
    times = []
    for r in range(args.warmup + args.repeats):
        dt = timed(lambda r=r: eng.train_step(data, r + 1, 1e-4, 0.0), device)
        if r >= args.warmup:
            times.append(dt)
    med = statistics.median(times)
    return {"batch": batch, "seconds": med, "all": times, "rows_per_second": batch / med, "peak_mib": peak_mib(device)}


def environment(args, device, dtype) -> dict:
    import torch
    import transformers

    env = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return env


def fmt(v, digits=3) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    return f"{v:.{digits}g}"


def markdown(res: dict) -> str:
    env = res["environment"]
    lines = [
        f"# P-RGE on {env.get('gpu', env['device'])}: step time, rows/s, peak memory",
        "",
        (
            f"{env['date']}; torch {env['torch']}, transformers {env['transformers']}; base {env['dtype']}, "
            f"MP-LoRA rank 8 on q_proj/v_proj (float32); sequence {res['seq']} tokens; median of "
            f"{res['repeats']} rounds after {res['warmup']} (estimators interleaved per round); {env['threads']} "
            f"CPU threads. Command: `{env['command']}`"
        ),
        "",
    ]
    ests = res["estimators"]
    for model, m in res["models"].items():
        info = f"{m.get('parameters', 0) / 1e6:.1f}M parameters; load {m.get('load_seconds', 0):.1f} s"
        lines += [f"## {model}", "", info, ""]
        head = "| q | batch | rows/step | " + " | ".join(f"{e} s/step" for e in ests)
        head += " | " + " | ".join(f"{e} rows/s" for e in ests)
        head += " | mezo / prge | prge-outer / prge | peak MiB | z on CPU ms (elements) |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for c in m["zo"]:
            if "skipped" in c or "oom" in c:
                what = c.get("skipped") or c.get("oom")
                lines.append(f"| {c['q']} | {c['batch']} | {2 * c['q'] * c['batch']} | {what} |")
                continue
            row = [str(c["q"]), str(c["batch"]), str(c["rows_per_step"])]
            row += [fmt(c[e]["seconds"]) for e in ests] + [fmt(c[e]["rows_per_second"]) for e in ests]
            row += [fmt(c.get("mezo/prge")), fmt(c.get("prge-outer/prge")), fmt(c["peak_mib"], 5)]
            row += [f"{c['noise_seconds'] * 1e3:.1f} ({c['noise_elements']})"]
            lines.append("| " + " | ".join(row) + " |")
        if m.get("fo"):
            lines += ["", "FO (LoRA-FA, AdamW; forward + backward + step):", ""]
            lines += ["| batch | s/step | rows/s | peak MiB |", "|---|---|---|---|"]
            for c in m["fo"]:
                if "seconds" not in c:
                    lines.append(f"| {c['batch']} | {c.get('skipped') or c.get('oom')} | | |")
                else:
                    lines.append(
                        f"| {c['batch']} | {fmt(c['seconds'])} | {fmt(c['rows_per_second'])} | {fmt(c['peak_mib'], 5)} |"
                    )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from mobizo.devices import check_available
    from mobizo.util import quiet_third_party

    quiet_third_party()
    if args.threads:
        torch.set_num_threads(args.threads)
    check_available(args.device)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    res = {
        "environment": environment(args, device, dtype),
        "seq": args.seq,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "estimators": args.estimators.split(","),
        "models": {},
    }

    def save():
        (out / "results.json").write_text(json.dumps(res, indent=1))
        (out / "results.md").write_text(markdown(res))

    def over() -> bool:
        return time.perf_counter() - t_start > args.budget

    for name in args.models.split(","):
        t0 = time.perf_counter()
        model, vocab = load(name, args, device, dtype)
        m = res["models"][name] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "load_seconds": time.perf_counter() - t0,
            "zo": [],
            "fo": [],
        }
        print(f"{name}: loaded in {m['load_seconds']:.1f} s", file=sys.stderr)
        for q in args.queries:
            for b in args.batches:
                cell = {"q": q, "batch": b}
                if over():
                    cell["skipped"] = "skipped (time budget)"
                else:
                    try:
                        cell = zo_block(model, vocab, q, b, args, device)
                    except Exception as e:
                        if not is_oom(e):
                            raise
                        cell["oom"] = "oom"
                        torch.cuda.empty_cache()
                m["zo"].append(cell)
                print(name, json.dumps({k: v for k, v in cell.items() if not isinstance(v, dict)}), file=sys.stderr)
                save()
        fo = None
        if not args.no_fo:
            from mobizo.engines.eager import EagerEngine

            fo = EagerEngine(model, "fo", optimizer="adamw")  # B becomes a parameter: after the ZO grid
            for b in args.batches:
                cell = {"batch": b}
                if over():
                    cell["skipped"] = "skipped (time budget)"
                else:
                    try:
                        cell = fo_block(fo, vocab, b, args, device)
                    except Exception as e:
                        if not is_oom(e):
                            raise
                        cell["oom"] = "oom"
                        torch.cuda.empty_cache()
                m["fo"].append(cell)
                print(name, "fo", json.dumps({k: v for k, v in cell.items() if k != "all"}), file=sys.stderr)
                save()
        del model, fo
        if device.type == "cuda":
            torch.cuda.empty_cache()
    res["seconds"] = time.perf_counter() - t_start
    save()
    print(f"wrote {out}/results.json and {out}/results.md ({res['seconds']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
