"""Entry points the CLI wires to ``mobizo bundle`` and ``mobizo native build|train`` (no argparse here).

* ``mobizo bundle [train flags] --out DIR [--program DIR] [--overwrite]`` -> :func:`cmd_bundle`
* ``mobizo native build [--out DIR]`` -> :func:`cmd_native_build` (prints the binary's path)
* ``mobizo native train BUNDLE --out RUN [--resume | --overwrite] [--steps N] [--quiet]``
  -> :func:`cmd_native_train` (the binary prints its own progress)

Every failure is a :class:`mobizo.errors.MobizoError` with a one-line message.
"""

from __future__ import annotations

from pathlib import Path


def cmd_bundle(cfg, out: str | Path, program: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write a training bundle for ``cfg`` (a TrainConfig: model, task, estimator, shapes, lr, eps, steps,
    save_every, ...) into ``out``; ``program`` reuses a ``mobizo export`` directory instead of exporting."""
    from .bundle import make_bundle

    return make_bundle(cfg, out, program=program, overwrite=overwrite)


def cmd_native_build(out: str | Path | None = None, force: bool = False) -> Path:
    """Compile mobizo-train (cached); returns the binary's path."""
    from .native import build

    return build(out, force=force)


def cmd_native_train(bundle: str | Path, out: str | Path, resume: bool = False, overwrite: bool = False,
                     steps: int | None = None, quiet: bool = False) -> dict:  # fmt: skip
    """Train ``bundle`` natively into ``out``; returns the run's summary.json."""
    from .native import train

    return train(bundle, out, resume=resume, overwrite=overwrite, steps=steps, quiet=quiet)
