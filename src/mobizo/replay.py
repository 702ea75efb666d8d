"""``mobizo replay``: rebuild an adapter from a run's ``metrics.jsonl`` alone, without any forward pass.

A ZO step changes only B, by ``B <- B - lr * (mean_i g_i z_i + wd * B)``, and z is a
pure function of (seed, step, layer) (:mod:`mobizo.perturb`). So the log's
per-step records (``step``, ``projected_grads``, ``lr``, ``skipped``) plus its
header record (first line: the run config and the adapted layers) determine
the adapter. Replay uses the same :meth:`ZOStep.noise` and :func:`apply_rule`
as training, so an eager run's adapter is rebuilt bit for bit.

This is also the recovery path when a checkpoint is lost or corrupted.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from . import rundir
from .checkpoint import save_adapter
from .config import legacy_trajectory
from .errors import MobizoError
from .step import ZO_ESTIMATORS, ZOConfig, ZOStep, apply_rule
from .zo_optim import directions


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_log(path: str | Path) -> tuple[dict, list[dict]]:
    """(header, step records in order) of a ZO run's metrics.jsonl; every problem is a clear error."""
    p = Path(path)
    if not p.is_file():
        raise MobizoError(f"--log {p} does not exist or is not a file")
    header, raw = rundir.read_log(p)
    if header is None:
        if raw:
            raise MobizoError(
                f"{p}: the first line is not a mobizo log header (the log is from an older mobizo or not a log)"
            )
        raise MobizoError(f"{p}: empty log")
    if not (
        header.get("mobizo_log") == 1
        and isinstance(header.get("config"), dict)
        and isinstance(header.get("layers"), list)
    ):
        raise MobizoError(
            f"{p}: the first line is not a mobizo log header (the log is from an older mobizo or not a log)"
        )
    if header["config"].get("estimator") not in ZO_ESTIMATORS:
        raise MobizoError(
            f"{p}: replay needs a zeroth-order run ({', '.join(ZO_ESTIMATORS)}), "
            f"this one used {header['config'].get('estimator')!r}"
        )
    records = [_check_record(rec, f"{p}:{rec.pop('_line')}", n, header["config"]) for n, rec in enumerate(raw, 1)]
    return header, records


def _check_record(rec: dict, where: str, expected_step: int, config: dict) -> dict:
    step = rec.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        raise MobizoError(f"{where}: record without an integer 'step'")
    if step != expected_step:
        raise MobizoError(
            f"{where}: expected step {expected_step}, found step {step} (the log has a gap or is out of order)"
        )
    skipped = rec.get("skipped", False)
    if not isinstance(skipped, bool):
        raise MobizoError(f"{where}: 'skipped' must be true or false")
    grads, lr = rec.get("projected_grads"), rec.get("lr")
    # a skipped step may carry null (strict JSON's NaN) for its non-finite g
    if not isinstance(grads, list) or not all(_number(g) or (skipped and g is None) for g in grads):
        raise MobizoError(f"{where}: 'projected_grads' must be a list of numbers")
    if len(grads) != config.get("queries"):
        raise MobizoError(f"{where}: {len(grads)} projected gradients, the run has --queries {config.get('queries')}")
    if not skipped:
        if not all(math.isfinite(g) for g in grads):
            raise MobizoError(f"{where}: non-finite projected gradient in a step that was not skipped")
        if not _number(lr) or not math.isfinite(lr) or lr <= 0:
            raise MobizoError(f"{where}: invalid 'lr' {lr!r}")
    return rec


def _logged_curvature(rec: dict, queries: int, log) -> torch.Tensor:
    values = rec.get("curvature")
    if (
        not isinstance(values, list)
        or len(values) != queries
        or not all(_number(v) and math.isfinite(v) for v in values)
    ):
        raise MobizoError(
            f"{log}: step {rec['step']} has no valid 'curvature' ({queries} numbers; --optimizer hizoo logs it)"
        )
    return torch.tensor(values, dtype=torch.float32)


def replay(
    log: str | Path,
    out: str | Path,
    model: str | None = None,
    upto: int | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> dict:
    """Rebuild the adapter of the run logged in ``log`` (up to step ``upto``) into the adapter dir ``out``."""
    from .models import load_model
    from .mplora import adapter_state, inject

    out = Path(out)
    rundir.check_target(out)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise MobizoError(f"--out {out} is not empty (use --overwrite to replace it)")
        if not (out / "adapter_config.json").is_file():
            raise MobizoError(f"--overwrite: {out} is not an adapter directory; not replacing it")
    header, records = read_log(log)
    cfg = legacy_trajectory(header["config"])  # (a log from before the rules: ZO-SGD)
    estimator = cfg["estimator"]
    try:
        queries, seed, rank = int(cfg["queries"]), int(cfg["seed"]), int(cfg["rank"])
        alpha, wd = float(cfg["alpha"]), float(cfg.get("weight_decay") or 0.0)
        targets = cfg.get("target_modules")
    except (KeyError, TypeError, ValueError) as e:
        raise MobizoError(f"{log}: incomplete run config in the header ({e})") from e
    if (
        not (1 <= queries <= 1 << 16 and 1 <= rank <= 1 << 16 and 0 <= seed < 2**63)
        or not math.isfinite(alpha)
        or alpha <= 0
        or not math.isfinite(wd)
        or wd < 0
    ):
        raise MobizoError(f"{log}: invalid run config in the header")
    if upto is not None:
        if upto < 0 or upto > len(records):
            raise MobizoError(f"--steps {upto}: the log has steps 1..{len(records)}")
        records = records[:upto]
    model_name = model or cfg.get("model")
    if not isinstance(model_name, str):
        raise MobizoError(f"{log}: no model in the header; pass --model")
    net, _ = load_model(model_name, trust_remote_code=trust_remote_code)
    layers = inject(net, targets, rank, alpha, seed)
    if layers != header["layers"]:
        raise MobizoError(f"--model {model_name}: its adapted layers differ from the logged run's (a different model)")
    try:
        zo_config = ZOConfig(
            estimator,
            queries,
            seed,
            cfg.get("data_mode", "repeat"),
            wd,
            optimizer=cfg["optimizer"],
            beta1=float(cfg.get("beta1", 0.9)),
            beta2=float(cfg.get("beta2", 0.999)),
            hessian_smoothing=float(cfg.get("hessian_smoothing", 1e-6)),
        )
    except (TypeError, ValueError) as e:
        raise MobizoError(f"{log}: invalid update rule in the header ({e})") from e
    zo = ZOStep(net, zo_config)
    rule = zo_config.rule
    mods = zo._layers()
    applied = 0
    with torch.no_grad():
        for rec in records:
            if rec.get("skipped"):
                continue  # the in-graph guard left B (and the rule's state) untouched
            zs = zo.noise(torch.tensor(rec["step"], dtype=torch.int64))
            grads = torch.tensor(rec["projected_grads"], dtype=torch.float32)
            curv = None
            if rule.spec.center:  # HiZOO: the step's curvature scalars, as logged
                curv = _logged_curvature(rec, queries, log)
            lr = torch.tensor(rec["lr"], dtype=torch.float32)
            apply_rule(mods, zs, directions(mods, zs, rule), grads, lr, rule, wd, curv)
            applied += 1
    state = adapter_state(net)
    if not all(bool(torch.isfinite(t).all()) for t in state.values()):
        raise MobizoError(f"{log}: the replayed adapter has non-finite values (the log is corrupted)")
    save_adapter(out, state, rank, alpha, model_name)
    return {"steps": len(records), "applied": applied, "skipped": len(records) - applied, "out": str(out)}
