"""One peak-RSS measurement in a fresh process: ``python -m mobizo_bench.memory_worker SPEC_JSON``.

Prints one JSON line: ``peak_rss_mb`` (whole process; from ``VmHWM``, the high-water mark of
the resident set: ``ru_maxrss`` is no use here because a child inherits its parent's value
across fork/exec), ``steps_peak_rss_mb`` (the peak while running the steps: the high-water mark
is reset after loading), ``baseline_rss_mb`` (RSS after the imports the mode needs, before any
model or program is loaded) and ``seconds_per_step``. The ExecuTorch modes never build a PyTorch model: they load the
program and a saved batch only.
"""

from __future__ import annotations

import json
import os
import resource
import time


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """VmHWM of this process (Linux); ``ru_maxrss`` elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _batch(path):
    import torch

    from mobizo.data import Batch

    t = torch.load(path, weights_only=True)
    return Batch(t["input_ids"], t["attention_mask"], t["labels"], n_real=t["input_ids"].shape[0])


def main(spec: dict) -> dict:
    mode, steps = spec["mode"], int(spec.get("steps", 3))
    import torch

    torch.set_num_threads(int(spec.get("threads", 1)))
    # Everything the mode will import, before the baseline: the baseline is the interpreter,
    # libraries and runtime, the peak above it is the model/program and the work.
    if mode.startswith("eager"):
        import tokenizers  # noqa: F401
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: F401

        import mobizo.engines.eager
        import mobizo.models
        import mobizo_bench.common  # noqa: F401
    else:
        import executorch.extension.training
        import executorch.runtime  # noqa: F401

        import mobizo.engines.executorch
        import mobizo.engines.executorch.fo  # noqa: F401
        from mobizo_bench.common import set_threads

        set_threads(int(spec.get("threads", 1)))
    baseline = _rss_mb()
    batch = _batch(spec["batch_file"])
    times = []
    if mode.startswith("eager"):
        from mobizo.engines.eager import EagerEngine
        from mobizo.step import ZOConfig, answer_losses
        from mobizo_bench.common import adapted_model

        model, _ = adapted_model(spec["model"])
        if mode == "eager-infer":
            run = lambda i: answer_losses(model, batch.input_ids, batch.attention_mask, batch.labels)
            ctx = torch.no_grad
        else:
            if mode == "eager-zo":
                eng = EagerEngine(model, "prge", ZOConfig("prge", int(spec["q"])))
            else:
                eng = EagerEngine(model, "fo", optimizer="sgd", train_a=mode == "eager-fo-lora")
            run = lambda i: eng.train_step(batch, i + 1, 1e-3, 1e-2)
            ctx = _null
        load_peak, loaded, can_reset = peak_rss_mb(), _rss_mb(), reset_peak()
        with ctx():
            for i in range(steps):
                t0 = time.perf_counter()
                run(i)
                times.append(time.perf_counter() - t0)
    elif mode == "et-infer":
        # Inference only: the program's eval method alone, loaded the way the engine loads programs
        # (from the file path).
        from pathlib import Path

        from executorch.runtime import Runtime

        from mobizo.engines.executorch import PROGRAM
        from mobizo.util import quiet_stderr

        with quiet_stderr():
            program = Runtime.get().load_program(Path(spec["program"]) / PROGRAM)
            method = program.load_method("score")
        load_peak, loaded, can_reset = peak_rss_mb(), _rss_mb(), reset_peak()
        for i in range(steps):
            t0 = time.perf_counter()
            method.execute([batch.input_ids, batch.attention_mask, batch.labels])
            times.append(time.perf_counter() - t0)
    elif mode == "et-zo":
        from mobizo.engines.executorch import ExecuTorchEngine

        eng = ExecuTorchEngine(spec["program"])
        load_peak, loaded, can_reset = peak_rss_mb(), _rss_mb(), reset_peak()
        for i in range(steps):
            t0 = time.perf_counter()
            eng.train_step(batch, i + 1, 1e-3, 1e-2)
            times.append(time.perf_counter() - t0)
    elif mode == "et-fo":
        from mobizo.engines.executorch.fo import ExecuTorchFOEngine

        eng = ExecuTorchFOEngine(spec["program"])
        load_peak, loaded, can_reset = peak_rss_mb(), _rss_mb(), reset_peak()
        for i in range(steps):
            t0 = time.perf_counter()
            eng.train_step(batch, i + 1, 1e-3)
            times.append(time.perf_counter() - t0)
    else:
        raise SystemExit(f"unknown mode {mode}")
    steps_peak = peak_rss_mb() if can_reset else None
    peak = max(load_peak, steps_peak) if can_reset else peak_rss_mb()
    return {
        "mode": mode,
        "peak_rss_mb": peak,
        "baseline_rss_mb": baseline,
        "final_rss_mb": _rss_mb(),
        "load_peak_rss_mb": load_peak,
        "loaded_rss_mb": loaded,
        "steps_peak_rss_mb": steps_peak,
        "seconds_per_step": sorted(times)[len(times) // 2] if times else None,
        "pid": os.getpid(),
    }


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


if __name__ == "__main__":
    import argparse  # (torch imports it too: no difference to the baseline RSS)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", type=json.loads, help='JSON: {"mode": ..., "steps": ..., "threads": ..., ...} (memory.py)')
    spec = ap.parse_args().spec
    from mobizo.util import quiet_third_party

    quiet_third_party()
    print("MOBIZO-MEMORY " + json.dumps(main(spec)), flush=True)
