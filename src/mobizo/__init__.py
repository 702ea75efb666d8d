"""mobizo: fine-tune LLMs on-device with forward passes only (P-RGE + MP-LoRA, ExecuTorch).

The public Python API (README "Python API")::

    import mobizo
    model = mobizo.get_mplora_model(hf_model, mobizo.MPLoRAConfig(rank=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    summary = mobizo.train(mobizo.TrainConfig.from_flat(model="tiny", task="synthetic", steps=100, out="runs/x"))
    metrics = mobizo.evaluate(adapter="runs/x")  # a run directory names the model, the task and the adapter
    text = mobizo.generate("Review: a fine film. Sentiment:", run="runs/x")
    label = mobizo.predict("the plot was dull", run="runs/x")  # {"label": "bad", "probabilities": [...], ...}

Names are imported on first use, so ``import mobizo`` (and the command line's start-up) stays light.

Code map, in layers: a module imports only from its own layer or lower ones, and no two modules
import each other (tests/test_imports.py checks both, deferred imports included). Lowest first:

1. ``errors``, ``util``, ``progress``, ``threads``, ``fsio`` (atomic writes, scratch cleanup)
2. ``perturb`` (seeded noise), ``archs`` (per-architecture tables), ``schedule`` (lr)
3. ``mplora`` (MP-LoRA layer, injection)
4. ``step`` (the one ZO step every engine runs)
5. ``tasks/``, ``data`` (examples, collation, batch order)
6. ``evaluation``, ``quantize``, ``convert`` (GGUF), ``models`` (loading bases)
7. ``engines/`` (eager; ``executorch/``: manifest, export, runtime, first-order baseline)
8. ``checkpoint`` (PEFT adapters, checkpoints), ``rundir`` (``--out``), ``program_cache`` (kept programs)
9. ``config`` (the flags)
10. ``build`` (a run assembled from a config)
11. ``trainer`` (the single-process loop)
12. ``distributed`` (the trainer on each rank of a process group), ``replay``, ``bundle``, ``native``
13. ``api`` (the Python API; :func:`mobizo.api.run_training` chooses single-process or distributed)
14. ``cli``, ``demo``, ``__main__``
"""

import os

# Models and data load from local paths only: never reach for a hub (one home for this setting).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"

_API = {
    "MPLoRAConfig": "mobizo.mplora",
    "get_mplora_model": "mobizo.mplora",
    "ZOStep": "mobizo.step",
    "ZOConfig": "mobizo.step",
    "TrainConfig": "mobizo.config",
    "train": "mobizo.api",
    "evaluate": "mobizo.api",
    "save_adapter": "mobizo.api",
    "load_adapter": "mobizo.api",
    "generate": "mobizo.api",
    "stream": "mobizo.api",
    "predict": "mobizo.api",
    "Example": "mobizo.tasks.base",
    "MobizoError": "mobizo.errors",
}

__all__ = ["__version__", *_API]  # noqa: PLE0604 - the names of the lazily imported API


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mobizo' has no attribute {name!r}")
