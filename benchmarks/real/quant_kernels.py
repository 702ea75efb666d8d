"""XNNPACK's linear kernels per ``--quantize`` scheme, side by side on this CPU (issue 12's step time).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/real/quant_kernels.py [--rows 64,512,2048] [--json OUT.json]

One SmolLM2-135M MLP block (576 -> 1536 gate/up, SiLU, 1536 -> 576 down, no bias) quantized with
mobizo's torchao configs, exported and lowered to XNNPACK like the training program, and run in the
ExecuTorch runtime on ``rows`` tokens (the training step at T = 32, batch 8, q 4 runs 2048 rows
through every linear). Prints the best of ``--repeats`` runs per scheme and its ratio to float32, with
the CPU's relevant ISA extensions: XNNPACK's int8 x int4/int8 kernels are built on integer dot
products (VNNI on x86, SDOT/I8MM on Arm), and without them they can lose to its float32 FMA kernels.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import time
from pathlib import Path

import torch
from torch import nn

SCHEMES = (("none", None), ("8da8w", None), ("8da4w", 32), ("8da4w", 64), ("8da4w", 0))
ISA = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


class MLP(nn.Module):
    def __init__(self, hidden: int = 576, inner: int = 1536):
        super().__init__()
        self.gate = nn.Linear(hidden, inner, bias=False)
        self.up = nn.Linear(hidden, inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def cpu_features() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set(re.findall(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.MULTILINE)[0].split()) if text else set()
    return [f for f in ISA if f in flags]


def lower(model: nn.Module, x: torch.Tensor):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    ep = torch.export.export(model, (x,))
    buffer = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch().buffer
    program = Runtime.get().load_program(buffer)
    # the method runs out of its program (and the program out of the buffer): keep all three alive
    return program.load_method("forward"), len(buffer), (program, buffer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="64,512,2048", help="tokens per call (comma-separated)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from mobizo.quantize import torchao_config
    from mobizo.util import quiet_third_party

    quiet_third_party()
    from torchao.quantization import quantize_

    torch.manual_seed(0)
    base = MLP().eval()
    models = {}
    for scheme, gs in SCHEMES:
        models[(scheme, gs)] = m = copy.deepcopy(base)
        if scheme != "none":
            quantize_(m, torchao_config(scheme, gs))
    results = []
    for n in (int(r) for r in args.rows.split(",")):
        x = torch.randn(n, 576)
        lowered = {k: lower(m, x) for k, m in models.items()}  # a static shape per row count
        best = {k: float("inf") for k in lowered}
        for method, *_ in lowered.values():
            method.execute([x])  # warm-up: packing, workspace
        for _ in range(args.repeats):  # interleaved, so a noisy neighbour hits every scheme alike
            for k, (method, *_) in lowered.items():
                t = time.perf_counter()
                method.execute([x])
                best[k] = min(best[k], time.perf_counter() - t)
        for (scheme, gs), s in best.items():
            results.append(
                {
                    "rows": n,
                    "scheme": scheme,
                    "group_size": gs,
                    "ms": s * 1e3,
                    "x_fp32": s / best[("none", None)],
                    "pte_mb": lowered[(scheme, gs)][1] / 1e6,
                }
            )
    print(f"CPU ISA: {', '.join(cpu_features()) or 'unknown'}; torch threads {torch.get_num_threads()}")
    print(f"| rows | scheme | ms (best of {args.repeats}) | x fp32 | .pte MB |")
    print("|---|---|---|---|---|")
    for r in results:
        name = r["scheme"] + ("" if r["group_size"] is None else f" g{r['group_size']}")
        print(f"| {r['rows']} | {name} | {r['ms']:.1f} | {r['x_fp32']:.2f} | {r['pte_mb']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_features(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
