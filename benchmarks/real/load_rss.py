"""Peak RSS and time of loading a model in a fresh process (one way per process).

    python benchmarks/real/load_rss.py WAY PATH    # WAY: mobizo (models.load_model: GGUF or HF dir)
                                                   #      transformers-gguf (from_pretrained(gguf_file=...))
Prints one JSON line: way, seconds, rss_after_import_mib, peak_rss_mib (VmHWM), rss_after_mib, params_mib.
"""

import argparse
import json
import os
import pathlib
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
WAYS = ("mobizo", "transformers-gguf")


def status() -> dict:
    d = dict(
        line.split(":", 1)
        for line in pathlib.Path("/proc/self/status").read_text().splitlines()
        if line.startswith(("VmRSS", "VmHWM"))
    )
    return {k: int(v.split()[0]) // 1024 for k, v in d.items()}


def main(way: str, path: str) -> None:
    from mobizo.util import quiet_third_party

    quiet_third_party()
    import torch
    import transformers  # noqa: F401  (imports are the same baseline for every way)

    from mobizo.models import load_model

    torch.set_num_threads(1)
    base = status()["VmRSS"]
    t0 = time.perf_counter()
    if way == "mobizo":
        model, _ = load_model(path)
    elif way == "transformers-gguf":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        d, f = os.path.split(os.path.abspath(path))
        AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    else:
        raise SystemExit(f"unknown way {way}")
    secs = time.perf_counter() - t0
    s = status()
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(
        json.dumps(
            {
                "way": way,
                "path": path,
                "seconds": round(secs, 1),
                "rss_after_import_mib": base,
                "peak_rss_mib": s["VmHWM"],
                "rss_after_mib": s["VmRSS"],
                "params_mib": round(params),
            }
        )
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("way", choices=WAYS, help="mobizo: mobizo.models.load_model; transformers-gguf: from_pretrained")
    ap.add_argument("path", help="a .gguf file, or (way mobizo) a Hugging Face model directory or 'tiny'")
    args = ap.parse_args()
    main(args.way, args.path)
