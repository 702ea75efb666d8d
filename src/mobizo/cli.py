"""``mobizo`` command line. The flags of train / eval / export come from :mod:`mobizo.config`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import config as C
from .errors import MobizoError


class Parser(argparse.ArgumentParser):
    """argparse with mobizo's one-line errors (``mobizo: error: ...``, exit 2) instead of a usage block."""

    def error(self, message: str):
        _error(f"{message} (see '{self.prog} --help')")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = Parser(prog="mobizo", description="Fine-tune LLMs with forward passes only (P-RGE + MP-LoRA).")
    parser.add_argument("--version", action="version", version=f"mobizo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune an adapter")
    C.add_arguments(p, C.TRAIN_FLAGS)

    p = sub.add_parser("eval", help="evaluate a model (with or without an adapter)")
    C.add_arguments(
        p,
        C.MODEL_FLAGS + ("seed",) + C.DATA_FLAGS + ("progress", "threads", "device", "dtype"),
        {"seed": {"help": "seed for --eval-examples sampling"}},
    )
    _adapter_arguments(p, "omit both to score the untouched model")
    p.add_argument("--json", help="also write the metrics as JSON to this file")

    p = sub.add_parser("generate", help="generate text with a fine-tuned model (streamed to stdout)")
    _use_arguments(p)
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument(
        "--input",
        metavar="FILE",
        help="prompts from a file: JSONL with a 'prompt' field per line, or plain text, one prompt per line "
        "('-': stdin)",
    )
    p.add_argument(
        "--no-chat-template",
        dest="chat_template",
        action="store_false",
        help="do not apply the tokenizer's chat template (applied by default when the tokenizer has one)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per prompt instead of streamed text")
    _sampling_arguments(p, 128)

    p = sub.add_parser("chat", help="an interactive conversation with a fine-tuned chat model")
    _use_arguments(p)
    p.add_argument("--system", metavar="TEXT", help="a system message at the start of the conversation")
    _sampling_arguments(p, 256)

    p = sub.add_parser("predict", help="label new inputs with a classification / multiple-choice run")
    _adapter_arguments(p, "omit both to use the untouched model")
    C.add_arguments(
        p,
        C.MODEL_FLAGS + ("task", "data", "template", "label_words", "max_length", "truncation", "eval_batch_size"),
        {
            "eval_batch_size": {"help": "inputs per forward"},
            "data": {"help": "--task custom's data folder: only read to tell multiple choice (records with choices)"},
        },
    )
    C.add_arguments(p, ("threads", "progress"))
    p.add_argument(
        "--input",
        metavar="FILE",
        required=True,
        help="JSONL records with the template's fields, or plain text lines put into its single field ('-': stdin)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per input instead of 'label<TAB>probabilities'")

    p = sub.add_parser("export", help="export the ZO training step as an ExecuTorch program")
    C.add_arguments(p, C.EXPORT_FLAGS + ("progress",))
    p.add_argument("--no-xnnpack", action="store_true", help="portable kernels only (no XNNPACK delegation)")
    p.add_argument("--out", required=True, help="program directory to write (train.pte, manifest.json)")
    p.add_argument("--overwrite", action="store_true", help="replace the program in --out")

    p = sub.add_parser("bundle", help="export the step and write a bundle for the native trainer (mobizo-train)")
    not_bundle = (
        "engine",
        "program",
        "reexport",
        "fixed_length",
        "dist_mode",
        "out",
        "resume",
        "overwrite",
        "eval_every",
        "eval_at_start",
    )
    C.add_arguments(p, tuple(n for n in C.TRAIN_FLAGS if n not in not_bundle))
    p.add_argument("--program", help="reuse this 'mobizo export' directory instead of exporting (checked to fit)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace the bundle in --out")
    p.add_argument(
        "--no-tokenizer",
        dest="tokenizer",
        action="store_false",
        help="do not carry the tokenizer (no generation or --data on the device; no native build needed to check it)",
    )

    p = sub.add_parser("native", help="build or run the native trainer mobizo-train (C++, ExecuTorch runtime)")
    nsub = p.add_subparsers(dest="native_command", required=True)
    q = nsub.add_parser("build", help="compile mobizo-train against the installed executorch wheel; prints its path")
    q.add_argument("--out", help="build directory (default: a cache under ~/.cache/mobizo/native)")
    q.add_argument("--force", action="store_true", help="rebuild even if a build for these sources exists")
    q.add_argument(
        "--no-tokenizer",
        dest="tokenizer",
        action="store_false",
        help="without the tokenizer library (pytorch-tokenizers, built once from its PyPI sdist): no text on the device",
    )
    q = nsub.add_parser("train", help="train a bundle natively (builds mobizo-train first if needed)")
    q.add_argument("bundle", help="bundle directory from 'mobizo bundle'")
    q.add_argument("--out", required=True, help="run directory")
    q.add_argument("--resume", action="store_true", help="continue the run in --out")
    q.add_argument("--overwrite", action="store_true", help="replace the mobizo run in --out")
    q.add_argument("--steps", type=int, help="stop after this step (default: the bundle's)")
    q.add_argument(
        "--data", metavar="FILE", help="train on these records (.jsonl), tokenized natively, not the bundle's"
    )
    q.add_argument("--no-progress", action="store_true", help="no per-step progress lines")

    p = sub.add_parser("convert", help="write a local Hugging Face checkpoint from a GGUF file")
    p.add_argument("--gguf", required=True, help="the .gguf file")
    p.add_argument("--out", required=True, help="directory for config.json, *.safetensors and the tokenizer")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        help="an adapter trained on --gguf: point its base_model_name_or_path at --out, so that "
        "peft.AutoPeftModelForCausalLM loads it (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser(
        "export-adapter",
        help="write an adapter for llama.cpp / llama-server / Ollama (LoRA GGUF) or merged into its base",
    )
    p.add_argument("--adapter", required=True, help="adapter directory, or a run directory (its adapter/)")
    p.add_argument(
        "--model",
        help="base model: Hugging Face directory or .gguf file (default: the adapter's base_model_name_or_path, "
        "else the run's summary.json config.model)",
    )
    p.add_argument(
        "--format",
        required=True,
        choices=("lora-gguf", "merged-hf", "merged-gguf"),
        help="lora-gguf: llama.cpp LoRA adapter for the base's GGUF; merged-hf: Hugging Face checkpoint with the "
        "adapter folded in; merged-gguf: the GGUF base with the adapter folded in",
    )
    p.add_argument(
        "--outtype",
        choices=("f32", "f16", "bf16", "q8_0"),
        help="tensor type (default f32 for lora-gguf and merged-hf, f16 for merged-gguf; q8_0: GGUF only, rows "
        "that are not a multiple of 32 fall back to f16; vectors and norms stay f32)",
    )
    p.add_argument("--out", required=True, help="file to write (GGUF formats) or directory (merged-hf)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("replay", help="rebuild a ZO run's adapter from its metrics.jsonl (no forward pass)")
    p.add_argument("--log", required=True, help="the run's metrics.jsonl")
    p.add_argument("--out", required=True, help="adapter directory to write")
    p.add_argument("--model", help="base model (default: the one named in the log)")
    p.add_argument("--steps", type=int, help="replay steps 1..N only (default: all logged steps)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing adapter in --out")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model directory")

    p = sub.add_parser("bench", help="speed, memory and convergence benchmarks (results.json, results.md, PNGs)")
    p.add_argument("which", choices=["speed", "memory", "convergence", "all"])
    p.add_argument("--out", required=True, help="output directory (programs are exported into OUT/programs and reused)")
    p.add_argument("--quick", action="store_true", help="reduced grid, a few minutes: a smoke test")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for PyTorch and ExecuTorch (default 1)")
    p.add_argument("--models", type=C._csv_list, help="speed/memory models: tiny,100m (default both)")
    p.add_argument("--model", help="convergence: model (default tiny)")
    p.add_argument("--task", help="convergence: task (default synthetic)")
    p.add_argument("--data", help="convergence: data directory or file of a local task")
    p.add_argument("--seeds", type=int, help="convergence: seeds per run (default 3; --quick 2)")
    p.add_argument("--steps", type=int, help="convergence: steps per run (default 300; --quick 12)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("demo", help="the built-in demo: eval, train with prge, eval again")
    p.add_argument("--out", help="directory for demo.json and the runs")
    p.add_argument("--steps", type=int, default=None, help="training steps per leg")
    p.add_argument("--engines", type=C._csv_list, default=None, help="legs to run (default: eager,executorch)")
    p.add_argument("--no-progress", action="store_true")
    return parser


def _adapter_arguments(p, none: str) -> None:
    p.add_argument(
        "--adapter",
        metavar="PATH",
        help="PEFT adapter directory, or a run directory (then as --run); " + none,
    )
    p.add_argument(
        "--run",
        metavar="RUN",
        help="a 'mobizo train' run directory: its model, task, data, template, label words, max length and "
        "quantization are the defaults of the flags not given, its adapter is used",
    )
    p.add_argument(
        "--adapter-kind",
        choices=("best", "last"),
        help="which adapter of the run: best (best/, the best periodic eval) or last (adapter/, the final one); "
        "default: best/ when the run has one",
    )


def _use_arguments(p) -> None:
    """The flags of generate and chat: what to load and with which engine."""
    _adapter_arguments(p, "omit both to use the untouched model")
    C.add_arguments(p, C.MODEL_FLAGS + ("threads", "progress"))
    p.add_argument(
        "--engine",
        choices=C.ENGINES,
        default="eager",
        help="eager PyTorch (default), or the run's ExecuTorch program (RUN/program or --program) with the adapter",
    )
    p.add_argument("--program", metavar="DIR", help="--engine executorch: this program directory ('mobizo export')")


def _sampling_arguments(p, max_new_tokens: int) -> None:
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        help=f"tokens to generate at most (default {max_new_tokens})",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    p.add_argument(
        "--top-p", type=float, default=1.0, help="sample among the most likely tokens of this mass (default 1)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    p.add_argument("--stop", action="append", default=[], metavar="STR", help="stop before this text (repeatable)")


def config_from(args: argparse.Namespace, names=None) -> tuple[C.TrainConfig, set[str]]:
    """The TrainConfig of the flags given (defaults for the others) and the set of given names."""
    given = C.given(args, names)
    return C.TrainConfig.from_flat(**given), set(given)


def cmd_train(args) -> int:
    from .api import run_training

    cfg, given = config_from(args)
    summary = run_training(cfg, given=given)  # one process, or a rank of a torchrun launch
    if (summary.get("dist") or {}).get("rank", 0) != 0:
        return 0  # a distributed run's result line comes from rank 0
    metric = summary["metric"]
    value = summary[f"eval_{metric}"]
    line = f"step {summary['final_step']}: loss {summary['final_loss']:.4f}, eval {metric} "
    line += f"{value:.4f}" if value is not None else "n/a"
    if summary.get("best"):
        line += f" (best {summary['best']['value']:.4f} at step {summary['best']['step']})"
    print(line + f"; run in {summary['out']}")
    return 0


def cmd_eval(args) -> int:
    from .api import evaluate
    from .fsio import atomic_write_text
    from .util import dumps

    cfg, given = config_from(args)
    json_path = Path(args.json) if args.json else None
    if json_path is not None and (json_path.is_dir() or not json_path.absolute().parent.is_dir()):
        raise MobizoError(f"--json {json_path}: not a writable file path")
    metrics = evaluate(cfg, adapter=args.adapter, run=args.run, adapter_kind=args.adapter_kind, given=given)
    print(
        f"{metrics['task']} ({'zero-shot' if metrics['adapter'] is None else 'adapter ' + metrics['adapter']}): "
        f"{metrics['metric']} {metrics[metrics['metric']]:.4f} on {metrics['n']} examples"
    )
    for k, v in metrics.items():
        if isinstance(v, float):
            print(f"{k}: {v:.4f}")
    if json_path is not None:
        atomic_write_text(json_path, dumps(metrics, indent=1))
    return 0


def _use(args, names):
    """(config, Source) of generate / chat / predict: the flags given, the run's values for the others."""
    from .inference import resolve_source, with_run_defaults

    cfg, given = config_from(args, names)
    src = resolve_source(args.adapter, args.run, args.adapter_kind)
    return with_run_defaults(cfg, given, src, names), src


def _sampling(args):
    from .generation import SamplingConfig

    return SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed, list(args.stop)).check()


USE_FLAGS = C.MODEL_FLAGS + ("threads", "progress")


def cmd_generate(args) -> int:
    import time

    from .generation import stream
    from .inference import load_generator, prompt_token_ids, read_prompts
    from .util import dumps

    sampling = _sampling(args)  # bad input fails before anything loads
    if args.engine != "executorch" and args.program:
        raise MobizoError("--program applies to --engine executorch")
    prompts = list(args.prompt)
    if any(not p for p in prompts):
        raise MobizoError("--prompt must not be empty")
    if args.input is not None:
        prompts += read_prompts(args.input)
    if not prompts:
        raise MobizoError("nothing to generate from: give --prompt TEXT or --input FILE")
    cfg, src = _use(args, USE_FLAGS)
    gen = load_generator(cfg, src, engine=args.engine, program=args.program)
    chat = None if args.chat_template else False
    ids = prompt_token_ids(gen, prompts, chat, sampling.max_new_tokens)  # every prompt checked before any output
    out = sys.stdout
    midline = False
    try:
        for i, (prompt, prompt_ids) in enumerate(zip(prompts, ids)):
            t0, tokens, info, pieces = time.perf_counter(), [], {}, []
            if not args.json and len(prompts) > 1:
                out.write(("\n" if i else "") + f"==> prompt {i + 1} <==\n")
            for piece in stream(gen.engine, gen.tokenizer, prompt_ids, sampling, tokens, info):
                pieces.append(piece)
                if not args.json:
                    out.write(piece)
                    out.flush()
                    midline = not piece.endswith("\n")
            if args.json:
                record = {
                    "prompt": prompt,
                    "completion": "".join(pieces),
                    "tokens": len(tokens),
                    "finish": info["finish"],
                    "seconds": round(time.perf_counter() - t0, 3),
                }
                out.write(dumps(record, ensure_ascii=False) + "\n")
            else:
                out.write("\n")
                midline = False
            out.flush()
    except KeyboardInterrupt:
        if midline:  # end the cut line: the message that follows stands on its own
            out.write("\n")
            out.flush()
        raise
    return 0


def cmd_chat(args) -> int:
    from .chat import run_chat
    from .inference import load_generator

    sampling = _sampling(args)
    if args.engine != "executorch" and args.program:
        raise MobizoError("--program applies to --engine executorch")
    cfg, src = _use(args, USE_FLAGS)
    gen = load_generator(cfg, src, engine=args.engine, program=args.program)
    return run_chat(gen, sampling, system=args.system)


def cmd_predict(args) -> int:
    from .inference import format_prediction, input_examples, load_predictor, predict, read_inputs
    from .util import dumps

    names = C.MODEL_FLAGS + ("task", "data", "template", "label_words", "max_length", "truncation", "eval_batch_size")
    _, items = read_inputs(args.input)  # bad input fails before anything loads
    cfg, src = _use(args, names + ("threads", "progress"))
    pred = load_predictor(cfg, src)
    name = "<stdin>" if args.input == "-" else args.input
    examples = input_examples(pred.task, [(f"{name}:{n}", value) for n, value in items])
    lines = [
        dumps(p, ensure_ascii=False) if args.json else format_prediction(p, pred.task.kind)
        for p in predict(pred, examples)
    ]
    sys.stdout.write("".join(line + "\n" for line in lines))  # all scored first: nothing half-written
    sys.stdout.flush()
    return 0


def cmd_export(args) -> int:
    from .build import export
    from .engines.executorch.manifest import MANIFEST, PROGRAM, TOKENIZER
    from .rundir import check_replaceable

    cfg, _ = config_from(args)
    out = Path(args.out)
    check_replaceable(out, "program", args.overwrite, entries=(PROGRAM, MANIFEST, TOKENIZER), exclusive=True)
    m = export(cfg, out, xnnpack=not args.no_xnnpack)
    print(
        f"wrote {out}/train.pte ({m.pte_bytes / 1e6:.1f} MB): {m.estimator} q={m.queries}, "
        f"{m.batch_size} examples x {m.max_length} tokens, answer window {m.answer_len}, objective {m.objective}"
    )
    took = ", ".join(f"{stage.split(' (')[0]} {s:.0f} s" for stage, s in m.export_seconds.items())
    if took:  # (status lines show them on a terminal; this line stays in a log)
        print(f"export stages: {took}")
    return 0


def cmd_bundle(args) -> int:
    from .bundle import make_bundle

    cfg, _ = config_from(args)
    out = make_bundle(cfg, args.out, program=args.program, overwrite=args.overwrite, tokenizer=args.tokenizer)
    print(f"wrote bundle {out} (mobizo native train {out} --out RUN)")
    return 0


def cmd_native(args) -> int:
    from . import native

    if args.native_command == "build":
        print(native.build(args.out, force=args.force, tokenizer=args.tokenizer))
        return 0
    if args.resume and args.overwrite:
        raise MobizoError("--resume and --overwrite exclude each other (continue the run, or replace it)")
    s = native.train(
        args.bundle,
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        steps=args.steps,
        quiet=args.no_progress,
        data=args.data,
    )
    print(f"step {s.get('final_step')}: loss {s.get('final_loss')}; run in {args.out}")
    return 0


def cmd_convert(args) -> int:
    from .convert import convert_gguf
    from .deploy import repoint_adapters, set_adapter_base
    from .progress import status

    adapters = repoint_adapters(args.adapter, args.gguf, args.out)  # every adapter checked before any write
    with status(f"converting {args.gguf}", not args.no_progress):
        out = convert_gguf(args.gguf, args.out)
    print(f"wrote {out} (load it with --model {out}, transformers or peft)")
    for a in adapters:
        set_adapter_base(a, out)
        print(f"adapter {a} now names {out.resolve()} as its base (peft.AutoPeftModelForCausalLM loads it)")
    return 0


def cmd_export_adapter(args) -> int:
    from .deploy import export_adapter
    from .progress import status

    with status(f"exporting {args.adapter} as {args.format}", not args.no_progress):
        r = export_adapter(
            args.adapter,
            args.format,
            args.out,
            model=args.model,
            outtype=args.outtype,
            overwrite=args.overwrite,
        )
    print(f"wrote {r['out']} ({r['format']}, {r['outtype']}) for base {r['base']}")
    return 0


def cmd_replay(args) -> int:
    from .replay import replay

    r = replay(
        args.log,
        args.out,
        model=args.model,
        upto=args.steps,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
    )
    print(f"replayed {r['steps']} steps ({r['applied']} applied, {r['skipped']} skipped) into {r['out']}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out=args.out, steps=args.steps, engines=args.engines, progress=not args.no_progress)
    return 0


def benchmarks_dir() -> Path:
    """The repository's ``benchmarks/`` (it holds ``mobizo_bench``, what ``mobizo bench`` runs), or
    ``MOBIZO_BENCHMARKS``. The benchmarks are not part of the package: a source checkout or an editable
    install has them next to ``src/``, a wheel does not."""
    env = os.environ.get("MOBIZO_BENCHMARKS")
    d = Path(env) if env else Path(__file__).resolve().parents[2] / "benchmarks"
    if not (d / "mobizo_bench" / "__init__.py").is_file():
        raise MobizoError(
            f"the benchmarks are not at {d} ('mobizo bench' runs from a source checkout; "
            "set MOBIZO_BENCHMARKS to its benchmarks/ directory)"
        )
    return d


def cmd_bench(args) -> int:
    d = str(benchmarks_dir())
    if d not in sys.path:
        sys.path.insert(0, d)  # first: ahead of any other tree's copy an installed mobizo puts on the path
    from mobizo_bench import run_bench

    run_bench(
        args.which,
        args.out,
        quick=args.quick,
        threads=args.threads,
        models=args.models,
        model=args.model,
        task=args.task,
        data=args.data,
        seeds=args.seeds,
        steps=args.steps,
        progress=not args.no_progress,
    )
    print(f"wrote {args.out}/results.json, {args.out}/results.md and plots")
    return 0


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "predict": cmd_predict,
    "replay": cmd_replay,
    "demo": cmd_demo,
    "export": cmd_export,
    "bench": cmd_bench,
    "bundle": cmd_bundle,
    "native": cmd_native,
    "convert": cmd_convert,
    "export-adapter": cmd_export_adapter,
}


def _error(message: str) -> None:
    print("mobizo: error: " + " ".join(message.split()), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from .util import quiet_third_party

    quiet_third_party()
    parser = build_parser()
    args = parser.parse_args(None if argv is None else [str(a) for a in argv])
    try:
        return COMMANDS[args.command](args)
    except MobizoError as e:
        _error(str(e))
        return 2
    except KeyboardInterrupt:
        print("mobizo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`mobizo generate ... | head`): stop quietly
        try:  # (and let the interpreter's last flush of stdout go nowhere instead of failing again)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141  # 128 + SIGPIPE, what a shell reports for a writer whose pipe closed
    except OSError as e:  # disk full, permissions, a vanished file: the environment, not a bug
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        _error(f"{where}{e.strerror or e}")
        return 2
    except MemoryError:
        _error("out of memory (try a smaller --batch-size, --queries or --max-length)")
        return 2
    except RecursionError:
        _error("input nested too deeply to read")
        return 2
    except Exception as e:  # a bug: one line for the user, the traceback on request
        if os.environ.get("MOBIZO_DEBUG"):
            raise
        msg = " ".join(str(e).split())
        print(
            f"mobizo: internal error: {type(e).__name__}: {msg} (set MOBIZO_DEBUG=1 for the traceback)", file=sys.stderr
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
