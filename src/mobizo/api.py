"""The public Python API (re-exported by :mod:`mobizo`): train, evaluate, save and load adapters, and use
them: generate / stream text, predict labels.

:func:`train` and :func:`evaluate` are exactly what ``mobizo train`` / ``mobizo eval`` run
(same validation, run directory, resume semantics and errors); they also take objects
(a Hugging Face model and tokenizer, lists of examples) instead of paths.

:func:`run_training` is where a run becomes single-process (:func:`mobizo.trainer.train`) or one
rank of a distributed run (:func:`mobizo.distributed.train`, when torchrun started several
processes); :func:`train`, ``mobizo train`` and ``mobizo demo`` all go through it, so the trainer
below it never needs to know about distributed training.
"""

from __future__ import annotations

from pathlib import Path

from .config import TrainConfig
from .errors import MobizoError


def train(
    config: TrainConfig | None = None, model=None, tokenizer=None, train_examples=None, eval_examples=None, **fields
) -> dict:
    """Fine-tune an MP-LoRA adapter; returns the run's summary (also in ``OUT/summary.json``).

    ``config``: a :class:`TrainConfig` (``fields`` by flat name override it, e.g. ``lr=4.0``).
    ``model``/``tokenizer``: a Hugging Face causal LM and its tokenizer instead of loading
    ``config.model``; ``train_examples``/``eval_examples``: lists of :class:`mobizo.Example` (or dicts
    with its fields) instead of the task's files. With ``resume=True`` the fields you did not change
    from their defaults take the saved run's values, as the CLI's flags not given do.
    """
    from .util import quiet_imports

    quiet_imports()  # before the model stack is imported (torchao's kernel-loading warnings)
    cfg = (config or TrainConfig()).replace(**fields)
    if model is not None and cfg.model == TrainConfig().model:
        cfg = cfg.replace(model=str(getattr(getattr(model, "config", None), "name_or_path", "") or "custom"))
    return run_training(cfg, model=model, tokenizer=tokenizer, train=train_examples, validation=eval_examples)


def run_training(cfg: TrainConfig, given: set[str] | None = None, on_step=None, **objects) -> dict:
    """Train per ``cfg``: in this process (:func:`mobizo.trainer.train`), or as one rank of a run of
    ``WORLD_SIZE > 1`` processes started by torchrun (:func:`mobizo.distributed.train`; docs/scaling-out.md).
    The arguments are :func:`mobizo.trainer.train`'s; returns the run's summary."""
    from . import distributed

    if distributed.world_size() > 1:
        return distributed.train(cfg, given, on_step, **objects)
    from . import trainer

    return trainer.train(cfg, given, on_step, **objects)


def evaluate(
    config: TrainConfig | None = None,
    adapter: str | Path | None = None,
    model=None,
    tokenizer=None,
    examples=None,
    run: str | Path | None = None,
    adapter_kind: str | None = None,
    given: set[str] | None = None,
    **fields,
) -> dict:
    """Metrics of the model (with ``adapter``, if given) on the task's validation split (or ``examples``):
    ``accuracy``/``f1``/``loss``..., plus ``n``, ``task``, ``metric``.

    ``adapter``: a PEFT adapter directory or a run directory; ``run``: a run directory. A run names
    everything: the fields not set (``given``: the names set; by default those in ``fields`` and those of
    ``config`` that differ from the defaults) take the run's saved values (model, task, data, template,
    label words, max length, quantization, eval sizes), and its adapter is ``best/`` when it has one, else
    ``adapter/`` (``adapter_kind``: ``best`` or ``last``). A bare adapter without ``model`` uses the base
    its ``adapter_config.json`` names."""
    from .build import assemble
    from .config import DATA_FLAGS, MODEL_FLAGS, non_default
    from .engines.eager import EagerEngine
    from .evaluation import evaluate as run_eval
    from .evaluation import main_metric
    from .inference import apply_adapter, resolve_source, task_warning, with_run_defaults
    from .util import quiet_imports

    quiet_imports()  # before the model stack is imported (torchao's kernel-loading warnings)
    cfg = (config or TrainConfig()).replace(**fields)
    given = set(given) if given is not None else non_default(cfg) | set(fields)
    if model is not None:
        given.add("model")
    src = resolve_source(adapter, run, adapter_kind)  # a bad adapter fails before the model loads
    names = (*MODEL_FLAGS, "seed", *DATA_FLAGS)
    cfg = with_run_defaults(cfg, given, src, names, need_data=examples is None)
    if examples is None:
        task_warning(src, given)
    run_ = assemble(cfg, model=model, tokenizer=tokenizer, validation=examples, need_train=False, inject_adapter=False)
    if src.state is not None:
        apply_adapter(run_.model, *src.state, where=src.adapter, model_name=cfg.model)
    src.announce()
    engine = EagerEngine(run_.model, estimator=None)  # scoring only
    d = run_.cfg.data  # (--max-length resolved against the model)
    metrics = run_eval(
        engine,
        run_.task.kind,
        run_.validation,
        run_.encoder,
        run_.tokenizer.pad_token_id,
        d.max_length,
        d.eval_batch_size,
        d.max_new_tokens,
        progress=cfg.run.progress,
    )
    return {
        "task": run_.task.name,
        "kind": run_.task.kind,
        "metric": main_metric(run_.task.kind),
        "model": cfg.model,
        "adapter": None if src.adapter is None else str(src.adapter),
        "run": None if src.run is None else str(src.run),
        **metrics,
    }


# ---------------------------------------------------------------- using a trained adapter

GENERATE_FIELDS = ("model", "trust_remote_code", "quantize", "group_size", "quantize_embeddings")


def _source(run, adapter, adapter_kind, model, fields: dict, names):
    """(config, Source) for generate / stream / predict: ``fields`` by flat name, the run's values for the rest."""
    from .inference import resolve_source, with_run_defaults

    if isinstance(model, (str, Path)):
        fields = {**fields, "model": str(model)}
    cfg = TrainConfig().replace(**fields)
    given = set(fields) | ({"model"} if model is not None else set())
    src = resolve_source(adapter, run, adapter_kind)
    return with_run_defaults(cfg, given, src, names), src


def _generator(run, adapter, adapter_kind, model, tokenizer, engine, program, fields):
    from .inference import load_generator

    cfg, src = _source(run, adapter, adapter_kind, model, fields, GENERATE_FIELDS)
    obj = None if isinstance(model, (str, Path)) else model
    if obj is None and tokenizer is not None:
        raise MobizoError("a tokenizer object goes with a model object (model=...)")
    return load_generator(cfg, src, engine=engine, program=program, model=obj, tokenizer=tokenizer)


def _sampling(max_new_tokens, temperature, top_p, seed, stop):
    from .generation import SamplingConfig

    stops = [stop] if isinstance(stop, str) else list(stop or [])
    return SamplingConfig(max_new_tokens, float(temperature), float(top_p), int(seed), stops).check()


def generate(
    prompt: str | list[str],
    run: str | Path | None = None,
    *,
    adapter: str | Path | None = None,
    adapter_kind: str | None = None,
    model=None,
    tokenizer=None,
    engine: str = "eager",
    program: str | Path | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: str | list[str] | None = None,
    chat: bool | None = None,
    **fields,
) -> str | list[str]:
    """The text the fine-tuned model continues ``prompt`` with (a list of texts for a list of prompts), as
    ``mobizo generate`` writes it.

    ``run``: a run directory (model, quantization and adapter from it), or ``adapter`` (an adapter or run
    directory) and/or ``model`` (a model directory, or a Hugging Face model object with its ``tokenizer``;
    an object is changed in place: the adapter is injected into it). ``engine="executorch"``: generate with
    the run's program (or ``program``). Greedy unless ``temperature > 0`` (then seeded nucleus sampling,
    ``top_p``); stops at EOS, ``max_new_tokens`` or a ``stop`` string; a chat model's template is applied
    unless ``chat=False``. ``fields``: config fields by flat name (``quantize``, ``threads``, ``progress``)."""
    from .generation import stream as decode
    from .inference import prompt_token_ids

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise MobizoError("generate needs a non-empty prompt string, or a list of them")
    sampling = _sampling(max_new_tokens, temperature, top_p, seed, stop)
    gen = _generator(run, adapter, adapter_kind, model, tokenizer, engine, program, fields)
    ids = prompt_token_ids(gen, prompts, chat, sampling.max_new_tokens)
    texts = ["".join(decode(gen.engine, gen.tokenizer, i, sampling)) for i in ids]
    return texts[0] if isinstance(prompt, str) else texts


def stream(
    prompt: str,
    run: str | Path | None = None,
    *,
    adapter: str | Path | None = None,
    adapter_kind: str | None = None,
    model=None,
    tokenizer=None,
    engine: str = "eager",
    program: str | Path | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: str | list[str] | None = None,
    chat: bool | None = None,
    **fields,
):
    """:func:`generate` for one prompt, yielding the text piece by piece as it is decoded (the model loads
    on the first ``next``)."""
    from .generation import stream as decode
    from .inference import prompt_token_ids

    if not isinstance(prompt, str) or not prompt:
        raise MobizoError("stream needs a non-empty prompt string")
    sampling = _sampling(max_new_tokens, temperature, top_p, seed, stop)
    gen = _generator(run, adapter, adapter_kind, model, tokenizer, engine, program, fields)
    (ids,) = prompt_token_ids(gen, [prompt], chat, sampling.max_new_tokens)
    yield from decode(gen.engine, gen.tokenizer, ids, sampling)


PREDICT_FIELDS = (
    *GENERATE_FIELDS,
    "task",
    "data",
    "template",
    "label_words",
    "max_length",
    "truncation",
    "eval_batch_size",
)


def predict(
    inputs,
    run: str | Path | None = None,
    *,
    adapter: str | Path | None = None,
    adapter_kind: str | None = None,
    model=None,
    tokenizer=None,
    **fields,
) -> dict | list[dict]:
    """The label a classification or multiple-choice run gives new inputs, with every candidate's probability:
    ``{"label", "index", "candidates", "probabilities"}`` (a list of them for a list of inputs), exactly as
    ``mobizo predict`` (and eval's ranking: the probabilities are a softmax over eval's scores).

    ``inputs``: a text (put into the task's single field), a record (dict of the template's fields), an
    :class:`mobizo.Example` (its prompt and candidates), or a list of them. ``run`` / ``adapter`` /
    ``model`` / ``tokenizer`` as in :func:`generate`; without a run, give the task by its fields
    (``task``, ``template``, ``label_words``)."""
    from .inference import input_examples, load_predictor
    from .inference import predict as rank

    single = not isinstance(inputs, (list, tuple))
    items = [inputs] if single else list(inputs)
    if not items:
        raise MobizoError("predict needs at least one input")
    cfg, src = _source(run, adapter, adapter_kind, model, fields, PREDICT_FIELDS)
    obj = None if isinstance(model, (str, Path)) else model
    pred = load_predictor(cfg, src, model=obj, tokenizer=tokenizer)
    out = rank(pred, input_examples(pred.task, [(f"input {i + 1}", x) for i, x in enumerate(items)]))
    return out[0] if single else out


def save_adapter(model, path: str | Path) -> None:
    """Write the MP-LoRA adapter of ``model`` to ``path`` in PEFT format (atomically)."""
    from .checkpoint import save_adapter as save
    from .mplora import adapter_state, fan_in_fan_out, lora_layers

    layers = lora_layers(model)
    if not layers:
        raise MobizoError("the model has no MP-LoRA layers (use mobizo.get_mplora_model first)")
    ranks = {(layer.rank, layer.alpha) for _, layer in layers}
    if len(ranks) != 1:
        raise MobizoError("the model's MP-LoRA layers differ in rank or alpha; PEFT's format needs one")
    ((rank, alpha),) = ranks
    name = str(getattr(getattr(model, "config", None), "name_or_path", "") or "")
    save(Path(path), adapter_state(model), rank, alpha, name, fan_in_fan_out(model))


def load_adapter(model, path: str | Path):
    """Load a PEFT LoRA adapter directory into ``model`` (injecting MP-LoRA layers first if it has none).
    Returns the model."""
    from .checkpoint import read_adapter

    return _apply_adapter(model, *read_adapter(path))


def _apply_adapter(model, tensors: dict, config: dict):
    """Inject MP-LoRA layers shaped like the adapter (unless the model has them) and load its tensors."""
    from .inference import apply_adapter

    return apply_adapter(model, tensors, config)
