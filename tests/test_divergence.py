"""Divergence (mobizo.divergence): detection, rollback with a lower lr, stop, warn; the starting eval as a
candidate for best/ and the summary's verdict when a run ends worse than it began."""

from __future__ import annotations

import json

import pytest
import torch

from mobizo import trainer as trainer_module
from mobizo.checkpoint import read_adapter
from mobizo.config import TrainConfig
from mobizo.divergence import FACTOR, MAX_ROLLBACKS, PATIENCE, WARMUP, Monitor
from mobizo.errors import MobizoError
from mobizo.replay import replay

FLAGS = dict(model="tiny", task="synthetic", queries=2, batch_size=4, max_length=32, eval_examples=16, lr=1.0)
FLAGS.update(optimizer="sgd", eps=0.05, eval_every=0, save_every=10, progress=False)


def test_the_monitor_flags_a_sustained_climb_and_nothing_else():
    m = Monitor()
    for _ in range(WARMUP + 50):  # noisy but level: never
        assert not m.update(0.7 + 0.3 * (m.steps % 2))
    m = Monitor()
    for _ in range(WARMUP + 10):
        m.update(0.3)
    flagged = [m.update(3.0) for _ in range(40)]  # the Gemma 3 shape: 0.3, then up to several times that
    first = flagged.index(True)
    assert not any(flagged[:first]) and first < 30  # after the average crosses and stays PATIENCE steps
    assert m.average > FACTOR * m.lowest
    # a spike shorter than PATIENCE is not a divergence
    m = Monitor()
    for _ in range(WARMUP + 5):
        m.update(0.3)
    assert not any(m.update(5.0) for _ in range(3)) and not any(m.update(0.3) for _ in range(PATIENCE * 3))
    assert Monitor.of(m.state()) == m


class Scripted:
    """The eager engine, reporting a scripted loss: it climbs from step 25 while the lr is the run's own."""

    def __init__(self, engine, base_lr: float, climb_at: int = 25):
        self.engine, self.base_lr, self.climb_at = engine, base_lr, climb_at

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def train_step(self, batch, step, lr, eps):
        out = self.engine.train_step(batch, step, lr, eps)
        out.loss = 0.3 + (4.0 if step >= self.climb_at and lr >= self.base_lr else 0.0)
        return out


def _scripted(monkeypatch, climb_at: int = 25):
    build = trainer_module.build_engine

    def build_engine(run, program_dir=None):
        engine = build(run, program_dir)
        run.engine = Scripted(engine, run.cfg.optim.lr, climb_at)
        return run.engine

    monkeypatch.setattr(trainer_module, "build_engine", build_engine)


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()[1:]]


def test_rollback_restores_the_last_healthy_checkpoint_with_half_the_lr(monkeypatch, tmp_path, capsys):
    _scripted(monkeypatch)
    out = tmp_path / "run"
    summary = trainer_module.train(TrainConfig.from_flat(**FLAGS, steps=60, out=str(out)))
    err = capsys.readouterr().err
    assert summary["status"] == "completed" and len(summary["rollbacks"]) == 1
    back = summary["rollbacks"][0]
    assert back["to_step"] == 20 and back["lr_scale"] == 0.5 and back["at_step"] > 25  # the checkpoint before
    assert "diverged" in err and "rolled back to step 20" in err
    recs = _records(out)
    assert [r["step"] for r in recs] == list(range(1, 61))  # the undone steps were redone
    assert all(r["lr"] == 1.0 for r in recs[:20]) and all(r["lr"] == 0.5 for r in recs[20:])
    # the log still rebuilds the adapter: it holds what was applied
    replay(out / "metrics.jsonl", tmp_path / "re")
    a, r = read_adapter(out / "adapter")[0], read_adapter(tmp_path / "re")[0]
    assert all(torch.equal(a[k], r[k]) for k in a)
    # a run stopped before the climb and resumed rolls back the same way; so does a run killed after the
    # rollback (its checkpoint at the rollback's step holds the lr scale and the rollbacks)
    part = tmp_path / "part"
    trainer_module.train(TrainConfig.from_flat(**FLAGS, steps=22, out=str(part)))
    before = (part / "metrics.jsonl").read_text().splitlines()[:23]
    resumed = trainer_module.train(TrainConfig.from_flat(**FLAGS, steps=60, out=str(part), resume=True))
    assert (part / "metrics.jsonl").read_text().splitlines()[:21] == before[:21]  # steps 1-20 were not redone
    assert resumed["rollbacks"] == summary["rollbacks"]
    assert [r["lr"] for r in _records(part)] == [r["lr"] for r in recs]


def test_stop_and_warn_and_the_rollback_limit(monkeypatch, tmp_path, capsys):
    _scripted(monkeypatch, climb_at=12)
    with pytest.raises(MobizoError, match="training stopped at step .*: the training loss diverged"):
        trainer_module.train(TrainConfig.from_flat(**FLAGS, steps=60, out=str(tmp_path / "s"), divergence="stop"))
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["status"] == "diverged" and "last good checkpoint" in summary["error"]
    s = trainer_module.train(TrainConfig.from_flat(**FLAGS, steps=60, out=str(tmp_path / "w"), divergence="warn"))
    assert s["status"] == "completed" and not s["rollbacks"]
    assert capsys.readouterr().err.count("diverged") == 1  # said once
    # a loss that climbs whatever the lr: MAX_ROLLBACKS rollbacks, then a stop
    monkeypatch.setattr(Scripted, "train_step", lambda self, b, step, lr, eps: _always(self, b, step, lr, eps))
    with pytest.raises(MobizoError, match=f"after {MAX_ROLLBACKS} rollbacks"):
        trainer_module.train(TrainConfig.from_flat(**FLAGS, steps=200, out=str(tmp_path / "x")))


def _always(self, batch, step, lr, eps):
    out = self.engine.train_step(batch, step, lr, eps)
    out.loss = 0.3 + (4.0 if step >= 12 else 0.0)  # healthy up to the step-10 checkpoint, then up for good
    return out


def test_the_starting_point_is_a_candidate_for_best_and_a_worse_end_is_said(monkeypatch, tmp_path, capsys):
    """A run whose evaluation only gets worse keeps step 0's adapter (B = 0: the base model) as best/ and says
    so; the summary records the verdict either way."""
    from mobizo import evaluation

    calls = {"n": 0}
    real = evaluation.evaluate

    def worse_each_time(*args, **kwargs):
        metrics = real(*args, **kwargs)
        calls["n"] += 1
        metrics["accuracy"] = 1.0 - 0.1 * calls["n"]
        return metrics

    monkeypatch.setattr(trainer_module, "evaluate", worse_each_time)
    out = tmp_path / "run"
    summary = trainer_module.train(TrainConfig.from_flat(**{**FLAGS, "eval_every": 10}, steps=20, out=str(out)))
    assert summary["best"]["step"] == 0 and summary["improved"] is False
    assert summary["eval_start"]["accuracy"] == pytest.approx(0.9)
    best = read_adapter(out / "best")[0]
    assert all(not v.any() for k, v in best.items() if k.endswith("lora_B"))  # the starting adapter
    assert "the run ended worse than it began: accuracy 0.9000 at the start" in capsys.readouterr().err
    # --no-eval-at-start: no verdict, no start candidate
    s = trainer_module.train(
        TrainConfig.from_flat(**FLAGS, steps=2, eval_at_start=False, out=str(tmp_path / "n"), divergence="off")
    )
    assert s["improved"] is None and s["eval_start"] is None and s["best"]["step"] == 2


@pytest.mark.slow
def test_the_native_trainer_rolls_back_exactly_like_the_python_trainer(tmp_path, monkeypatch):
    """The native trainer applies the same rule with the constants its bundle carries. With constants that make
    every short rise a divergence, both trainers drive one program through the same rollbacks: the same log
    (lrs, losses, g), the same adapter, the same summary's rollbacks; the native log replays."""
    import subprocess

    from mobizo import divergence
    from mobizo.bundle import make_bundle
    from mobizo.native import build

    twitchy = dict(alpha=0.5, warmup=2, factor=1.0, margin=0.0, patience=3, lr_cut=0.5, max_rollbacks=3)
    flat = dict(FLAGS, queries=2, batch_size=2, max_length=16, steps=24, save_every=4, seed=1)
    bundle = make_bundle(TrainConfig.from_flat(**flat), tmp_path / "bundle")
    run = json.loads((bundle / "run.json").read_text())
    assert run["divergence"] == {"policy": "rollback", **divergence.constants()}
    run["divergence"].update(twitchy)
    (bundle / "run.json").write_text(json.dumps(run))
    r = subprocess.run(
        [str(build()), str(bundle), "--out", str(tmp_path / "native"), "--quiet"], capture_output=True, text=True
    )
    assert r.returncode in (0, 2), r.stderr
    native = json.loads((tmp_path / "native" / "summary.json").read_text())
    assert native["rollbacks"], "the twitchy constants should roll back at least once"
    for name, value in twitchy.items():
        monkeypatch.setattr(divergence, name.upper(), value)
    monkeypatch.setattr(trainer_module, "LR_CUT", twitchy["lr_cut"])
    monkeypatch.setattr(trainer_module, "MAX_ROLLBACKS", twitchy["max_rollbacks"])
    monkeypatch.setattr(trainer_module, "PATIENCE", twitchy["patience"])
    monkeypatch.setattr(trainer_module, "FACTOR", twitchy["factor"])
    cfg = TrainConfig.from_flat(**flat, engine="executorch", program=str(bundle), out=str(tmp_path / "py"))
    try:
        py = trainer_module.train(cfg)
    except MobizoError:
        py = json.loads((tmp_path / "py" / "summary.json").read_text())
    assert py["rollbacks"] == native["rollbacks"] and py["status"] == native["status"]

    def trajectory(d):
        lines = (d / "metrics.jsonl").read_text().splitlines()[1:]
        return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]

    assert trajectory(tmp_path / "py") == trajectory(tmp_path / "native")
    if native["status"] == "completed":
        a, b = read_adapter(tmp_path / "native" / "adapter")[0], read_adapter(tmp_path / "py" / "adapter")[0]
        assert all(torch.equal(a[k], b[k]) for k in a)
        replay(tmp_path / "native" / "metrics.jsonl", tmp_path / "re")
        re = read_adapter(tmp_path / "re")[0]
        assert max((re[k] - a[k]).abs().max().item() for k in a) <= 1e-5
