"""ExecuTorch step time on a real model: the shared-prompt program vs the per-candidate one.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/real/bench_et_real.py MODEL DATA OUT_DIR [--layouts shared,per-candidate]

Exports the prge q=4 / batch 8 step for the word-sentiment task (T = --max-length) with each
layout into OUT_DIR/<layout>/ (reused when present), then times train_step in the stock runtime
(one XNNPACK thread) and writes OUT_DIR/et.json.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--layouts", default="shared,per-candidate")
    ap.add_argument("--max-length", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()

    from mobizo.util import quiet_third_party

    quiet_third_party()
    from mobizo.build import assemble
    from mobizo.config import TrainConfig
    from mobizo.data import collate_choices, step_indices
    from mobizo.engines.executorch import ExecuTorchEngine, export_program, manifest_for
    from mobizo.threads import apply_threads

    apply_threads(1)
    cfg = TrainConfig.from_flat(
        model=args.model,
        task="custom",
        data=args.data,
        template="Word: {text}\nSentiment:",
        label_words="negative,positive",
        queries=4,
        batch_size=8,
        max_length=args.max_length,
        eval_examples=32,
        eval_batch_size=8,
        progress=False,
    )
    run = assemble(cfg)  # model, tokenizer and examples; the programs are exported below, one per layout
    zo = run.zo_config()
    out = Path(args.out)
    res = {"model": args.model, "max_length": args.max_length, "layouts": {}}
    for layout in args.layouts.split(","):
        shared = layout == "shared"
        d = out / layout
        t0 = time.perf_counter()
        if not (d / "train.pte").is_file():
            m = manifest_for(
                run.model,
                cfg.model,
                zo,
                8,
                args.max_length,
                run.answer_len,
                8,
                cfg.adapter.rank,
                cfg.adapter.alpha,
                run.base_hash(),
                shared_prompt=shared,
            )
            export_program(run.model, m, d)
        export_s = time.perf_counter() - t0
        eng = ExecuTorchEngine(d)
        times = []
        for s in range(1, args.steps + 2):
            idx = step_indices(len(run.train), 8, s, cfg.seed)
            exs = [run.train[i] for i in idx]
            groups = [[run.encoder(e.prompt, c) for c in e.candidates] for e in exs]
            batch = collate_choices(
                groups,
                [e.label for e in exs],
                run.choices,
                run.tokenizer.pad_token_id,
                args.max_length,
                length=args.max_length,
                answer_len=run.answer_len,  # 1 for one-token label words (the shared layout needs it)
                examples=8,
                shared=shared,
            )
            t = time.perf_counter()
            eng.train_step(batch, s, 0.0, 1e-3)
            if s > 1:
                times.append(time.perf_counter() - t)
        res["layouts"][layout] = {
            "export_seconds": export_s,
            "seconds_per_step": statistics.median(times),
            "all": times,
            "rows": eng.manifest.rows * 8,
        }
        print(layout, json.dumps(res["layouts"][layout]), file=sys.stderr)
        del eng
    (out / "et.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
