"""Using what a run trained: name it by its run directory, generate text with it, rank a task's candidates.

* :func:`resolve_source`: which adapter ``--run RUN`` / ``--adapter PATH`` means (a run's ``best/`` when it
  has one, else ``adapter/``; an adapter directory inside a run belongs to that run) and the run's saved
  configuration (``checkpoint/state.json``, else ``summary.json``, else the ``metrics.jsonl`` header);
* :func:`with_run_defaults`: the flags not given take the run's values (model, task, data, template,
  label words, max length, truncation, quantization, eval sizes); a bare adapter names its base model;
* :func:`load_generator`: the engine that generates (eager: the model with the adapter; ``executorch``:
  the run's program with the adapter loaded into it) and the tokenizer;
* :func:`load_predictor` / :func:`predict`: classification and multiple-choice candidates ranked exactly
  as eval ranks them (:func:`mobizo.evaluation.choice_scores`), as probabilities;
* :func:`read_inputs`: ``--input FILE|-``: JSONL records, or plain text one input per line.

``mobizo generate`` / ``chat`` / ``predict`` / ``eval`` and :func:`mobizo.generate` / :func:`mobizo.predict`
are built on these (docs/generate.md).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import FIELDS, TrainConfig
from .errors import MobizoError

# The fields a run's saved configuration gives a command that uses its adapter (flags given win). Not
# trust_remote_code: a directory must not turn on running model code by itself.
RUN_FIELDS = (
    "model",
    "seed",
    "task",
    "data",
    "template",
    "label_words",
    "max_length",
    "truncation",
    "quantize",
    "group_size",
    "quantize_embeddings",
    "eval_examples",
    "eval_batch_size",
    "max_new_tokens",
)
ADAPTER_KINDS = ("best", "last")


def note(message: str) -> None:
    print(f"mobizo: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- run directories


@dataclass
class Source:
    """What an adapter argument names: the adapter directory to load (None: the untouched base), the run
    it belongs to and that run's saved flat fields, and the base model the adapter records."""

    adapter: Path | None = None
    run: Path | None = None
    config: dict = field(default_factory=dict)
    base: str | None = None
    state: tuple | None = None  # (tensors, adapter_config) as :func:`mobizo.checkpoint.read_adapter` reads them
    notes: list[str] = field(default_factory=list)  # what was chosen for the user, said once all is loaded

    def announce(self) -> None:
        """The notes on stderr (after loading: a command that fails says only its error)."""
        for line in self.notes:
            note(line)
        self.notes.clear()


def is_run_dir(path: Path) -> bool:
    """A directory ``mobizo train`` writes (its marker; or, without one, a checkpoint or a summary)."""
    from .checkpoint import STATE
    from .fsio import resolve_dir
    from .rundir import CHECKPOINT, SUMMARY, read_marker

    path = Path(path)
    if not path.is_dir():
        return False
    marker = read_marker(path)
    if marker is not None:
        return marker.get("kind") == "run"
    ck = resolve_dir(path / CHECKPOINT)
    return (ck is not None and (ck / STATE).is_file()) or (path / SUMMARY).is_file()


def saved_config(run: Path) -> dict:
    """The flat fields a run saved: its checkpoint's trajectory config and settings, else ``summary.json``'s
    config, else the ``metrics.jsonl`` header's."""
    from .checkpoint import STATE, read_state
    from .fsio import resolve_dir
    from .rundir import CHECKPOINT, METRICS, SUMMARY

    ck = resolve_dir(run / CHECKPOINT)
    if ck is not None and (ck / STATE).is_file():
        state = read_state(ck)
        return {**(state.get("config") or {}), **(state.get("settings") or {})}
    for path, key in ((run / SUMMARY, None), (run / METRICS, "first line")):
        try:
            text = path.read_text(encoding="utf-8")
            record = json.loads(text.split("\n", 1)[0] if key else text)
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(record, dict) and isinstance(record.get("config"), dict):
            return dict(record["config"])
    raise MobizoError(f"{run} holds no saved run configuration (checkpoint/state.json, summary.json or metrics.jsonl)")


def _run_adapter(run: Path, kind: str | None, notes: list[str]) -> Path:
    """The adapter of ``run``: ``best/`` (the best periodic eval) if it has one, else ``adapter/`` (the
    final one), else ``checkpoint/`` (a run stopped before its end); ``kind`` picks best or last."""
    from .fsio import resolve_dir
    from .rundir import ADAPTER, BEST, CHECKPOINT, SUMMARY

    have = {name: resolve_dir(run / name) is not None for name in (BEST, ADAPTER, CHECKPOINT)}
    try:
        summary = json.loads((run / SUMMARY).read_text(encoding="utf-8"))
        best = summary.get("best") if isinstance(summary, dict) else None
    except (OSError, ValueError, RecursionError):
        best = None
    if kind == "best" and not have[BEST]:
        raise MobizoError(f"run {run} has no best/ adapter (it ran no periodic eval); use --adapter-kind last")
    if kind != "last" and have[BEST]:
        detail = ""
        if isinstance(best, dict) and {"step", "metric", "value"} <= set(best):
            detail = f": {best['metric']} {best['value']:.4g} at step {best['step']}"
        notes.append(
            f"adapter {run / BEST} (the best periodic eval{detail}; --adapter-kind last for the final adapter)"
        )
        return run / BEST
    if have[ADAPTER]:
        notes.append(f"adapter {run / ADAPTER} (the final adapter)")
        return run / ADAPTER
    if have[CHECKPOINT]:
        notes.append(f"adapter {run / CHECKPOINT} (the run's last checkpoint: it has no final adapter yet)")
        return run / CHECKPOINT
    raise MobizoError(f"run {run} has no adapter yet (no best/, adapter/ or checkpoint/)")


def resolve_source(adapter=None, run=None, kind: str | None = None) -> Source:
    """What ``--adapter PATH`` and ``--run RUN`` name (see the module docstring). An adapter path may be an
    adapter directory or a run directory; ``kind`` (best / last) chooses among a run's adapters."""
    if kind is not None and kind not in ADAPTER_KINDS:
        raise MobizoError(f"--adapter-kind must be one of {', '.join(ADAPTER_KINDS)}, got {kind!r}")
    run_path = None
    if run is not None:
        run_path = Path(run)
        if not run_path.exists():
            raise MobizoError(f"--run {run_path} does not exist")
        if not run_path.is_dir():
            raise MobizoError(f"--run {run_path} is a file, not a run directory")
        if not is_run_dir(run_path):
            raise MobizoError(
                f"--run {run_path} is not a mobizo run directory (no .mobizo marker, checkpoint or summary)"
            )
    adapter_path = None
    if adapter is not None:
        p = Path(adapter)
        if p.is_file():
            raise MobizoError(
                f"--adapter {p} is a file, not an adapter directory or a run directory (give the directory that "
                "holds adapter_config.json, or the run directory)"
            )
        from .fsio import resolve_dir

        if resolve_dir(p) is None:
            raise MobizoError(f"--adapter {p} does not exist")
        if is_run_dir(p) and run_path is None:
            run_path = p
        elif is_run_dir(p):
            raise MobizoError(f"--adapter {p} is a run directory; give it as --run or as --adapter, not both")
        else:
            from .checkpoint import CONFIG

            if not (resolve_dir(p) / CONFIG).is_file():
                raise MobizoError(
                    f"--adapter {p} is neither an adapter directory (no {CONFIG}) nor a mobizo run directory"
                )
            adapter_path = p
            if kind is not None:
                raise MobizoError("--adapter-kind chooses among a run directory's adapters; --adapter names one")
            if run_path is None and is_run_dir(p.parent):
                run_path = p.parent  # RUN/adapter, RUN/best, RUN/checkpoint: the run that wrote it
    notes: list[str] = []
    if run_path is not None and adapter_path is None:
        adapter_path = _run_adapter(run_path, kind, notes)
    elif kind is not None and run_path is None:
        raise MobizoError("--adapter-kind chooses among a run directory's adapters: give --run RUN")
    src = Source(adapter_path, run_path, saved_config(run_path) if run_path is not None else {}, notes=notes)
    if adapter_path is not None:
        from .checkpoint import read_adapter

        src.state = read_adapter(adapter_path)  # a bad adapter fails before any model loads
        base = src.state[1].get("base_model_name_or_path")
        src.base = base if isinstance(base, str) and base.strip() else None
    return src


def _relative_hint(path: str) -> str:
    return "" if Path(path).is_absolute() else f" (a relative path is read from the current directory, {Path.cwd()})"


def with_run_defaults(cfg: TrainConfig, given: set[str], src: Source, names, need_data: bool = False) -> TrainConfig:
    """``cfg`` with the fields in ``names`` that were not given taken from the run of ``src`` (or, for a bare
    adapter, the model from its ``base_model_name_or_path``); a model or data path taken from there that is
    not on this machine any more is one line naming it and the flag that fixes it."""
    from .models import TINY

    names = set(names)
    taken = {k: v for k, v in src.config.items() if k in RUN_FIELDS and k in names and k in FIELDS and k not in given}
    model_from = "run" if "model" in taken else None
    if src.run is None and src.adapter is not None and "model" in names and "model" not in given:
        if src.base is None:
            raise MobizoError(
                f"adapter {src.adapter} does not name its base model (adapter_config.json base_model_name_or_path); "
                "give it with --model PATH"
            )
        taken["model"], model_from = src.base, "adapter"
    cfg = cfg.replace(**taken)
    model = cfg.model
    if model_from is not None and model != TINY and not Path(model).exists():
        if model_from == "run":
            raise MobizoError(
                f"the run {src.run} was trained on model {model}, which is not there any more{_relative_hint(model)}; "
                "give its new path with --model PATH"
            )
        raise MobizoError(
            f"adapter {src.adapter} was trained on {model} (adapter_config.json base_model_name_or_path), which is "
            "not a model on this machine; give the base model with --model PATH"
        )
    if model_from == "adapter":
        src.notes.append(f"model {model} (the base model adapter_config.json names)")
    data = cfg.data.data
    if need_data and "data" in taken and data is not None and not Path(data).exists():
        raise MobizoError(
            f"the run {src.run} read its data from {data}, which is not there any more{_relative_hint(data)}; "
            "give its new path with --data PATH"
        )
    return cfg


def task_warning(src: Source, given: set[str]) -> None:
    """An adapter evaluated without --task and without a run to take the task from gets the built-in
    synthetic task: say so (its score says nothing about what the adapter was trained for)."""
    if src.adapter is not None and src.run is None and "task" not in given:
        src.notes.append(
            f"warning: --task not given and adapter {src.adapter} is not in a run directory: evaluating "
            "the built-in synthetic task (give --task, or the run directory the adapter came from)"
        )


# ---------------------------------------------------------------- adapters on models


def apply_adapter(model, tensors: dict, config: dict, where=None, model_name: str | None = None):
    """Inject MP-LoRA layers shaped like the adapter (unless the model has them) and load its tensors;
    a mismatch is one line that names the base the adapter was trained on."""
    from .mplora import inject, load_adapter_state, lora_layers

    base = config.get("base_model_name_or_path")
    name = model_name or str(getattr(getattr(model, "config", None), "name_or_path", "") or "this model")
    hint = f"; it was trained on {base}: give that with --model" if isinstance(base, str) and base else ""
    what = f"adapter {where}" if where is not None else "the adapter"
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors})
    if not lora_layers(model):
        present = {n for n, _ in model.named_modules()}
        missing = [m for m in modules if m not in present]
        if missing:
            raise MobizoError(
                f"{what} does not fit model {name}: it adapts {len(missing)} module(s) the model lacks "
                f"(e.g. {missing[0]}){hint}"
            )
        model.mplora_layers = inject(model, modules, int(config["r"]), float(config["lora_alpha"]), 0)
    try:
        load_adapter_state(model, tensors)
    except MobizoError as e:
        raise MobizoError(f"{what} does not fit model {name}: {e}{hint}") from e
    return model


# ---------------------------------------------------------------- generation


@dataclass
class Generator:
    """An engine that generates, its tokenizer and what it was loaded from."""

    engine: object
    tokenizer: object
    model: str
    adapter: Path | None = None
    positions_of: str = "the model"  # for check_room's message
    source: Source | None = None  # its notes are said once the input is checked (Source.announce)

    @property
    def positions(self) -> int | None:
        from .generation import max_positions

        return max_positions(self.engine)


def find_program(src: Source, program=None) -> Path:
    """The program ``--engine executorch`` generates with: ``--program``, else the run's ``program/``, else
    the program the run was given (its ``--program`` setting)."""
    from .rundir import PROGRAM_DIR

    if program is not None:
        p = Path(program)
    elif src.run is not None and (src.run / PROGRAM_DIR).is_dir():
        p = src.run / PROGRAM_DIR
    elif src.config.get("program"):
        p = Path(src.config["program"])
    elif src.run is not None:
        raise MobizoError(
            f"run {src.run} has no program/ (it trained with --engine eager): give --program DIR (from 'mobizo "
            "export') or use --engine eager"
        )
    else:
        raise MobizoError("--engine executorch generates with a program: give --program DIR or --run RUN")
    if not p.is_dir():
        raise MobizoError(f"program {p} does not exist or is not a directory")
    return p


def _program_tokenizer(program: Path, cfg: TrainConfig):
    """The tokenizer carried beside the program, else the model's (config and tokenizer only, no weights)."""
    from .engines.executorch.manifest import read_manifest
    from .models import load_fast_tokenizer, load_skeleton, prepare_tokenizer

    m = read_manifest(program)
    if m.tokenizer and (program / m.tokenizer / "tokenizer.json").is_file():
        return load_fast_tokenizer(program / m.tokenizer)
    return prepare_tokenizer(load_skeleton(cfg.model, cfg.trust_remote_code)[1])


def load_generator(
    cfg: TrainConfig, src: Source, engine: str = "eager", program=None, model=None, tokenizer=None
) -> Generator:
    """The engine that generates for ``cfg`` with ``src``'s adapter: ``eager`` (the model, quantized as the
    run was, with the adapter injected) or ``executorch`` (the program, with the adapter's B loaded)."""
    from .build import load_base, prepare_base
    from .progress import status

    if engine not in ("eager", "executorch"):
        raise MobizoError(f"--engine must be eager or executorch, got {engine!r}")
    cfg.validate()
    state = src.state
    if engine == "executorch":
        if model is not None:
            raise MobizoError("--engine executorch generates with a program, not a model object")
        from .engines.executorch import ExecuTorchEngine
        from .threads import apply_threads

        p = find_program(src, program)
        tokenizer = tokenizer or _program_tokenizer(p, cfg)
        if cfg.run.threads is not None:
            apply_threads(cfg.run.threads)
        with status(f"loading the ExecuTorch program {p}", cfg.run.progress):
            eng = ExecuTorchEngine(p, expected={})  # ({}: only the tool versions are checked)
        eng.check_generates()
        if state is not None:
            eng.load_adapter_state(state[0])
            return Generator(eng, tokenizer, cfg.model, src.adapter, "the program", src)
    from .engines.eager import EagerEngine
    from .threads import apply_threads

    apply_threads(cfg.run.threads, runtime=False)
    if (model is None) != (tokenizer is None):
        raise MobizoError("pass both model and tokenizer, or neither")
    name = cfg.model
    if model is None:
        model, tokenizer = load_base(cfg.model, cfg.trust_remote_code, cfg.run.progress)
    else:
        from .models import prepare_tokenizer

        prepare_tokenizer(tokenizer)
        name = str(getattr(getattr(model, "config", None), "name_or_path", "") or "the model")
    prepare_base(model, cfg, inject_adapter=False)  # quantized as the run's base was
    if state is not None:
        apply_adapter(model, *state, where=src.adapter, model_name=name)
    model.eval()
    return Generator(EagerEngine(model, estimator=None), tokenizer, name, src.adapter, source=src)


def prompt_token_ids(gen: Generator, prompts: list[str], chat: bool | None, max_new_tokens: int) -> list[list[int]]:
    """Every prompt's ids, each checked to leave room for ``max_new_tokens`` (all before any text is written;
    then the source's notes are said)."""
    from .generation import check_room, has_chat_template, prompt_ids

    if chat and not has_chat_template(gen.tokenizer):
        raise MobizoError(f"the tokenizer of {gen.model} has no chat template")
    out = []
    for i, p in enumerate(prompts):
        ids = prompt_ids(gen.tokenizer, p, chat)
        try:
            check_room(len(ids), max_new_tokens, gen.positions, gen.positions_of)
        except MobizoError as e:
            raise MobizoError(f"prompt {i + 1}: {e}" if len(prompts) > 1 else str(e)) from None
        out.append(ids)
    if gen.source is not None:
        gen.source.announce()
    return out


# ---------------------------------------------------------------- inputs


def read_inputs(path: str, what: str = "--input") -> tuple[str, list[tuple[int, object]]]:
    """(``"jsonl"`` or ``"text"``, [(line number, record or text)]) of ``path`` (``-``: stdin). JSONL when the
    name ends in .jsonl / .json or the first non-blank line is a JSON object; else one input per non-blank
    line. An empty input is an error."""
    name = "<stdin>" if path == "-" else str(path)
    if path == "-":
        text = sys.stdin.read()
    else:
        p = Path(path)
        if not p.exists():
            raise MobizoError(f"{what} {p} does not exist")
        if p.is_dir():
            raise MobizoError(f"{what} {p} is a directory, not a file")
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise MobizoError(f"{what} {p}: not valid UTF-8 text (byte offset {e.start})") from e
    lines = [(n, line.rstrip("\r")) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not lines:
        raise MobizoError(f"{what} {name}: no inputs (the file is empty)")
    suffix = Path(name).suffix.lower()
    jsonl = suffix in (".jsonl", ".json")
    if not jsonl and suffix != ".txt":
        try:
            jsonl = isinstance(json.loads(lines[0][1]), dict)
        except (ValueError, RecursionError):
            jsonl = False
    if not jsonl:
        return "text", lines
    records = []
    for n, line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise MobizoError(f"{name}:{n}: malformed JSON line: {e.msg}") from e
        except RecursionError as e:
            raise MobizoError(f"{name}:{n}: JSON line nested too deeply to read") from e
        if not isinstance(rec, dict):
            raise MobizoError(f"{name}:{n}: expected a JSON object, got {type(rec).__name__}")
        records.append((n, rec))
    return "jsonl", records


def read_prompts(path: str) -> list[str]:
    """The prompts of ``--input``: each JSONL record's ``prompt`` field, or each non-blank line."""
    kind, items = read_inputs(path)
    if kind == "text":
        return [text for _, text in items]
    name = "<stdin>" if path == "-" else str(path)
    prompts = []
    for n, rec in items:
        p = rec.get("prompt")
        if not isinstance(p, str) or not p:
            raise MobizoError(f'{name}:{n}: no "prompt" field (a non-empty string)')
        prompts.append(p)
    return prompts


# ---------------------------------------------------------------- predict


@dataclass
class Predictor:
    """A scoring engine, the task whose candidates it ranks, and how inputs become sequences."""

    engine: object
    tokenizer: object
    task: object
    encoder: object
    max_length: int
    truncation: str
    batch_size: int
    progress: bool = False
    source: Source | None = None


def load_predictor(cfg: TrainConfig, src: Source, model=None, tokenizer=None) -> Predictor:
    """The run's task (it must be classification or multiple choice) and the model with the adapter."""
    from .build import load_base, prepare_base, resolve_max_length
    from .data import Encoder
    from .engines.eager import EagerEngine
    from .models import check_max_length, prepare_tokenizer
    from .tasks import get_task
    from .threads import apply_threads

    cfg.validate()
    d = cfg.data
    task = get_task(d.task, data=d.data, inputs_only=True, template=d.template, label_words=d.label_words)
    if task.kind not in ("classification", "multiple_choice"):
        raise MobizoError(
            f"mobizo predict ranks the candidates of a classification or multiple-choice task; task {task.name} is "
            f"{task.kind} (use mobizo generate)"
        )
    state = src.state
    apply_threads(cfg.run.threads, runtime=False)
    if (model is None) != (tokenizer is None):
        raise MobizoError("pass both model and tokenizer, or neither")
    name = cfg.model
    if model is None:
        model, tokenizer = load_base(cfg.model, cfg.trust_remote_code, cfg.run.progress)
    else:
        prepare_tokenizer(tokenizer)
        name = str(getattr(getattr(model, "config", None), "name_or_path", "") or "the model")
    cfg = resolve_max_length(cfg, getattr(model, "config", None))
    d = cfg.data
    check_max_length(model, d.max_length)
    prepare_base(model, cfg, inject_adapter=False)
    if state is not None:
        apply_adapter(model, *state, where=src.adapter, model_name=name)
    model.eval()
    return Predictor(
        EagerEngine(model, estimator=None),
        tokenizer,
        task,
        Encoder(tokenizer),
        d.max_length,
        d.truncation,
        d.eval_batch_size,
        bool(cfg.run.progress),
        src,
    )


def input_examples(task, items: list[tuple[str, object]]) -> list:
    """Examples of new inputs: ``items`` are (where, value) with a value a record (dict of the task's fields),
    a text (put into the task's single field) or an :class:`mobizo.Example` (its prompt and candidates)."""
    from .tasks.base import Example

    fields = task.input_fields()
    out = []
    for where, value in items:
        if isinstance(value, Example):
            if not value.candidates:
                raise MobizoError(f"{where}: an Example to rank needs candidates")
            out.append(Example(prompt=value.prompt, candidates=list(value.candidates)))
            continue
        if isinstance(value, str):
            if len(fields) != 1:
                raise MobizoError(
                    f"task {task.name} reads the fields {', '.join(fields)}: give JSONL records with them, "
                    "not plain text lines"
                )
            value = {fields[0]: value}
        if not isinstance(value, dict):
            raise MobizoError(f"{where}: expected a record (dict), a text or an Example, got {type(value).__name__}")
        out.append(task.example(value, where))
    return out


def predict(pred: Predictor, examples: list) -> list[dict]:
    """Each example's chosen candidate and every candidate's probability: a softmax over the scores eval
    ranks by (:func:`mobizo.evaluation.choice_scores`), so the choice is eval's prediction."""
    import torch

    from .build import warn_truncated
    from .data import check_candidates
    from .evaluation import choice_scores

    check_candidates(pred.encoder, examples, "input")
    if pred.source is not None:
        pred.source.announce()
    warn_truncated(pred.encoder, examples, pred.max_length, pred.truncation, "input")
    scored = choice_scores(
        pred.engine,
        pred.task.kind,
        examples,
        pred.encoder,
        pred.tokenizer.pad_token_id,
        pred.max_length,
        pred.batch_size,
        pred.progress,
    )
    out = []
    for ex, (scores, _, _) in zip(examples, scored):
        pick = int(torch.argmax(scores))
        probs = torch.softmax(scores.double(), dim=0)
        out.append(
            {
                "label": ex.candidates[pick].strip(),
                "index": pick,
                "candidates": [c.strip() for c in ex.candidates],
                "probabilities": [float(p) for p in probs],
            }
        )
    return out


def format_prediction(p: dict, kind: str) -> str:
    """``good\\tbad=0.0712 good=0.9288``: the label, then each candidate's probability (by label word for
    classification, by 1-based number for multiple choice, whose candidates are sentences)."""
    keys = p["candidates"] if kind == "classification" else [str(i + 1) for i in range(len(p["candidates"]))]
    return p["label"] + "\t" + " ".join(f"{k}={v:.4f}" for k, v in zip(keys, p["probabilities"]))
