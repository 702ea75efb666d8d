"""ExecuTorch programs for the benchmarks, exported once per shape into ``DIR/programs``."""

from __future__ import annotations

import time
from pathlib import Path

from mobizo.engines.executorch import MANIFEST, PROGRAM, export_program, manifest_for
from mobizo.engines.executorch.fo import FO_MANIFEST, FO_PROGRAM, FOManifest, export_fo_program
from mobizo.models import weights_hash
from mobizo.step import ZOConfig

from .common import ALPHA, LENGTH, RANK


def zo_dir(root: Path, model_name: str, estimator: str, q: int, batch: int, length: int = LENGTH) -> Path:
    return Path(root) / f"{model_name}-{estimator}-q{q}-b{batch}-t{length}"


def fo_dir(root: Path, model_name: str, batch: int, length: int = LENGTH, train_a: bool = False) -> Path:
    return Path(root) / f"{model_name}-fo{'-lora' if train_a else ''}-b{batch}-t{length}"


def ensure_zo(
    root: Path, model, model_name: str, estimator: str, q: int, batch: int, length: int = LENGTH
) -> tuple[Path, float]:
    """The ZO program directory (exported unless present) and the export seconds (0 if cached)."""
    d = zo_dir(root, model_name, estimator, q, batch, length)
    if (d / PROGRAM).is_file() and (d / MANIFEST).is_file():
        return d, 0.0
    t0 = time.perf_counter()
    m = manifest_for(
        model, model_name, ZOConfig(estimator, q), batch, length, 1, batch, RANK, ALPHA, weights_hash(model)
    )
    export_program(model, m, d)
    return d, time.perf_counter() - t0


def ensure_fo(
    root: Path, model, model_name: str, batch: int, length: int = LENGTH, train_a: bool = False
) -> tuple[Path, float]:
    d = fo_dir(root, model_name, batch, length, train_a)
    if (d / FO_PROGRAM).is_file() and (d / FO_MANIFEST).is_file():
        return d, 0.0
    t0 = time.perf_counter()
    export_fo_program(model, FOManifest(model_name, batch, length, 1, train_a=train_a), d)
    return d, time.perf_counter() - t0


def ensure_gemm(root: Path, n: int = 2048) -> Path:
    """An ExecuTorch program of one n x n fp32 linear layer (XNNPACK): the runtime's GEMM peak reference."""
    import torch

    from mobizo.util import quiet_stderr

    path = Path(root) / f"gemm-{n}.pte"
    if path.is_file():
        return path
    from executorch.backends.xnnpack.partition.config.gemm_configs import LinearConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    lin = torch.nn.Linear(n, n, bias=False).eval()
    with torch.no_grad(), quiet_stderr():
        ep = torch.export.export(lin, (torch.randn(n, n),), strict=False)
        data = (
            to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner(configs=[LinearConfig])])
            .to_executorch()
            .buffer
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def gemm_contender(path: Path, n: int = 2048):
    """(run, flops) for the XNNPACK GEMM program at ``path``."""
    import torch
    from executorch.runtime import Runtime

    from mobizo.util import quiet_stderr

    with quiet_stderr():
        method = Runtime.get().load_program(path).load_method("forward")
    x = torch.randn(n, n, generator=torch.Generator().manual_seed(1))

    def run(_):
        method.execute([x])

    return run, 2.0 * n**3
