"""Shared pieces of the benchmarks: models, batches, threads, interleaved timing, FLOPs, reports."""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mobizo.util import dumps

# The ~100M-parameter Llama of the benchmarks: random weights, built in-process (no download).
# Tied embeddings: 109.5M parameters (85M in the transformer blocks, 24.6M embedding).
LLAMA_100M = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=12,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
# TinyLlama-1.1B's shape (random weights: they cost what trained ones cost): gpu_prge.py, phone_1b.py.
TINYLLAMA = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    vocab_size=32000,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
MODELS = ("tiny", "100m")
RANK, ALPHA, TARGETS, ADAPTER_SEED = 8, 16.0, ("q_proj", "v_proj"), 0
LENGTH = 64  # tokens per sequence in the speed and memory benchmarks


def set_threads(n: int) -> None:
    """Intra-op threads of PyTorch and of the ExecuTorch runtime's threadpool (XNNPACK)."""
    from mobizo.threads import apply_threads

    apply_threads(n)


def child_env(env: dict | None = None) -> dict:
    """``env`` (default: this process's) with PYTHONPATH leading to this mobizo and this mobizo_bench, so a
    subprocess (``python -m mobizo_bench.memory_worker``) imports the same trees as its parent."""
    import mobizo

    env = dict(os.environ if env is None else env)
    paths = [str(Path(mobizo.__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1])]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def thread_env(n: int) -> dict:
    """Environment for a subprocess that must use ``n`` threads, and find this mobizo and mobizo_bench."""
    env = child_env()
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(n)
    return env


def build_model(name: str):
    """(model, tokenizer): ``tiny`` or the random-weight ``100m`` Llama (tiny's tokenizer: ids < 1024)."""
    from mobizo.models import build_tiny, random_model, tiny_tokenizer

    if name == "tiny":
        return build_tiny()
    if name != "100m":
        raise ValueError(f"unknown benchmark model {name!r}")
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    config = LlamaConfig(
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **LLAMA_100M
    )
    return random_model(LlamaForCausalLM, config, 100, "llama-100m-random"), tok


def adapted_model(name: str):
    """The benchmark model with MP-LoRA (rank 8, alpha 16, q_proj/v_proj) injected."""
    from mobizo.mplora import inject

    model, tok = build_model(name)
    inject(model, list(TARGETS), RANK, ALPHA, ADAPTER_SEED)
    return model, tok


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if n.endswith(("lora_A", "lora_B"))
    )


def speed_batch(tok, rows: int, length: int = LENGTH):
    """``rows`` synthetic examples left-padded to ``length`` tokens, answer window of 1 token."""
    from mobizo.data import Encoder, collate
    from mobizo.tasks.synthetic import make_split

    enc = Encoder(tok)
    exs = make_split("train", max(rows, 1), seed=7)
    return collate([enc.example(e) for e in exs[:rows]], tok.pad_token_id, length, length=length, answer_len=1)


def interleaved(
    contenders: dict[str, Callable[[int], object]], rounds: int, warmup: int = 1, bar=None
) -> dict[str, list[float]]:
    """Seconds per call of every contender, run A B C A B C ... so machine noise hits all alike."""
    names = list(contenders)
    for w in range(warmup):
        for n in names:
            contenders[n](w)
            if bar is not None:
                bar.update(1)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names:
            t0 = time.perf_counter()
            contenders[n](warmup + r)
            times[n].append(time.perf_counter() - t0)
            if bar is not None:
                bar.update(1)
    return times


def median(xs) -> float:
    return float(statistics.median(xs))


def matmul_contender(n: int = 2048) -> tuple[Callable[[int], object], float]:
    """One fp32 ``torch.matmul`` of two n x n matrices and its FLOPs: the machine's peak reference."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    out = torch.empty(n, n)

    def run(_):
        torch.matmul(a, b, out=out)

    return run, 2.0 * n**3


def step_flops(model, batch, copies: int) -> float:
    """Matmul FLOPs (torch.utils.flop_counter) of the forward passes of one step with ``copies`` copies.

    Counted on one prge pass with q=1 (two copies) and scaled: every estimator runs the same
    rows through the model, and FLOPs are linear in the rows.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from mobizo.step import ZOConfig, ZOStep

    step = ZOStep(model, ZOConfig("prge", 1))
    saved = [layer.lora_B.clone() for _, layer in _lora(model)]
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        step(
            batch.input_ids, batch.attention_mask, batch.labels, torch.tensor(0), torch.tensor(0.0), torch.tensor(1e-3)
        )
    with torch.no_grad():
        for (_, layer), b in zip(_lora(model), saved):
            layer.lora_B.copy_(b)
    return fc.get_total_flops() / 2 * copies


def _lora(model):
    from mobizo.mplora import lora_layers

    return lora_layers(model)


def environment(threads: int) -> dict:
    import importlib.metadata as md

    from mobizo import __version__

    def ver(p):
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "mobizo": __version__,
        "torch": torch.__version__,
        "executorch": ver("executorch"),
        "transformers": ver("transformers"),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "loadavg_at_start": load,
        "argv": sys.argv,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def md_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            if math.isnan(v):
                return "n/a"
            return f"{v:#.3g}".rstrip(".") if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def write_json(path: Path, obj) -> None:
    path.write_text(dumps(obj, indent=1, default=float), encoding="utf-8")


def progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="run", dynamic_ncols=True, file=sys.stderr)
