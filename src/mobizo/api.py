"""The public Python API (re-exported by :mod:`mobizo`): train, evaluate, save and load adapters.

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
    **fields,
) -> dict:
    """Metrics of the model (with ``adapter``, a PEFT adapter directory, if given) on the task's validation
    split (or ``examples``): ``accuracy``/``f1``/``loss``..., plus ``n``, ``task``, ``metric``."""
    from .build import assemble
    from .checkpoint import read_adapter
    from .engines.eager import EagerEngine
    from .evaluation import evaluate as run_eval
    from .evaluation import main_metric
    from .util import quiet_imports

    quiet_imports()  # before the model stack is imported (torchao's kernel-loading warnings)
    cfg = (config or TrainConfig()).replace(**fields)
    state = read_adapter(adapter) if adapter is not None else None  # a bad adapter fails before the model loads
    run = assemble(cfg, model=model, tokenizer=tokenizer, validation=examples, need_train=False, inject_adapter=False)
    if state is not None:
        _apply_adapter(run.model, *state)
    engine = EagerEngine(run.model, estimator=None)  # scoring only
    d = run.cfg.data  # (--max-length resolved against the model)
    metrics = run_eval(
        engine,
        run.task.kind,
        run.validation,
        run.encoder,
        run.tokenizer.pad_token_id,
        d.max_length,
        d.eval_batch_size,
        d.max_new_tokens,
        progress=cfg.run.progress,
    )
    return {
        "task": run.task.name,
        "kind": run.task.kind,
        "metric": main_metric(run.task.kind),
        "model": cfg.model,
        "adapter": None if adapter is None else str(adapter),
        **metrics,
    }


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
    from .mplora import inject, load_adapter_state, lora_layers

    if not lora_layers(model):
        modules = sorted({k.rsplit(".", 1)[0] for k in tensors})
        model.mplora_layers = inject(model, modules, int(config["r"]), float(config["lora_alpha"]), 0)
    load_adapter_state(model, tensors)
    return model
