"""Distributed training (issue 13): 2 local processes (gloo, loopback), compared with one process.

Launches go through ``python -m torch.distributed.run`` (what ``torchrun`` runs) or, where a test
needs a different command line per rank or to kill one rank, through the same environment torchrun
gives its workers (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). References run in-process.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mobizo
from mobizo import TrainConfig
from mobizo.checkpoint import load_checkpoint
from mobizo.errors import MobizoError

SRC = str(Path(mobizo.__file__).resolve().parents[1])
FLAGS = dict(
    queries=4,
    batch_size=8,
    max_length=32,
    eval_examples=16,
    eval_every=0,
    optimizer="sgd",
    lr=2.0,
    eps=0.02,
    save_every=3,
    progress=False,
)


def argv(**flags) -> list[str]:
    out = []
    for k, v in {**FLAGS, **flags}.items():
        name = "--" + k.replace("_", "-")
        if k == "progress":
            out += [] if v else ["--no-progress"]
        elif v is True:
            out.append(name)
        else:
            out += [name, str(v)]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    torchrun_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    e = {k: v for k, v in os.environ.items() if k not in torchrun_vars}
    e.update(OMP_NUM_THREADS="1", MOBIZO_DIST_TIMEOUT="30", PYTHONPATH=os.pathsep.join([SRC, e.get("PYTHONPATH", "")]))
    e.update(extra)
    return e


def torchrun(args: list[str], n: int = 2, timeout: float = 150) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(n),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "mobizo",
        "train",
        *args,
    ]
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def spawn(per_rank: list[list[str]]) -> list[subprocess.Popen]:
    """One process per rank with torchrun's environment (each rank its own command line)."""
    port, n = free_port(), len(per_rank)
    return [
        subprocess.Popen(
            [sys.executable, "-m", "mobizo", "train", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
        )
        for r, args in enumerate(per_rank)
    ]


def log(run: Path) -> tuple[dict, list[dict]]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return lines[0], lines[1:]


def adapter(path: Path) -> dict:
    return load_file(str(path / "adapter_model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def reference(out: Path, steps: int, **flags) -> Path:
    mobizo.train(TrainConfig.from_flat(**{**FLAGS, **flags}, steps=steps, out=str(out)))
    return out


# ---------------------------------------------------------------- in-process pieces


def test_subsets_of_directions_give_the_full_steps_losses(tiny, synthetic_batch):
    """ZOStep.losses over each rank's contiguous share of the directions = the losses of the whole step."""
    from mobizo.mplora import inject
    from mobizo.step import ZOConfig, ZOStep

    model, _ = tiny
    inject(model, None, 8, 16, 0)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("lora_B"):
                buf.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    b, eps = synthetic_batch, torch.tensor(0.02)
    for estimator in ("prge", "prge-outer", "mezo"):
        for mode in ("repeat", "split"):
            zo = ZOStep(model, ZOConfig(estimator, 4, 0, mode))
            with torch.no_grad():
                zs = zo.noise(torch.tensor(3))
                full = zo.losses(zs, b.input_ids, b.attention_mask, b.labels, eps)
                parts = [
                    zo.losses(zs, b.input_ids, b.attention_mask, b.labels, eps, directions=range(r * 2, r * 2 + 2))
                    for r in range(2)
                ]
            for j in range(2):
                # the same rows and kernels in a batch of 2q/N copies: equal up to the last bit of a float32 loss
                torch.testing.assert_close(torch.cat([p[j] for p in parts]), full[j], rtol=0, atol=1e-6)


def test_shards_weighted_by_their_counts_give_the_whole_batch_loss(tiny, synthetic_batch):
    """Data mode's reduction: sum_r loss_r * count_r / sum_r count_r = the loss of the whole batch (both data modes,
    answer and choice objectives)."""
    from mobizo.data import Encoder, collate_choices
    from mobizo.distributed import direction_counts, shard_rows
    from mobizo.mplora import inject
    from mobizo.step import ZOConfig, ZOStep
    from mobizo.tasks import get_task

    model, tok = tiny
    inject(model, None, 8, 16, 0)
    enc = Encoder(tok)
    exs = get_task("synthetic").load("train")[:8]
    choice = collate_choices(
        [[enc(e.prompt, c) for c in e.candidates] for e in exs], [e.label for e in exs], 2, tok.pad_token_id, 64
    )
    for batch, objective, choices in ((synthetic_batch, "answer", 0), (choice, "choice-sum", 2)):
        for mode in ("repeat", "split"):
            zo = ZOStep(model, ZOConfig("prge", 2, 0, mode, objective=objective, choices=choices))
            with torch.no_grad():
                zs = zo.noise(torch.tensor(1))
                full = torch.cat(
                    zo.losses(
                        zs,
                        batch.input_ids,
                        batch.attention_mask,
                        batch.labels,
                        torch.tensor(0.02),
                        batch.gold,
                        shared=batch.shared,
                    )
                )
                num, den = 0, 0
                for r in range(2):
                    s = shard_rows(batch, r, 2, 2, mode == "split")
                    c = direction_counts(s, 2, mode == "split", objective).repeat(2)
                    num = (
                        num
                        + torch.cat(
                            zo.losses(
                                zs, s.input_ids, s.attention_mask, s.labels, torch.tensor(0.02), s.gold, shared=s.shared
                            )
                        ).double()
                        * c
                    )
                    den = den + c
            torch.testing.assert_close((num / den).float(), full, rtol=1e-6, atol=1e-6)


def test_config_checks_give_one_line_errors():
    from mobizo.distributed import _check_flags, check_config

    cfg = TrainConfig.from_flat(queries=3, batch_size=8)
    with pytest.raises(MobizoError, match="--queries 3 must be divisible by the world size 2"):
        check_config(cfg, 2)
    with pytest.raises(MobizoError, match="--batch-size 12 must be divisible by 2 processes x --queries 4"):
        check_config(cfg.replace(queries=4, batch_size=12, dist_mode="data", data_mode="split"), 2)
    with pytest.raises(MobizoError, match="not --estimator fo"):
        check_config(cfg.replace(estimator="fo"), 2)
    with pytest.raises(MobizoError, match="runs --engine eager"):
        check_config(cfg.replace(queries=4, engine="executorch"), 2)
    with pytest.raises(MobizoError, match="rank 1 was started with --lr 3.0"):
        _check_flags(cfg, [{"lr": cfg.optim.lr}, {"lr": 3.0, "out": "elsewhere"}], federated=False)
    _check_flags(cfg, [{}, {"data": "mine", "out": "elsewhere"}], federated=True)  # a client's own data and --out


# ---------------------------------------------------------------- 2 processes


@pytest.mark.slow  # torchrun processes
def test_queries_mode_is_the_single_process_trajectory_bitwise(tmp_path):
    """Each rank runs 2 of the 4 directions; the gathered (L+, L-) give every rank the full update."""
    ref = reference(tmp_path / "ref", 6)
    run = tmp_path / "dist"
    torchrun(argv(steps=6, out=run))
    (header, recs), (_, ref_recs) = log(run), log(ref)
    assert header["dist"] == {"mode": "queries", "world_size": 2}
    assert [r["projected_grads"] for r in recs] == [r["projected_grads"] for r in ref_recs]  # bitwise
    assert [r["loss"] for r in recs] == [r["loss"] for r in ref_recs]
    assert {r["dist_bytes"] for r in recs} == {8 * (1 + 2 * 2)}  # step + (L+, L-) of 2 directions, float64
    assert all(0 <= r["dist_seconds"] < r["seconds"] for r in recs)
    assert max_diff(adapter(run / "adapter"), adapter(ref / "adapter")) == 0.0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["dist"]["world_size"] == 2


@pytest.mark.slow  # torchrun processes
def test_data_mode_resumes_a_single_process_run_and_matches_it(tmp_path):
    """A one-process run to step 3, resumed on 2 processes in data mode (rank 0 sends the checkpoint's B): each
    rank runs all directions on half the batch; (loss x count, count) all-reduced. Shard sums round differently
    from whole-batch sums: losses agree to a few float32 ulps, g = dL / 2eps to ~1e-5."""
    ref = reference(tmp_path / "ref", 6)
    run = reference(tmp_path / "dist", 3)
    torchrun(["--out", str(run), "--resume", "--steps", "6", "--dist-mode", "data", "--no-progress"])
    (_, recs), (_, ref_recs) = log(run), log(ref)
    assert json.loads((run / "summary.json").read_text())["dist"]["mode"] == "data"
    same = ("step", "loss", "projected_grads")
    assert [[r[k] for k in same] for r in recs[:3]] == [[r[k] for k in same] for r in ref_recs[:3]]
    g = torch.tensor([r["projected_grads"] for r in recs])
    g_ref = torch.tensor([r["projected_grads"] for r in ref_recs])
    losses = torch.tensor([r["loss"] for r in recs])
    losses_ref = torch.tensor([r["loss"] for r in ref_recs])
    print(
        f"data mode: max |dg| {(g - g_ref).abs().max():.3g}, max |dloss| {(losses - losses_ref).abs().max():.3g}, "
        f"max |dB| {max_diff(adapter(run / 'adapter'), adapter(ref / 'adapter')):.3g}"
    )
    torch.testing.assert_close(losses, losses_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)
    assert max_diff(adapter(run / "adapter"), adapter(ref / "adapter")) < 1e-3
    assert {r["dist_bytes"] for r in recs[3:]} == {8 * (1 + 3 * 4)}  # step + sum L+, sum L-, count per direction


def _client_data(root: Path, rank: int) -> None:
    """A client's own sst2-layout data: rank 0 mostly positive reviews, rank 1 mostly negative."""
    import random

    from mobizo.tasks.synthetic import _review

    rng = random.Random(rank)
    root.mkdir()
    for split, n in (("train", 32), ("validation", 16)):
        rows = []
        for _ in range(n):
            label = int(rng.random() < (0.8 if rank == 0 else 0.2))
            rows.append({"sentence": _review(rng, label), "label": label})
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.slow  # torchrun processes
def test_federated_exchanges_only_g_and_replays(tmp_path):
    """Each rank trains on its own --data; only (step, g) cross; the update's g is the mean over ranks, which the
    log records, so `mobizo replay` rebuilds the adapter bit for bit. Rank 1 writes nothing (its own --out)."""
    for r in range(2):
        _client_data(tmp_path / f"client{r}", r)
    common = argv(steps=5, task="sst2", data=str(tmp_path / "client{rank}"), dist_mode="federated")
    run, other = tmp_path / "fed", tmp_path / "rank1-out"
    procs = spawn([common + ["--out", str(run)], common + ["--out", str(other)]])
    for p in procs:
        _, err = p.communicate(timeout=150)
        assert p.returncode == 0, err[-3000:]
    assert not other.exists()
    header, recs = log(run)
    assert header["dist"] == {"mode": "federated", "world_size": 2}
    assert header["config"]["data"].endswith("client{rank}")  # the template, as given
    for rec in recs:
        per_rank = torch.tensor(rec["rank_grads"], dtype=torch.float64)
        assert per_rank.shape == (2, 4) and not torch.equal(per_rank[0], per_rank[1])  # different data
        assert rec["projected_grads"] == per_rank.mean(0).float().tolist()
        assert rec["dist_bytes"] == 8 * (1 + 4)
    from mobizo.replay import replay

    replay(run / "metrics.jsonl", tmp_path / "replayed")
    assert max_diff(adapter(tmp_path / "replayed"), adapter(run / "adapter")) == 0.0


@pytest.mark.slow  # torchrun processes
def test_killed_rank_stops_the_others_and_resume_continues(tmp_path):
    """SIGKILL rank 1 mid-run: rank 0 stops with one line within seconds, its last checkpoint is whole, and a
    single-process --resume ends exactly where an uninterrupted single-process run does."""
    run = tmp_path / "run"
    procs = spawn([argv(steps=400, out=run)] * 2)
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() or (run / "metrics.jsonl").read_text().count("\n") < 9:
        assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].stderr.read()[-3000:]
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, err = procs[0].communicate(timeout=60)
    procs[1].wait()
    assert procs[0].returncode == 2 and time.monotonic() - killed < 30
    lines = [x for x in err.splitlines() if x.startswith("mobizo")]
    assert len(lines) == 1 and "rank 0: the all-gather of step" in lines[0] and "restart with --resume" in lines[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed"
    _, _, state, _ = load_checkpoint(run / "checkpoint")  # whole: checksums verified
    assert state["step"] % 3 == 0 and 6 <= state["step"] <= summary["final_step"]
    # the log covers the checkpoint, and every logged step was completed
    assert [r["step"] for r in log(run)[1]] == list(range(1, summary["final_step"] + 1))

    steps = summary["final_step"] + 3
    mobizo.train(out=str(run), resume=True, steps=steps, progress=False)
    ref = reference(tmp_path / "ref", steps)
    assert max_diff(adapter(run / "adapter"), adapter(ref / "adapter")) == 0.0
    assert [r["projected_grads"] for r in log(run)[1]] == [r["projected_grads"] for r in log(ref)[1]]
