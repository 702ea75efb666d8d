"""Builders: the assembly of model + task + adapter + engine that train, eval, export, replay and bench share.

Like torchtune's builders: each function makes one thing from a validated :class:`TrainConfig`
(or from objects the caller already has) and nothing here runs a training loop or writes a run
directory. :func:`assemble` gives a :class:`Run` without an engine (what ``mobizo export`` needs);
:func:`build_engine` adds the engine that will run the step, reusing an exported program when one
fits (the run's ``program/`` or the program cache, :mod:`mobizo.program_cache`).
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .config import DataArgs, TrainConfig
from .data import Encoder, count_truncated
from .errors import MobizoError
from .progress import status
from .tasks.base import Example


@dataclass
class Run:
    """Everything a training run needs, validated."""

    cfg: TrainConfig
    model: object
    tokenizer: object
    task: object
    train: list
    validation: list
    encoder: Encoder
    targets: list[str]
    objective: str = "answer"
    choices: int = 0
    truncated: dict = field(default_factory=dict)  # split -> examples whose prompts are cut to fit
    answer_len: int = 0  # longest answer (any candidate) in tokens: the exported answer window K
    engine: object = None
    device: object = None  # the torch.device the model runs on (the eager engine's; the CPU otherwise)
    given_model: bool = False  # the caller passed the model object (no files name it)
    _base_hash: str | None = None

    def zo_config(self):
        return self.cfg.zo_config(self.objective, self.choices)

    def fan_in_fan_out(self) -> bool:
        """Whether the adapted layers are ``Conv1D`` (GPT-2): PEFT's flag, written into the adapter config."""
        from .engines.executorch.manifest import adapter_layout

        return adapter_layout(self.model)[1]

    def base_hash(self) -> str:
        """The base model's identity (:func:`mobizo.models.base_hash`), computed once."""
        if self._base_hash is None:
            from .models import base_hash

            self._base_hash = base_hash(self.cfg.model, self.model, self.given_model)
        return self._base_hash


def load_base(
    name: str,
    trust_remote_code: bool = False,
    progress: bool = True,
    weights: bool = True,
    dtype: str = "float32",
    before_weights=None,
):
    """(model, tokenizer) of ``name`` (``tiny``, a local directory or a GGUF file) in ``dtype``, with a status
    line. ``weights=False``: config and tokenizer only (:func:`mobizo.models.load_skeleton`).
    ``before_weights``: see :func:`mobizo.models.load_model`."""
    from .devices import torch_dtype
    from .models import load_model, load_skeleton
    from .util import no_transformers_bars

    if not weights:
        with status(f"loading the config and tokenizer of {name}", progress), no_transformers_bars():
            return load_skeleton(name, trust_remote_code=trust_remote_code)
    with (
        status(f"loading model {name}" + ("" if dtype == "float32" else f" in {dtype}"), progress),
        no_transformers_bars(),
    ):
        return load_model(name, torch_dtype(dtype), trust_remote_code=trust_remote_code, before_weights=before_weights)


def cast_base(model, dtype: str) -> None:
    """Cast a loaded (or given) base to ``--dtype``, before the adapter is injected (A and B are made
    float32 beside a bf16/fp16 base: :func:`mobizo.mplora.adapter_dtype`). A no-op when it has that dtype."""
    import torch

    from .devices import torch_dtype
    from .models import is_skeleton

    if not isinstance(model, torch.nn.Module) or is_skeleton(model):
        return
    want = torch_dtype(dtype)
    floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if floats and floats != {want}:
        model.to(want)


def run_device(cfg: TrainConfig):
    """The device a run's model lives on: ``--device`` (checked) for the eager engine, the CPU for ExecuTorch."""
    import torch

    return cfg.check_device() if cfg.engine.engine == "eager" else torch.device("cpu")


def program_base(cfg: TrainConfig):
    """(:class:`~mobizo.engines.executorch.ProgramBase`, tokenizer) of the program a run is given
    (``--program``) when the program carries its tokenizer, else None (then the model's config and
    tokenizer are loaded). What the run needs of the model comes from the program's manifest, and
    the tokenizer is loaded as the fast tokenizer it was saved as: the run imports no model code
    and no transformers config, so neither ``torch._dynamo`` (see ProgramBase). The program is
    still checked against the run (base weights' sha256, adapter request, shapes) before it runs."""
    from .models import TINY

    if not cfg.engine.program or cfg.model == TINY:
        return None
    from .engines.executorch.manifest import ProgramBase, read_manifest

    try:
        m = read_manifest(Path(cfg.engine.program))
    except MobizoError:
        return None  # the engine says what is wrong with it
    tokenizer_dir = Path(cfg.engine.program) / m.tokenizer
    if not m.tokenizer or not (tokenizer_dir / "tokenizer.json").is_file():
        return None
    from .models import load_fast_tokenizer

    with status(f"loading the tokenizer of {cfg.engine.program}", cfg.run.progress):
        return ProgramBase.of(m), load_fast_tokenizer(tokenizer_dir)


def needs_weights(cfg: TrainConfig) -> bool:
    """Whether a run must hold the base weights in this process: not when an ExecuTorch program runs
    the step (the program holds them; they are loaded only if the program must be exported)."""
    return cfg.engine.engine != "executorch"


def load_task(cfg: TrainConfig):
    from .tasks import get_task

    d = cfg.data
    return get_task(d.task, data=d.data, template=d.template, label_words=d.label_words)


def as_examples(items, what: str) -> list[Example]:
    """``Example`` objects, or dicts with Example's fields (``prompt`` plus ``candidates``/``label`` or ``target``)."""
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Example):
            out.append(item)
        elif isinstance(item, dict):
            try:
                out.append(Example(**item))
            except TypeError as e:
                raise MobizoError(f"{what}[{i}]: not an Example ({e})") from e
        else:
            raise MobizoError(f"{what}[{i}]: expected an Example or a dict, got {type(item).__name__}")
    if not out:
        raise MobizoError(f"{what}: no examples")
    return out


def resolve_objective(requested: str, kind: str, examples) -> tuple[str, int]:
    """(step objective, candidates per example). ``auto`` trains classification and multiple-choice
    tasks on the candidates (MeZO's train-as-classification) and everything else on the answer."""
    has_choices = kind in ("classification", "multiple_choice")
    if requested == "answer" or (requested == "auto" and not has_choices):
        return "answer", 0
    if not has_choices:
        raise MobizoError(f"--objective choice needs a classification or multiple-choice task, not {kind}")
    choices = max(len(e.candidates) for e in examples)
    return ("choice-sum" if kind == "classification" else "choice-mean"), choices


def warn_truncated(encoder: Encoder, examples, max_length: int, truncation: str, what: str) -> int:
    """:func:`mobizo.data.count_truncated` plus a warning on stderr with the count; returns the count."""
    n = count_truncated(encoder, examples, max_length, truncation, what)
    if n:
        print(
            f"mobizo: warning: {n} of {len(examples)} {what} examples exceed --max-length {max_length}; "
            "their prompts are truncated from the left",
            file=sys.stderr,
        )
    return n


def resolve_max_length(cfg: TrainConfig, config) -> TrainConfig:
    """``--max-length`` not given: :data:`~mobizo.config.DEFAULT_MAX_LENGTH`, or the model's positions when
    it has fewer (a given one beyond them stays an error: :func:`mobizo.models.check_max_length`)."""
    from .config import DEFAULT_MAX_LENGTH
    from .models import max_positions

    if cfg.data.max_length is not None:
        return cfg
    limit = max_positions(config)
    return cfg.replace(max_length=min(DEFAULT_MAX_LENGTH, limit) if limit else DEFAULT_MAX_LENGTH)


def check_memory_before(cfg: TrainConfig, config, weight_bytes: int, task, train, validation, encoder) -> None:
    """Refuse a run whose weights (``weight_bytes`` still to load) plus the peak of its training step or of an
    eval batch cannot fit the memory available (:mod:`mobizo.resources`), before any work. Sequences are as
    long as the longest example (up to ``--max-length``; an exported program is planned for
    ``--max-length`` itself) and the answer window as the longest answer."""
    from .models import check_max_length
    from .resources import Dims, check_memory, forward_bytes, step_rows

    d, o = cfg.data, cfg.optim
    check_max_length(config, d.max_length)
    dims = Dims.of(config) if config is not None else None
    if dims is None:  # a program's base (the program was checked when it was exported), or an odd config
        return
    exported = cfg.engine.engine == "executorch"
    objective, choices = resolve_objective(o.objective, task.kind, train or validation)
    need, what, why = 0, "", ""
    for split, exs in (("train", train), ("validation", validation)):
        if not exs:
            continue
        encs = [encoder(ex.prompt, c) for ex in exs for c in (ex.candidates or [ex.answer])]
        answer = max(len(e.answer_ids) for e in encs)
        tokens = (
            d.max_length if exported else min(d.max_length, max(len(e.prompt_ids) + len(e.answer_ids) for e in encs))
        )
        shared = objective != "answer" and answer == 1  # one row per example, only the candidates' logits
        per_example = 1 if shared or objective == "answer" else choices
        if split == "train":
            rows = step_rows(o.estimator, o.queries, o.batch_size, o.data_mode, per_example)
            b = forward_bytes(dims, rows, tokens, 0 if shared else answer, backward=o.estimator == "fo")
            text = f"a training step ({rows} rows x {tokens} tokens: --batch-size {o.batch_size}"
            text += f", {o.estimator} q={o.queries})" if o.estimator != "fo" else ")"
            hint = "lower --batch-size, --queries or --max-length"
        else:
            rows = d.eval_batch_size * per_example
            b = forward_bytes(dims, rows, tokens, 1 if shared else answer)
            text = f"an eval batch ({rows} rows x {tokens} tokens: --eval-batch-size {d.eval_batch_size})"
            hint = "lower --eval-batch-size or --max-length"
        if b > need:
            need, what, why = b, text, hint
    name = getattr(config, "name_or_path", "") or cfg.model
    loading = f"the weights of {name} and " if weight_bytes else ""
    check_memory(weight_bytes + need, f"{loading}{what}", why)


def warn_futile_settings(cfg: TrainConfig, model) -> None:
    """One warning line each for settings that cannot do what they ask, though the run still means
    something: a warmup that outlasts the run (the lr never reaches --lr), a rank above an adapted
    layer's width (its update has rank min(in, out) at most: the rest adds cost, not capacity)."""
    o = cfg.optim
    if o.warmup_steps > o.steps:
        print(
            f"mobizo: warning: --warmup-steps {o.warmup_steps} outlasts --steps {o.steps}: the lr ramps only to "
            f"{o.steps}/{o.warmup_steps} of --lr {o.lr:g} and never reaches it",
            file=sys.stderr,
        )
    from .mplora import lora_layers

    layers = lora_layers(model) if hasattr(model, "named_modules") else []  # (a program's base: checked at export)
    if layers:
        name, narrow = min(layers, key=lambda t: min(t[1].in_features, t[1].out_features))
        width = min(narrow.in_features, narrow.out_features)
        if cfg.adapter.rank > width:
            print(
                f"mobizo: warning: --rank {cfg.adapter.rank} exceeds the width of {name} ({narrow.in_features} -> "
                f"{narrow.out_features}): its update has rank {width} at most; the rank beyond that adds cost, not "
                f"capacity (use --rank {width} or less)",
                file=sys.stderr,
            )


def assemble(
    cfg: TrainConfig,
    model=None,
    tokenizer=None,
    train=None,
    validation=None,
    need_train: bool = True,
    inject_adapter: bool = True,
    weights: bool = True,
) -> Run:
    """Validate ``cfg``, load (or take) the task's examples and the model, inject the adapter.

    ``model``/``tokenizer`` (a Hugging Face model object and its tokenizer) replace loading
    ``cfg.model``; ``train``/``validation`` (Examples or dicts) replace the task's files.
    ``inject_adapter=False``: leave the model as it is (eval of a saved adapter injects its own).
    ``weights=False``: load ``cfg.model``'s architecture without its weights (see :func:`needs_weights`).
    """
    from .resources import cap_threads, warn_batch
    from .threads import apply_threads

    cfg = cfg.validate().resolved()
    cfg = cfg.replace(threads=cap_threads(cfg.run.threads))
    apply_threads(cfg.run.threads, runtime=False)
    d = cfg.data
    if train is not None:
        train = as_examples(train, "train_examples")
    if validation is not None:
        validation = as_examples(validation, "eval_examples")
    if d.data is None and (train is not None or validation is not None) and d.task == DataArgs().task:
        from .tasks.base import ExamplesTask

        task = ExamplesTask((train or []) + (validation or []))  # examples passed as objects: no task files
    else:
        task = load_task(cfg)
    if train is None:
        train = task.load("train", d.train_examples, cfg.seed) if need_train else []
    if validation is None:
        validation = task.load("validation", d.eval_examples, cfg.seed)
    if (model is None) != (tokenizer is None):
        raise MobizoError("pass both model and tokenizer, or neither (then config.model is loaded)")
    given = model is not None
    # What needs only the model's config and tokenizer runs before the weights are loaded (a refused run
    # never waits for them): the sequence length, the examples' encodings and the step's memory.
    ready: dict = {}

    def before_weights(config, weight_bytes: int, tok) -> None:
        nonlocal cfg, train, validation
        cfg = resolve_max_length(cfg, config)
        train, validation = task.finalize(train, tok), task.finalize(validation, tok)
        ready["encoder"] = Encoder(tok)
        check_memory_before(cfg, config, weight_bytes, task, train, validation, ready["encoder"])
        if train:  # (after the memory check: a refused run gets its one line only)
            warn_batch(cfg.optim.batch_size, len(train))

    device = run_device(cfg)
    if model is None:
        model, tokenizer = (None if weights else program_base(cfg)) or load_base(
            cfg.model, cfg.trust_remote_code, cfg.run.progress, weights, cfg.engine.dtype, before_weights
        )
    else:
        from .models import prepare_tokenizer

        prepare_tokenizer(tokenizer)  # the same pad token and left padding load_model gives
        cast_base(model, cfg.engine.dtype)
    if not ready:  # a model object, a weightless architecture or a program's base: nothing left to load
        before_weights(getattr(model, "config", None), 0, tokenizer)
    d = cfg.data
    if task.kind == "generation" and d.max_new_tokens >= d.max_length:
        raise MobizoError(
            f"--max-new-tokens {d.max_new_tokens} leaves no room for a prompt in --max-length {d.max_length}"
        )
    from .data import check_candidates
    from .models import check_max_length

    check_max_length(model, d.max_length)
    from .models import TINY, base_hash

    # a base identified by its tensors (tiny, a model object) is hashed before quantizing: the hash names the float model
    hashed = (
        base_hash(cfg.model, model, given) if (given or cfg.model == TINY) and cfg.quant.quantize != "none" else None
    )
    targets = prepare_base(model, cfg, inject_adapter)
    warn_futile_settings(cfg, model)
    if device.type != "cpu":  # (the adapter too; its noise and updates are made on the CPU: mobizo.step)
        with status(f"moving the model to {device}", cfg.run.progress):
            model.to(device)
    encoder = ready["encoder"]
    for what, exs in (("train", train), ("validation", validation)):
        check_candidates(encoder, exs, what)
    truncated = {
        what: warn_truncated(encoder, exs, d.max_length, d.truncation, what)
        for what, exs in (("train", train), ("validation", validation))
        if exs
    }
    objective, choices = resolve_objective(cfg.optim.objective, task.kind, train or validation)
    answer_len = max(
        len(encoder(ex.prompt, c).answer_ids) for ex in train + validation for c in (ex.candidates or [ex.answer])
    )
    return Run(
        cfg,
        model,
        tokenizer,
        task,
        train,
        validation,
        encoder,
        targets,
        objective,
        choices,
        truncated,
        answer_len,
        device=device,
        given_model=given,
        _base_hash=hashed,
    )


def prepare_base(model, cfg: TrainConfig, inject_adapter: bool = True) -> list[str]:
    """Quantize the frozen base (``--quantize``; a weightless architecture is only checked) and inject the
    adapter around it, whose A/B stay float. Returns the adapted module names."""
    from .engines.executorch.manifest import ProgramBase
    from .models import is_skeleton
    from .mplora import inject

    if isinstance(model, ProgramBase):  # the program was built with the run's quantization and adapter (checked)
        return list(model.adapter_shapes)
    q = cfg.quant
    if q.quantize != "none":
        from .quantize import check_quantize, quantize_base

        if is_skeleton(model):
            check_quantize(model, q.quantize, q.group_size, q.quantize_embeddings)
        else:
            with status(f"quantizing the base ({q.quantize})", cfg.run.progress):
                quantize_base(model, q.quantize, q.group_size, q.quantize_embeddings)
    a = cfg.adapter
    return inject(model, a.target_modules, a.rank, a.alpha, cfg.seed) if inject_adapter else []


def program_eval_rows(cfg: TrainConfig) -> int:
    """Rows of an exported program's ``score``: at most the step's examples per batch. Each method of a
    program holds its own memory-planned arena for as long as the program is loaded (the Python runtime
    cannot share one between methods), so a ``score`` for ``--eval-batch-size`` rows of ``--max-length``
    tokens (32 x 256 by default) would hold more activation memory than the training step itself; sized
    like one copy of the step's batch it holds 1/2q of the step's, and eval is chunked to it."""
    return min(cfg.data.eval_batch_size, cfg.optim.batch_size)


def manifest_for_run(run: Run):
    """The manifest a program for ``run`` must have (what the program is checked against)."""
    from .engines.executorch import manifest_for
    from .quantize import quantization_for, quantization_of

    cfg, q = run.cfg, run.cfg.quant
    # what the model got (a model object may come quantized), else what the flags give (a weightless run)
    quant = (
        quantization_of(run.model)
        if getattr(run.model, "mobizo_quantization", None)
        else quantization_for(q.quantize, q.group_size, q.quantize_embeddings)
    )
    return manifest_for(
        run.model,
        cfg.model,
        run.zo_config(),
        cfg.optim.batch_size,
        cfg.data.max_length,
        run.answer_len,
        program_eval_rows(cfg),
        cfg.adapter.rank,
        cfg.adapter.alpha,
        run.base_hash(),
        quantization=quant,
        target_spec=cfg.adapter.target_modules,
        fixed_length=cfg.engine.fixed_length,
    )


def export_program(run: Run, out_dir: Path, xnnpack: bool = True):
    """Export ``run``'s step into ``out_dir`` (atomically), with a status line per stage. A run built
    without the weights (:func:`needs_weights`) loads them for the export and lets them go after."""
    from .engines.executorch import export_program as export
    from .models import is_skeleton
    from .quantize import check_scheme
    from .rundir import write_marker

    q = run.cfg.quant
    check_scheme(q.quantize, q.group_size, q.quantize_embeddings, executorch=True)  # before tracing
    manifest = manifest_for_run(run)
    model = run.model
    if is_skeleton(model):
        model, _ = load_base(run.cfg.model, run.cfg.trust_remote_code, run.cfg.run.progress)
        prepare_base(model, run.cfg)
    from .threads import default_threads

    workers = run.cfg.run.threads or default_threads()  # the export's parallel lowering uses the cores too
    export(
        model,
        manifest,
        Path(out_dir),
        xnnpack=xnnpack,
        progress=run.cfg.run.progress,
        workers=workers,
        extra=lambda d: carry_tokenizer(run, manifest, d),
    )
    del model  # the skeleton's run never keeps the weights
    write_marker(out_dir, "program")
    return manifest


def carry_tokenizer(run: Run, manifest, directory: Path) -> None:
    """Save the run's tokenizer beside the program (``manifest.tokenizer``) when it round-trips through
    the fast tokenizer on the run's own texts (:func:`mobizo.models.save_run_tokenizer`)."""
    from .engines.executorch.manifest import TOKENIZER
    from .models import save_run_tokenizer

    texts = [t for ex in (run.train + run.validation)[:64] for t in (ex.prompt, *(ex.candidates or [ex.answer])) if t]
    if save_run_tokenizer(run.tokenizer, Path(directory) / TOKENIZER, texts):
        manifest.tokenizer = TOKENIZER


def build_engine(run: Run, program_dir: Path | None = None):
    """The engine that runs ``run``'s step.

    ``--engine executorch``: the program in ``cfg.engine.program`` (checked against this run's identity),
    else ``program_dir`` (the run directory's ``program/``), reused when it matches and not
    ``--reexport``, exported otherwise.
    """
    cfg = run.cfg
    if cfg.engine.engine == "executorch":
        from .engines.executorch import ExecuTorchEngine, identity
        from .program_cache import keep_program, program_matches, restore_program

        manifest = manifest_for_run(run)
        expected = identity(manifest)
        # a program found (and hashed) or written just now need not be hashed again by the engine
        verified = not cfg.engine.program
        if cfg.engine.program:
            target = Path(cfg.engine.program)
        else:
            target = program_dir or Path(tempfile.mkdtemp(prefix="mobizo-program-"))
            fixed = cfg.engine.fixed_length
            reuse = not cfg.engine.reexport and (
                program_matches(target, expected) or restore_program(target, expected, fixed)
            )
            if not reuse:
                export_program(run, target)
                keep_program(target, expected, fixed)
        from .rundir import read_marker

        bundle = (read_marker(target) or {}).get("kind") == "bundle"  # rows padded as the native trainer pads them
        if cfg.run.threads is not None:  # resize the runtime's thread pool (XNNPACK) only when asked, and
            from .threads import apply_threads  # before loading: loaded delegates keep the pool they saw

            apply_threads(cfg.run.threads)
        with status("loading the ExecuTorch program", cfg.run.progress):
            engine = ExecuTorchEngine(target, expected, verified=verified, fixed_length=bundle)
    else:
        from .engines.eager import EagerEngine

        o = cfg.optim
        zo = run.zo_config() if o.estimator != "fo" else None
        engine = EagerEngine(
            run.model,
            o.estimator,
            zo,
            o.optimizer or "sgd",
            o.train_a,
            o.weight_decay,
            objective=run.objective,
            choices=run.choices,
        )
    if run.task.kind == "generation" and not (hasattr(engine, "decoder") or hasattr(engine, "next_token_logits")):
        raise MobizoError(
            f"task {run.task.name} evaluates by generating text, which the {engine.name} engine "
            "cannot do; use --engine eager"
        )
    run.engine = engine
    return engine


def build_run(cfg: TrainConfig, program_dir: Path | None = None, **objects) -> Run:
    """:func:`assemble` + :func:`build_engine`."""
    run = assemble(cfg, **objects)
    build_engine(run, program_dir)
    return run


def export(cfg: TrainConfig, out_dir: str | Path, xnnpack: bool = True):
    """``mobizo export``: the program for ``cfg``'s model, task shapes and step (no engine is built)."""
    if cfg.optim.estimator == "fo":
        raise MobizoError("mobizo export builds the zeroth-order step; the fo baseline is exported by the benchmarks")
    from .devices import check_cpu_float32

    check_cpu_float32(cfg.engine.device, cfg.engine.dtype, "mobizo export")
    from .quantize import check_scheme

    q = cfg.quant
    check_scheme(q.quantize, q.group_size, q.quantize_embeddings, executorch=True)  # before loading anything
    return export_program(assemble(cfg.replace(device="cpu")), Path(out_dir), xnnpack=xnnpack)
