"""Generation speed and memory of a fine-tuned model on every engine that can run it, side by side.

    python benchmarks/generation_speed.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --work /tmp/genspeed \
        [--llama-gguf Q8_0=FILE --llama-gguf F16=FILE] [--threads 1] [--repeat 3]

A 64-token prompt, then 64 new tokens, greedy, one sequence, the same thread count everywhere; each row in
its own process (peak RSS = ``ru_maxrss`` of that process: the runtime, the weights and the work):

* eager PyTorch with a KV cache (``EagerEngine.decoder``), the GGUF dequantized to float32;
* the exported ExecuTorch program's ``prefill``/``decode`` methods (``ExecuTorchEngine.decoder``), float32 and
  with ``--quantize 8da8w`` (int8 linears with int8 dynamic activations, XNNPACK);
* the native trainer's ``mobizo-train generate`` on a bundle of the float32 program (``mobizo bundle
  --program``), a C++ process with no Python: its time is measured from outside (see ``native_row``);
* llama.cpp (``llama-cpp-python``) on GGUF files of the same model at Q8_0 and F16 (``--llama-gguf``).

Every row decodes exactly 64 tokens (EOS does not stop it), so the rows do the same work. Reported:
prefill seconds for the 64 prompt tokens, decode tokens/s over the 63 decode steps, and peak RSS; the
median of ``--repeat`` runs of the timed part inside one process (after one untimed warm-up), and the
rows are run one after the other on a machine that may be shared: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TOKENS, NEW_TOKENS = 64, 64
TEXT = (
    "The committee met on a grey Tuesday morning to review the harvest reports from the northern valleys, "
    "where the late frost had damaged the orchards, and to decide how the reserve grain should be shared "
    "among the villages before the winter roads closed for the season."
)


def prompt_ids(tokenizer) -> list[int]:
    ids = tokenizer(TEXT * 3, add_special_tokens=True)["input_ids"]
    return list(ids[:PROMPT_TOKENS])


def _time_decoder(make_decoder, ids: list[int], repeat: int) -> dict:
    """(prefill seconds, decode tokens/s) of ``make_decoder(ids)`` + 63 greedy steps, median of ``repeat``."""
    import torch

    def once():
        t0 = time.perf_counter()
        dec = make_decoder(ids)
        t1 = time.perf_counter()
        logits = dec.logits
        for _ in range(NEW_TOKENS - 1):
            logits = dec.step(torch.argmax(logits, dim=-1).reshape(-1))
        return t1 - t0, (NEW_TOKENS - 1) / (time.perf_counter() - t1)

    once()  # warm-up: method loading, weight packing, allocator
    runs = [once() for _ in range(repeat)]
    return {"prefill_s": statistics.median(r[0] for r in runs), "decode_tok_s": statistics.median(r[1] for r in runs)}


def worker(row: str, args) -> dict:
    """One row, in this process."""
    if row.startswith("llama.cpp"):
        from llama_cpp import Llama

        path = dict(x.split("=", 1) for x in args.llama_gguf)[row.split(" ", 1)[1]]
        llm = Llama(model_path=path, n_ctx=PROMPT_TOKENS + NEW_TOKENS, n_threads=args.threads, verbose=False)
        from tokenizers import Tokenizer

        # the tokenizer library alone (the model's tokenizer.json, beside the program), no torch and no
        # model: they would count in this row's peak RSS
        tok = Tokenizer.from_file(str(Path(args.work) / "program-fp32" / "tokenizer" / "tokenizer.json"))
        ids = tok.encode(TEXT * 3, add_special_tokens=True).ids[:PROMPT_TOKENS]

        def once():
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids)
            t1 = time.perf_counter()
            for _ in range(NEW_TOKENS - 1):
                token = int(llm.scores[llm.n_tokens - 1].argmax())
                llm.eval([token])
            return t1 - t0, (NEW_TOKENS - 1) / (time.perf_counter() - t1)

        once()
        runs = [once() for _ in range(args.repeat)]
        return {
            "prefill_s": statistics.median(r[0] for r in runs),
            "decode_tok_s": statistics.median(r[1] for r in runs),
        }
    import torch

    torch.set_num_threads(args.threads)
    if row == "eager":
        from mobizo.engines.eager import EagerEngine
        from mobizo.models import load_model

        model, tok = load_model(args.gguf)
        engine = EagerEngine(model, None)
    else:
        from mobizo.engines.executorch import ExecuTorchEngine
        from mobizo.models import load_fast_tokenizer
        from mobizo.threads import apply_threads

        apply_threads(args.threads)
        program = Path(args.work) / ("program-8da8w" if "8da8w" in row else "program-fp32")
        engine = ExecuTorchEngine(program)
        tok = load_fast_tokenizer(program / "tokenizer")
    ids = prompt_ids(tok)

    def make(ids):
        return engine.decoder(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))

    return _time_decoder(make, ids, args.repeat)


def run_row(row: str, args, extra: list[str] | None = None) -> dict:
    log = Path(args.work) / f"{row.replace(' ', '_')}.log"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    cmd = extra or [sys.executable, __file__, "--worker", row, *sys.argv[1:]]
    with open(log, "w") as f:
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "MAXRSS-KB %M", *cmd], stdout=f, stderr=subprocess.STDOUT, env=env
        )
    text = log.read_text(errors="replace")
    kb = [int(line.split()[1]) for line in text.splitlines() if line.startswith("MAXRSS-KB")]
    result = next((json.loads(line[7:]) for line in text.splitlines() if line.startswith("RESULT ")), {})
    result.update(peak_rss_mib=round(kb[-1] / 1024) if kb else None, rc=proc.returncode)
    return result


def _decoded_prompt(args) -> str:
    """The benchmark's 64 prompt tokens as text (the native trainer tokenizes text itself)."""
    from mobizo.models import load_fast_tokenizer

    tok = load_fast_tokenizer(Path(args.work) / "program-fp32" / "tokenizer")
    return tok.decode(prompt_ids(tok), skip_special_tokens=True)


def native_row(args) -> dict:
    """``mobizo-train generate`` on the fp32 program's bundle, one thread. It prints no timings, so each
    repeat runs the whole process twice, for 1 and for 64 new tokens: decode tokens/s = (n - 1) / the
    difference of the two wall times; "prefill_s" is the 1-token process's wall time (load, checks, the
    weights' packing and the prefill: an upper bound). Greedy: it stops at EOS, so the tokens it decoded
    are counted from its --json output."""
    from mobizo.native import build

    bundle = Path(args.work) / "bundle"
    if not (bundle / "run.json").is_file():
        cmd = [sys.executable, "-m", "mobizo", "bundle", *_program_flags(args), "--steps", "1"]
        cmd += ["--program", str(Path(args.work) / "program-fp32"), "--out", str(bundle), "--overwrite"]
        subprocess.run(cmd, check=True, env=_env())
    binary = build()
    prompt = _decoded_prompt(args)

    def once(n: int) -> tuple[float, dict]:
        cmd = [str(binary), "generate", str(bundle), "--prompt", prompt, "--no-chat-template", "--json"]
        cmd += ["--max-new-tokens", str(n), "--threads", "1"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return time.perf_counter() - t0, json.loads(proc.stdout.splitlines()[-1])

    once(1)  # warm-up: the page cache
    runs = []
    for _ in range(args.repeat):
        (t1, _), (tn, rec) = once(1), once(NEW_TOKENS)
        runs.append((t1, (rec["tokens"] - 1) / (tn - t1), tn, rec))
    # peak RSS: one more 64-token run under /usr/bin/time (its output lands in WORK/native.log)
    cmd = [str(binary), "generate", str(bundle), "--prompt", prompt, "--no-chat-template", "--threads", "1"]
    rss = run_row("native", args, [*cmd, "--max-new-tokens", str(NEW_TOKENS)])
    rec = runs[-1][3]
    return {
        "prefill_s": statistics.median(r[0] for r in runs),
        "decode_tok_s": statistics.median(r[1] for r in runs),
        "process_s": statistics.median(r[2] for r in runs),
        "prompt_tokens": rec.get("prompt_tokens"),
        "new_tokens": rec.get("tokens"),
        "peak_rss_mib": rss.get("peak_rss_mib"),
        "rc": rss.get("rc"),
    }


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))


def _program_flags(args) -> list[str]:
    """The model, task and length of the programs (a four-word task: generation needs none of it)."""
    data = Path(args.work) / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").write_text(
            "\n".join(json.dumps({"text": w, "label": i % 2}) for i, w in enumerate(["good", "bad", "fine", "poor"]))
        )
    return [
        "--model",
        args.gguf,
        "--task",
        "custom",
        "--data",
        str(data),
        "--template",
        "Word: {text}\nSentiment:",
        "--label-words",
        "negative,positive",
        "--max-length",
        str(PROMPT_TOKENS + NEW_TOKENS),
        "--optimizer",
        "sgd",
    ]


def export(args, out: Path, quantize: str) -> None:
    """The training program of the model, with its generation methods, for 128 positions."""
    if (out / "train.pte").is_file():
        return
    cmd = [
        sys.executable,
        "-m",
        "mobizo",
        "export",
        *_program_flags(args),
        "--fixed-length",
        "--quantize",
        quantize,
        "--out",
        str(out),
        "--overwrite",
        "--no-progress",
    ]
    subprocess.run(cmd, check=True, env=_env())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", required=True, help="the model (a .gguf file, or a Hugging Face directory)")
    ap.add_argument("--work", required=True, help="folder for the programs, logs and results.json")
    ap.add_argument("--llama-gguf", action="append", default=[], help="NAME=FILE: a llama.cpp row per file")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-native", action="store_true", help="skip the native trainer's row (no compiler)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
        return
    export(args, Path(args.work) / "program-fp32", "none")
    export(args, Path(args.work) / "program-8da8w", "8da8w")
    rows = ["eager", "executorch fp32", "executorch 8da8w"] + [f"llama.cpp {x.split('=')[0]}" for x in args.llama_gguf]
    results = {row: run_row(row, args) for row in rows}
    if not args.no_native:
        results["native fp32 (mobizo-train)"] = native_row(args)
    (Path(args.work) / "results.json").write_text(json.dumps(results, indent=1))
    print(
        f"{PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new tokens, greedy, {args.threads} thread(s), median of "
        f"{args.repeat}\n"
    )
    print("| engine | prefill s (64 tokens) | decode tokens/s | peak RSS MiB |\n|---|---|---|---|")
    for row, r in results.items():
        if r.get("rc"):
            print(f"| {row} | failed (exit {r['rc']}, see its log) | | |")
            continue
        print(
            f"| {row} | {r.get('prefill_s', float('nan')):.3f} | {r.get('decode_tok_s', float('nan')):.1f} | "
            f"{r.get('peak_rss_mib')} |"
        )
    native = results.get("native fp32 (mobizo-train)")
    if native and not native.get("rc"):
        print(
            f"\nnative: prefill column = the whole 1-token process (load, checks, packing, prefill of "
            f"{native['prompt_tokens']} tokens); decode over {native['new_tokens']} new tokens; a 64-token process "
            f"{native['process_s']:.2f} s"
        )


if __name__ == "__main__":
    main()
