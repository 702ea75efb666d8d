"""``mobizo`` command line: train, eval, demo (and the engines' extra commands)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

from .errors import MobizoError


def _quiet_imports() -> None:
    # Third-party import chatter (torchao's optional CUDA kernels, pytree deprecations) is
    # noise to a user on a CPU box; mobizo's own warnings go through stderr explicitly.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("torchao").setLevel(logging.CRITICAL)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def _csv_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local Hugging Face model directory, or 'tiny' (built-in; default)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model directory")


def _add_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", help="task name (default: synthetic): sst2, rte, boolq, wic, wsc, multirc, mrpc, qqp, "
                   "qnli, wnli, cb, copa, winogrande, arc-easy, arc-challenge, squad, drop, custom, custom-cls; "
                   "see README 'Tasks and data'")
    p.add_argument("--data", help="directory or file with the task's train/validation data")
    p.add_argument("--template", help='prompt template for custom classification, e.g. "Review: {text} Sentiment:"')
    p.add_argument("--label-words", help="comma-separated label words, e.g. bad,good: custom classification, "
                   "or to override a benchmark's")
    p.add_argument("--max-new-tokens", type=int, help="generation tasks: max tokens generated per answer (default 32)")
    p.add_argument("--max-length", type=int, help="max tokens per sequence (default 128)")
    p.add_argument("--truncation", choices=["left", "error"], help="too-long prompts: cut from the left (default) or fail")
    p.add_argument("--eval-examples", type=int, help="validation examples to use (default 500; 0 = all)")
    p.add_argument("--eval-batch-size", type=int, help="rows per eval forward (default 32)")


def _add_adapter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank", type=int, help="LoRA rank r (default 8)")
    p.add_argument("--alpha", type=float, help="LoRA alpha; scaling = alpha/r (default 16)")
    p.add_argument("--target-modules", type=_csv_list, help="comma-separated module names (default per architecture)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--estimator", help="prge | prge-outer | mezo | fo (default prge)")
    p.add_argument("--queries", "-q", type=int, help="query directions per step q (default 4)")
    p.add_argument("--batch-size", type=int, help="examples per step (default 16)")
    p.add_argument("--data-mode", choices=["repeat", "split"], help="every direction sees the batch, or a 1/q slice")
    p.add_argument("--objective", choices=["auto", "answer", "choice"],
                   help="loss: answer-token CE, or CE over the candidates (auto: choice for classification/MC)")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    p.add_argument("--eps", type=float, help="perturbation scale epsilon (default 1e-3)")
    p.add_argument("--weight-decay", type=float, help="weight decay (default 0)")
    p.add_argument("--max-grad", type=float, help="skip steps with |projected grad| above this (default: no bound)")
    p.add_argument("--max-bad-steps", type=int, help="stop after this many consecutive skipped steps (default 3)")
    p.add_argument("--steps", type=int, help="total training steps (default 1000)")
    p.add_argument("--seed", type=int, help="run seed: adapters' A, noise, data order (default 0)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], help="optimizer of the fo estimator (default sgd)")
    p.add_argument("--train-a", action="store_true", default=None, help="fo: train A too (plain LoRA)")
    p.add_argument("--train-examples", type=int, help="sample this many training examples (default all)")
    p.add_argument("--eval-every", type=int, help="evaluate every N steps; 0 = only at the end (default 100)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps; 0 = only at the end (default 100)")
    p.add_argument("--engine", choices=["eager", "executorch"], help="who runs the step (default eager)")
    p.add_argument("--program", help="--engine executorch: program directory from 'mobizo export' (default: export into --out/program)")
    p.add_argument("--out", help="output directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out up to --steps")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="mobizo", description="Fine-tune LLMs with forward passes only (P-RGE + MP-LoRA)."
    )
    parser.add_argument("--version", action="version", version=f"mobizo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune an adapter")
    _add_model_args(p)
    _add_task_args(p)
    _add_adapter_args(p)
    _add_train_args(p)

    p = sub.add_parser("eval", help="evaluate a model (with or without an adapter)")
    _add_model_args(p)
    _add_task_args(p)
    p.add_argument("--adapter", help="PEFT adapter directory (omit to score the untouched model)")
    p.add_argument("--seed", type=int, help="seed for --eval-examples sampling (default 0)")
    p.add_argument("--json", help="also write the metrics as JSON to this file")

    p = sub.add_parser("export", help="export the ZO training step as an ExecuTorch program")
    _add_model_args(p)
    _add_task_args(p)
    _add_adapter_args(p)
    for flag, kw in (("--estimator", {}), ("--queries", {"type": int}), ("--batch-size", {"type": int}),
                     ("--data-mode", {"choices": ["repeat", "split"]}), ("--objective", {"choices": ["auto", "answer", "choice"]}),
                     ("--weight-decay", {"type": float}), ("--max-grad", {"type": float}), ("--seed", {"type": int}),
                     ("--train-examples", {"type": int})):  # fmt: skip
        p.add_argument(flag, **kw)
    p.add_argument("--no-xnnpack", action="store_true", help="portable kernels only (no XNNPACK delegation)")
    p.add_argument("--out", required=True, help="directory for train.pte and manifest.json")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

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
    p.add_argument("--models", type=_csv_list, help="speed/memory models: tiny,100m (default both)")
    p.add_argument("--model", help="convergence: model (default tiny)")
    p.add_argument("--task", help="convergence: task (default synthetic)")
    p.add_argument("--data", help="convergence: data directory or file of a local task")
    p.add_argument("--seeds", type=int, help="convergence: seeds per run (default 3; --quick 2)")
    p.add_argument("--steps", type=int, help="convergence: steps per run (default 300; --quick 12)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("demo", help="the built-in demo: eval, train with prge, eval again")
    p.add_argument("--out", help="directory for demo.json and the runs")
    p.add_argument("--steps", type=int, default=None, help="training steps per leg")
    p.add_argument("--engines", type=_csv_list, default=None, help="legs to run (default: eager,executorch)")
    p.add_argument("--no-progress", action="store_true")
    return parser


def _given(args: argparse.Namespace, exclude=("out", "resume", "overwrite")) -> dict:
    """The TrainConfig fields the user gave on the command line (``--eval-examples 0`` means all)."""
    from .trainer import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)} - set(exclude)
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if given.get("eval_examples") == 0:
        given["eval_examples"] = None
    return given


def train_config(args: argparse.Namespace):
    from .trainer import TrainConfig, resolve_resume

    given = _given(args, exclude=("resume", "overwrite"))
    cfg = TrainConfig(**given, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    return resolve_resume(cfg, set(given))


def cmd_export(args) -> int:
    from .trainer import TrainConfig, export

    cfg = TrainConfig(**_given(args), overwrite=args.overwrite)
    m = export(cfg, args.out, xnnpack=not args.no_xnnpack)
    print(f"wrote {args.out}/train.pte ({m.pte_bytes / 1e6:.1f} MB): {m.estimator} q={m.queries}, "
          f"{m.batch_size} examples x {m.max_length} tokens, answer window {m.answer_len}, objective {m.objective}")
    return 0


def cmd_train(args) -> int:
    from .trainer import train

    summary = train(train_config(args))
    metric = summary["metric"]
    line = f"step {summary['final_step']}: loss {summary['final_loss']:.4f}, "
    line += f"eval {metric} {summary[f'eval_{metric}']:.4f}"
    if summary.get("best"):
        line += f" (best {summary['best']['value']:.4f} at step {summary['best']['step']})"
    print(line)
    return 0


def cmd_eval(args) -> int:
    from .checkpoint import read_adapter
    from .data import Encoder
    from .engines.eager import EagerEngine
    from .evaluate import evaluate
    from .models import load_model
    from .mplora import inject, load_adapter_state
    from .evaluate import main_metric
    from .trainer import TrainConfig, check_config, load_task_data, warn_truncated

    cfg = TrainConfig(
        model=args.model or "tiny",
        task=args.task or "synthetic",
        data=args.data,
        template=args.template,
        label_words=args.label_words,
        seed=args.seed or 0,
        max_length=args.max_length or 128,
        truncation=args.truncation or "left",
        eval_examples=None if args.eval_examples == 0 else (args.eval_examples or 500),
        max_new_tokens=args.max_new_tokens or 32,
    )
    check_config(cfg)
    task, _, validation = load_task_data(cfg, need_train=False)
    adapter = read_adapter(args.adapter) if args.adapter else None
    model, tokenizer = load_model(cfg.model, trust_remote_code=args.trust_remote_code)
    validation = task.finalize(validation, tokenizer)
    encoder = Encoder(tokenizer)
    warn_truncated(encoder, validation, cfg.max_length, cfg.truncation, "validation")
    if adapter is not None:
        state, config = adapter
        modules = sorted({k.rsplit(".", 1)[0] for k in state})
        inject(model, modules, int(config["r"]), float(config["lora_alpha"]), 0)
        load_adapter_state(model, state)
    engine = EagerEngine(model, estimator=None)  # scoring only
    metrics = evaluate(
        engine, task.kind, validation, encoder, tokenizer.pad_token_id, cfg.max_length,
        args.eval_batch_size or 32, cfg.max_new_tokens,
    )  # fmt: skip
    metrics = {"task": task.name, "kind": task.kind, "metric": main_metric(task.kind), "model": cfg.model,
               "adapter": args.adapter, **metrics}  # fmt: skip
    print(f"{task.name} ({'zero-shot' if args.adapter is None else 'adapter ' + args.adapter}): "
          f"{metrics['metric']} {metrics[metrics['metric']]:.4f} on {metrics['n']} examples")  # fmt: skip
    for k, v in metrics.items():
        if isinstance(v, float):
            print(f"{k}: {v:.4f}")
    if args.json:
        from .checkpoint import atomic_write_text

        path = Path(args.json)
        if path.is_dir() or not path.absolute().parent.is_dir():
            raise MobizoError(f"--json {path}: not a writable file path")
        atomic_write_text(path, json.dumps(metrics, indent=1))
    return 0


def cmd_replay(args) -> int:
    from .replay import replay

    r = replay(args.log, args.out, model=args.model, upto=args.steps, overwrite=args.overwrite,
               trust_remote_code=args.trust_remote_code)  # fmt: skip
    print(f"replayed {r['steps']} steps ({r['applied']} applied, {r['skipped']} skipped) into {r['out']}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out=args.out, steps=args.steps, engines=args.engines, progress=not args.no_progress)
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench

    run_bench(args.which, args.out, quick=args.quick, threads=args.threads, models=args.models, model=args.model,
              task=args.task, data=args.data, seeds=args.seeds, steps=args.steps, progress=not args.no_progress)  # fmt: skip
    print(f"wrote {args.out}/results.json, {args.out}/results.md and plots")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "replay": cmd_replay, "demo": cmd_demo, "export": cmd_export,
            "bench": cmd_bench}


def _error(message: str) -> None:
    print("mobizo: error: " + " ".join(message.split()), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    _quiet_imports()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except MobizoError as e:
        _error(str(e))
        return 2
    except KeyboardInterrupt:
        print("mobizo: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permissions, a vanished file: the environment, not a bug
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        _error(f"{where}{e.strerror or e}")
        return 2
    except MemoryError:
        _error("out of memory (try a smaller --batch-size, --queries or --max-length)")
        return 2
    except Exception as e:  # noqa: BLE001 - a bug: one line for the user, the traceback on request
        if os.environ.get("MOBIZO_DEBUG"):
            raise
        msg = " ".join(str(e).split())
        print(f"mobizo: internal error: {type(e).__name__}: {msg} (set MOBIZO_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
