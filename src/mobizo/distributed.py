"""Scale out over torch.distributed: ZO queries, batch shards or federated clients, scalars only on the wire.

``torchrun --nproc-per-node N -m mobizo train ...`` (or ``--nnodes``/``--rdzv-*`` across machines)
starts N processes; :func:`mobizo.api.run_training` (what ``mobizo train`` and :func:`mobizo.train`
call) sees ``WORLD_SIZE > 1`` and runs :func:`train` here instead of :func:`mobizo.trainer.train`.
A ZO direction z_i is a pure function of (seed, step, layer, i) (:mod:`mobizo.perturb`), so every
process regenerates every z locally and only a few floats per step cross the network.
``--dist-mode`` chooses what each process computes (docs/scaling-out.md has the details):

* ``queries``: rank r runs directions [r q/N, (r+1) q/N) on the whole batch (P-RGE batching inside
  the rank); the (L+, L-) pairs are all-gathered and every rank applies the full update with
  :meth:`mobizo.step.ZOStep.update`: the single-process trajectory (bitwise where the model's
  kernels give the same per-row results for a smaller batch, as on CPU in the tests).
* ``data``: rank r runs all q directions on its shard of the batch; each copy's loss is all-reduced
  as (loss x count, count), so the objective is the single-process one (float rounding aside).
* ``federated``: each rank trains on its own ``--data`` (``{rank}`` in the path is replaced by the
  rank) with the same directions z_i; the g values are all-gathered and the update uses their
  mean over ranks, g_i = mean_r g_{r,i} (the projected gradient of the ranks' mean loss), which is
  what the log's ``projected_grads`` records, so ``mobizo replay`` rebuilds the adapter unchanged.
  Examples and weights never leave a process (``rank_grads`` in the log: every rank's g).

Every rank runs the single-process loop, :class:`mobizo.trainer.Trainer`, with the engine wrapped in
:class:`DistEngine` (the step's collectives) and through the trainer's public hooks only: rank 0's
:class:`~mobizo.rundir.RunDir` writes, the others' is made with ``writes=False``; the mode goes into
the log header and the summary as extra fields; a failed collective is reported with
:meth:`~mobizo.trainer.Trainer.write_failure`; ``--resume`` uses :func:`mobizo.trainer.resolve_resume`
and :func:`mobizo.trainer.restore`.

Only rank 0 writes ``--out``; it writes a checkpoint only between steps, after the step's
collective has completed and the update is applied, so a checkpoint never holds half a step. A
collective that fails (a process died, hung past ``MOBIZO_DIST_TIMEOUT`` seconds or is unreachable)
stops every surviving process with a one-line :class:`DistError`; rank 0 then writes
``summary.json`` (status ``failed``) and ``--resume`` continues from the last checkpoint.
Every step's record has ``dist_bytes`` (the bytes this rank contributes to the step's collective) and
``dist_seconds`` (the time it spent in it: the transfer plus the wait for the slowest rank).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
from datetime import timedelta

import torch

from .build import assemble, build_engine, needs_weights
from .checkpoint import tensors_sha256
from .config import TrainConfig, flag, non_default
from .data import Batch
from .devices import backend_for
from .engines import StepOutput
from .errors import MobizoError
from .rundir import RunDir, default_out
from .trainer import Trainer, fresh_start, resolve_resume, restore
from .zo_optim import rule

TIMEOUT_ENV, BACKEND_ENV = "MOBIZO_DIST_TIMEOUT", "MOBIZO_DIST_BACKEND"
DEFAULT_TIMEOUT = 120.0  # seconds a collective waits for a silent peer (a dead one is noticed at once)
WIRE = torch.float64  # every scalar on the wire: exact for float32 losses / g and for step numbers
# flags a rank may set differently from rank 0: where it would write (only rank 0 writes), its bars
LOCAL_FLAGS = ("out", "progress")


class DistError(MobizoError):
    """A collective failed: another process stopped, hung past the timeout, or is unreachable."""


def world_size() -> int:
    """The number of processes of this run: the initialised process group's, else ``WORLD_SIZE`` (torchrun)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise MobizoError(f"WORLD_SIZE={raw!r} is not an integer") from None


def timeout_seconds() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise MobizoError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return value


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _reason(e: BaseException) -> str:
    """A backend error in a few words: gloo's source location and advice are dropped."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", _first_line(e))
    return text.split(". This is typically caused", 1)[0].rstrip(".")


def _describe(e: BaseException) -> str:
    if isinstance(e, MobizoError):
        return str(e)
    return f"internal error: {type(e).__name__}: {_first_line(e)}"


def check_config(cfg, world: int) -> None:
    """What a distributed run needs from the config (one-line errors before anything is loaded)."""
    o, mode = cfg.optim, cfg.engine.dist_mode
    if o.estimator == "fo":
        raise MobizoError(
            f"distributed training (WORLD_SIZE={world}) runs the zeroth-order estimators, not --estimator fo"
        )
    if cfg.engine.engine != "eager":
        raise MobizoError(
            f"distributed training (WORLD_SIZE={world}) runs --engine eager (an exported program has a "
            "fixed q and batch)"
        )
    if mode == "queries" and o.queries % world:
        raise MobizoError(
            f"--dist-mode queries splits the q directions over the processes: --queries {o.queries} "
            f"must be divisible by the world size {world}"
        )
    if o.lr == "auto":
        raise MobizoError("--lr auto probes learning rates in one process: run it there, then pass the lr it chose")
    if mode != "queries" and rule(o.optimizer or "sgd").center:
        raise MobizoError(
            f"--optimizer {o.optimizer} needs the unperturbed loss of the whole batch on every process: use "
            f"--dist-mode queries, not {mode}"
        )
    if mode == "data":
        unit = world * (o.queries if o.data_mode == "split" else 1)
        if o.batch_size % unit:
            what = f"{world} processes" + (f" x --queries {o.queries} (split)" if o.data_mode == "split" else "")
            raise MobizoError(
                f"--dist-mode data shards the batch: --batch-size {o.batch_size} must be divisible by {what}"
            )


def local_data(template: str | None, rank: int) -> str | None:
    """A federated rank's ``--data``: ``{rank}`` replaced by its rank."""
    return None if template is None else template.replace("{rank}", str(rank))


# ---------------------------------------------------------------- the process group


class Group:
    """This process's place in the run (rank, world) and the few collectives mobizo uses, every failure
    turned into a one-line :class:`DistError`."""

    def __init__(self, created: bool):
        import torch.distributed as dist

        self.dist, self.created = dist, created
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # where the step's scalars travel: NCCL moves only GPU tensors (they are made and used on the CPU)
        nccl = dist.get_backend() == "nccl"
        self.wire_device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.timeout = timeout_seconds()
        self.sent, self.waited = 0, 0.0  # bytes and seconds of this rank's last step collective

    @classmethod
    def join(cls, device: torch.device | None = None) -> Group:
        """Join (or, when the caller made one, use) the process group of torchrun's environment. The backend:
        ``MOBIZO_DIST_BACKEND`` if set, else NCCL when the run's ``device`` is a GPU (``cuda:LOCAL_RANK``),
        else gloo."""
        import torch.distributed as dist

        device = torch.device("cpu") if device is None else device
        if dist.is_initialized():
            return cls(created=False)
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise MobizoError(
                f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but {', '.join(missing)} not set: start the "
                "processes with torchrun (docs/scaling-out.md)"
            )
        timeout = timeout_seconds()
        backend = os.environ.get(BACKEND_ENV) or backend_for(device)
        if backend == "nccl" and device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's object collectives use the current device: this rank's GPU
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        except Exception as e:  # store/backend errors of every kind
            where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
            raise DistError(
                f"rank {os.environ['RANK']}: could not join the process group at {where} ({_reason(e)})"
            ) from e
        return cls(created=True)

    def close(self) -> None:
        if self.created and self.dist.is_initialized():
            with contextlib.suppress(Exception):  # a peer already gone; nothing left to release
                self.dist.destroy_process_group()

    def _call(self, what: str, fn):
        try:
            return fn()
        except DistError:
            raise
        except Exception as e:  # gloo/nccl raise RuntimeError, DistBackendError, DistNetworkError...
            raise DistError(
                f"rank {self.rank}: {what} failed ({_reason(e)}): another process stopped, hung past "
                f"{TIMEOUT_ENV}={self.timeout:g}s or is unreachable"
            ) from e

    # ------------------------------------------------------------ the step's collectives (scalars)

    def _payload(self, step: int, values: torch.Tensor) -> torch.Tensor:
        values = values.detach().to("cpu", WIRE).reshape(-1)
        return torch.cat([torch.tensor([float(step)], dtype=WIRE), values]).to(self.wire_device)

    def _timed(self, what: str, payload: torch.Tensor, fn) -> None:
        t0 = time.perf_counter()
        self._call(what, fn)
        self.sent, self.waited = payload.numel() * payload.element_size(), time.perf_counter() - t0

    def gather(self, step: int, values: torch.Tensor) -> torch.Tensor:
        """Every rank's ``values`` as a (world, n) float64 tensor. The step number travels along: ranks out of
        step are an error, never a silent mix. ``sent``/``waited``: this rank's bytes and seconds in it."""
        payload = self._payload(step, values)
        out = [torch.empty_like(payload) for _ in range(self.world)]
        self._timed(f"the all-gather of step {step}", payload, lambda: self.dist.all_gather(out, payload))
        got = torch.stack(out).cpu()
        if not bool((got[:, 0] == step).all()):
            raise DistError(f"rank {self.rank}: processes out of step (steps {got[:, 0].long().tolist()})")
        return got[:, 1:]

    def reduce(self, step: int, values: torch.Tensor) -> torch.Tensor:
        """The sum of ``values`` over ranks, in float64 (the step number checked as in :meth:`gather`)."""
        payload = self._payload(step, values)
        self._timed(f"the all-reduce of step {step}", payload, lambda: self.dist.all_reduce(payload))
        payload = payload.cpu()
        if float(payload[0]) != float(step) * self.world:
            raise DistError(f"rank {self.rank}: processes out of step at step {step}")
        return payload[1:]

    # ------------------------------------------------------------ start-up (objects, once)

    def objects(self, obj, what: str = "an exchange between the processes") -> list:
        out = [None] * self.world
        self._call(what, lambda: self.dist.all_gather_object(out, obj))
        return out

    def from_rank0(self, fn):
        """Rank 0 runs ``fn``; every rank gets its result, or stops with rank 0's error."""
        result, error, exc = None, None, None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - reported to the others, then re-raised as is
                error, exc = _describe(e), e
        box = [(result, error)]
        self._call("a broadcast from rank 0", lambda: self.dist.broadcast_object_list(box, src=0))
        if exc is not None:
            raise exc
        result, error = box[0]
        if error is not None:
            raise MobizoError(f"rank {self.rank}: stopped because rank 0 failed: {error}")
        return result

    def agreed(self, fn):
        """Every rank runs ``fn``; if any fails, every rank stops (naming the first that failed)."""
        result, exc = None, None
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - reported to the others, then re-raised as is
            exc = e
        errors = self.objects(None if exc is None else _describe(exc))
        if exc is not None:
            raise exc
        for r, error in enumerate(errors):
            if error is not None:
                raise MobizoError(f"rank {self.rank}: stopped because rank {r} failed: {error}")
        return result


# ---------------------------------------------------------------- the step


def shard_rows(batch, rank: int, world: int, queries: int, split: bool):
    """Rank ``rank``'s examples of ``batch`` (data mode): a contiguous 1/world of them, or in split mode
    its 1/world of each direction's chunk, kept in direction order (so its chunk i is its part of chunk i)."""
    examples = batch.gold.shape[0] if batch.gold is not None else batch.rows
    per = batch.rows // examples  # rows per example (candidates with the choice objective)
    if split:
        chunk = examples // queries
        sub = chunk // world
        mine = [c * chunk + rank * sub + j for c in range(queries) for j in range(sub)]
    else:
        sub = examples // world
        mine = list(range(rank * sub, (rank + 1) * sub))
    rows = torch.tensor([e * per + k for e in mine for k in range(per)], dtype=torch.long)
    gold = None if batch.gold is None else batch.gold[torch.tensor(mine, dtype=torch.long)]
    n_real = int((rows < batch.n_real).sum())
    return Batch(batch.input_ids[rows], batch.attention_mask[rows], batch.labels[rows], n_real, gold, batch.shared)


def direction_counts(batch, queries: int, split: bool, objective: str) -> torch.Tensor:
    """(q,) float64: the denominator of each direction's loss on ``batch`` (answer tokens, or examples with a
    gold candidate): the weight of a shard's loss in the all-reduced mean."""
    if objective == "answer":
        units = (batch.labels != -100).sum(-1)
    else:
        units = (batch.gold != -100).long()
    if split:
        return torch.stack([c.sum() for c in units.chunk(queries)]).to(torch.float64)
    return units.sum().to(torch.float64).repeat(queries)


class DistEngine:
    """The eager engine with its training step spread over the process group (everything else delegated)."""

    def __init__(self, engine, group: Group, mode: str, objective: str):
        self.engine, self.group, self.mode, self.objective = engine, group, mode, objective
        self.zo = engine.step
        self.q = self.zo.config.queries
        self.split = self.zo.config.data_mode == "split"
        self.completed: int | None = None

    def __getattr__(self, name):  # score, next_token_logits, adapter_state, shapes, name, ...
        return getattr(self.engine, name)

    def train_step(self, batch, step: int, lr: float, eps: float):
        g, q, zo = self.group, self.q, self.zo
        step_t = torch.tensor(step, dtype=torch.int64)
        lr_t, eps_t = torch.tensor(lr, dtype=torch.float32), torch.tensor(eps, dtype=torch.float32)
        extra: dict = {}
        with torch.no_grad():
            zs = zo.noise(step_t)
            if self.mode == "queries":
                k = q // g.world
                dirs = zo.directions(zs)
                plus, minus, *center = zo.losses(
                    dirs,
                    batch.input_ids,
                    batch.attention_mask,
                    batch.labels,
                    eps_t,
                    batch.gold,
                    directions=range(g.rank * k, (g.rank + 1) * k),
                    shared=batch.shared,
                )
                # HiZOO's unperturbed loss rides along; every rank uses rank 0's, so that all stay identical
                got = g.gather(step, torch.cat([plus, minus, *(c.reshape(1) for c in center)]))
                plus, minus = got[:, :k].reshape(-1).float(), got[:, k : 2 * k].reshape(-1).float()
                center = got[0, 2 * k].float() if center else None
                losses, grads, *curvature = zo.update(zs, plus, minus, lr_t, eps_t, center=center, dirs=dirs)
                if curvature:
                    extra["curvature"] = curvature[0].tolist()
            elif self.mode == "data":
                mine = shard_rows(batch, g.rank, g.world, q, self.split)
                plus, minus = zo.losses(
                    zs, mine.input_ids, mine.attention_mask, mine.labels, eps_t, mine.gold, shared=mine.shared
                )
                count = direction_counts(mine, q, self.split, self.objective)
                plus, minus = plus.cpu(), minus.cpu()
                tot = g.reduce(step, torch.cat([plus.double() * count, minus.double() * count, count]))
                denom = tot[2 * q :].clamp(min=1)
                plus, minus = (tot[:q] / denom).float(), (tot[q : 2 * q] / denom).float()
                losses, grads = zo.update(zs, plus, minus, lr_t, eps_t)
            else:  # federated: own data, same directions; the update uses the mean g over ranks
                plus, minus = zo.losses(
                    zs, batch.input_ids, batch.attention_mask, batch.labels, eps_t, batch.gold, shared=batch.shared
                )
                got = g.gather(step, (plus - minus) / (2 * eps_t))
                losses, grads = zo.update(zs, plus, minus, lr_t, eps_t, grads=got.mean(0).float())
                extra["rank_grads"] = got.float().tolist()
        self.completed = step  # the update of ``step`` is applied (what a failure summary reports)
        extra["dist_bytes"], extra["dist_seconds"] = g.sent, g.waited
        return StepOutput(float(losses.mean()), grads.tolist(), losses.tolist(), extra)


# ---------------------------------------------------------------- the entry point


def _fingerprint(run) -> tuple:
    """What every rank must share: the adapted layers, the base weights and the frozen A's."""
    a = {k: v for k, v in run.engine.adapter_state().items() if k.endswith("lora_A")}
    return list(run.targets), run.base_hash(), tensors_sha256(a)


def _check_flags(cfg, given_per_rank: list[dict], federated: bool) -> None:
    """A flag given to any rank must have rank 0's (resolved) value: rank 0's config runs everywhere."""
    mine = cfg.flat()
    exempt = LOCAL_FLAGS + (("data",) if federated else ())
    for r, given in enumerate(given_per_rank):
        for k, v in sorted(given.items()):
            if k not in exempt and v != mine[k]:
                raise MobizoError(
                    f"rank {r} was started with {flag(k)} {v!r}, rank 0 runs {mine[k]!r} (every "
                    "process needs the same flags)"
                )


def run_device(cfg) -> torch.device:
    """This rank's device (``--device``; cuda is ``cuda:LOCAL_RANK``), which picks the backend. Resolved before
    the config is checked, so an unusable ``--device`` reaches the user as its own one-line error."""
    from .devices import resolve

    return resolve(cfg.engine.device) if cfg.engine.engine == "eager" else torch.device("cpu")


def train(cfg, given=None, on_step=None, **objects) -> dict:
    """:func:`mobizo.trainer.train` for a run of ``WORLD_SIZE > 1`` processes (see the module docstring)."""
    given = non_default(cfg) if given is None else set(given)
    group = Group.join(run_device(cfg))
    previous = _on_sigterm(group)
    try:
        return _train(group, cfg, given, on_step, objects)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        group.close()


def _on_sigterm(group: Group):
    """torchrun stops the surviving processes with SIGTERM when one fails: stop with a clear line, not a trace."""

    def handler(signum, frame):
        raise DistError(
            f"rank {group.rank}: terminated by the launcher (SIGTERM), most likely because another process failed"
        )

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        return None


def _train(group: Group, cfg, given: set, on_step, objects: dict) -> dict:
    rank = group.rank
    given_per_rank = group.objects({k: v for k, v in cfg.flat().items() if k in given})

    def decide():  # rank 0: validate, check --out, resolve --resume; its config runs on every rank
        c = cfg.validate()
        out = RunDir(c.run.out or default_out(c.data.task, c.optim.estimator))
        out.check(c.run.resume, c.run.overwrite)
        if c.run.resume:
            c = resolve_resume(c, given, out).validate()
        c = c.replace(out=str(out.path)).resolved()
        check_config(c, group.world)
        _check_flags(c, given_per_rank, c.engine.dist_mode == "federated")
        return c.flat()

    run_cfg = TrainConfig.from_flat(**group.from_rank0(decide))
    mode = run_cfg.engine.dist_mode
    run_cfg = run_cfg.replace(progress=run_cfg.run.progress and rank == 0)
    if mode == "federated" and run_cfg.run.divergence in ("rollback", "stop"):
        # each rank sees its own data's loss: a rollback or stop decided on one would leave the others waiting
        run_cfg = run_cfg.replace(divergence="warn")
    local = run_cfg
    if mode == "federated":  # this rank's own data: its --data if given, else rank 0's, {rank} replaced
        local = run_cfg.replace(data=local_data(cfg.data.data if "data" in given else run_cfg.data.data, rank))

    def build():
        run = assemble(local, weights=needs_weights(local), **objects)
        build_engine(run)
        # logged and checkpointed as rank 0's config (federated: the --data template), with what assemble resolved
        run.cfg = run_cfg.replace(max_length=run.cfg.data.max_length, threads=run.cfg.run.threads)
        return run, _fingerprint(run)

    run, fingerprint = group.agreed(build)
    for r, other in enumerate(group.objects(fingerprint)):
        if other != fingerprint:
            what = (
                "adapted layers"
                if other[0] != fingerprint[0]
                else "base weights"
                if other[1] != fingerprint[1]
                else "frozen LoRA A"
            )
            raise MobizoError(
                f"rank {rank}: rank {r} has different {what} than rank {rank} (every process needs the "
                "same --model, --seed and adapter flags)"
            )

    out = RunDir(run_cfg.run.out, writes=rank == 0)  # only rank 0 writes --out

    def open_out():  # rank 0: the run directory and the checkpoint to continue; B goes to the others
        out.open(run_cfg.run.resume, run_cfg.run.overwrite)
        if not run_cfg.run.resume:
            return fresh_start(), None
        start = restore(run, out)
        return start, {k: v for k, v in run.engine.adapter_state().items() if k.endswith("lora_B")}

    start, b_state = group.from_rank0(open_out)
    if rank != 0 and b_state is not None:
        run.engine.load_adapter_state({**run.engine.adapter_state(), **b_state})
    if rank == 0 and run_cfg.run.progress and not run_cfg.run.resume:
        print(f"mobizo: run directory {out.path} ({group.world} processes, --dist-mode {mode})", file=sys.stderr)
    run.engine = DistEngine(run.engine, group, mode, run.objective)
    dist = {"mode": mode, "world_size": group.world}
    trainer = Trainer(
        run, out, start, on_step, header_fields={"dist": dist}, summary_fields={"dist": {**dist, "rank": rank}}
    )
    try:
        summary = trainer.fit()
    except DistError as e:
        done = run.engine.completed if run.engine.completed is not None else start["step"]
        msg = f"{e}; {done} steps done"
        if rank == 0:
            msg += (
                f"; the last checkpoint (step {trainer.last_good_ckpt}) in {out / 'checkpoint'} is complete: "
                "restart with --resume"
            )
            try:
                trainer.write_failure(msg, done)
            except OSError:
                pass
        raise DistError(msg) from e
    # every rank finished: a failure of rank 0's final writes is not reported as success elsewhere
    group.agreed(lambda: None)
    return summary
