"""ZO update rules (mobizo.zo_optim): their math, the guard, bit-exact resume and replay, the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mobizo.checkpoint import load_checkpoint, read_adapter
from mobizo.cli import main
from mobizo.mplora import inject, lora_layers
from mobizo.step import ZOConfig, ZOStep
from mobizo.zo_optim import RULES

FAST = ["--model", "tiny", "--eval-every", "0", "--eval-examples", "8", "--batch-size", "4", "--queries", "2"]
FAST += ["--max-length", "32", "--train-examples", "64", "--no-progress", "--lr", "0.5", "--eps", "0.05"]
# each rule at a step size that moves the tiny model's B visibly in a few steps
LR = {"sgd": 0.5, "momentum": 0.2, "adam": 0.01, "sign": 0.01, "fzoo": 0.05, "hizoo": 0.5}


def cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    if rc != 0:
        assert [line.startswith("mobizo: error:") for line in err.splitlines()] == [True], err
    return rc, err


def _steps(model, batch, config: ZOConfig, n: int, lr: float = 0.5):
    step = ZOStep(model, config)
    outs = []
    with torch.no_grad():
        for s in range(1, n + 1):
            outs.append(
                step(
                    batch.input_ids,
                    batch.attention_mask,
                    batch.labels,
                    torch.tensor(s),
                    torch.tensor(lr),
                    torch.tensor(0.05),
                )
            )
    return step, outs


def _bs(model) -> dict:
    return {n: layer.lora_B.clone() for n, layer in lora_layers(model)}


def test_each_rule_is_its_formula(tiny, synthetic_batch):
    """One step of every rule from B = 0 against the formula written out by hand (the same noise)."""
    base, _ = tiny
    inject(base, None, 8, 16, 0)
    results = {}
    for name in RULES:
        model = __import__("copy").deepcopy(base)
        step, [(losses, g, *curv)] = _steps(model, synthetic_batch, ZOConfig(queries=2, optimizer=name), 1)
        zs = step.noise(torch.tensor(1))
        assert torch.isfinite(g).all() and torch.isfinite(losses).all()
        results[name] = (_bs(model), zs, g, curv)
    b_sgd, zs, g, _ = results["sgd"]
    for (n, b), z in zip(b_sgd.items(), zs):
        ghat = (g.reshape(-1, 1, 1) * z).mean(0)
        torch.testing.assert_close(b, -0.5 * ghat, rtol=0, atol=0)
        # heavy ball from m = 0: the first step is ZO-SGD's
        assert torch.equal(results["momentum"][0][n], b)
        # hizoo from h = 1: the same directions and step as ZO-SGD on its first step
        assert torch.equal(results["hizoo"][0][n], b)
        # sign: lr * sign(ĝ)
        assert torch.equal(results["sign"][0][n], -0.5 * torch.sign(ghat))
        # adam's first step: m̂ = ĝ, v̂ = ĝ², so lr * ĝ / (|ĝ| + 1e-8) (up to the float32 rounding of the
        # bias corrections 1 - beta^t: 1 - 0.999f is 1.3e-5 off 1e-3)
        torch.testing.assert_close(results["adam"][0][n], -0.5 * ghat / (ghat.abs() + 1e-8), rtol=2e-5, atol=1e-6)
        # fzoo: each projection divided by the rms of the step's projections
        gn = g / torch.sqrt((g * g).mean())
        torch.testing.assert_close(results["fzoo"][0][n], -0.5 * (gn.reshape(-1, 1, 1) * z).mean(0))
    # HiZOO returns its curvature scalars: |L+ + L- - 2 L0| / 2eps^2, L0 from the unperturbed copy
    (curv,) = results["hizoo"][3]
    assert curv.shape == (2,) and torch.isfinite(curv).all() and (curv >= 0).all()


def test_momentum_and_adam_state_follow_their_recurrences(tiny, synthetic_batch):
    base, _ = tiny
    inject(base, None, 8, 16, 0)
    model = __import__("copy").deepcopy(base)
    step, outs = _steps(model, synthetic_batch, ZOConfig(queries=2, optimizer="adam", beta1=0.8, beta2=0.9), 3)
    layer = lora_layers(model)[0][1]
    m = v = torch.zeros_like(layer.lora_B)
    for s, (_, g) in enumerate(outs, 1):
        z = step.noise(torch.tensor(s))[0]
        ghat = (g.reshape(-1, 1, 1) * z).mean(0)
        m, v = 0.8 * m + 0.2 * ghat, 0.9 * v + 0.1 * ghat * ghat
    torch.testing.assert_close(layer.zo_m, m)
    torch.testing.assert_close(layer.zo_v, v)
    assert float(layer.zo_t) == 3.0


def test_a_skipped_step_changes_neither_b_nor_the_state(tiny, synthetic_batch):
    base, _ = tiny
    inject(base, None, 8, 16, 0)
    for name in ("momentum", "adam", "hizoo"):
        model = __import__("copy").deepcopy(base)
        step, _ = _steps(model, synthetic_batch, ZOConfig(queries=2, optimizer=name), 2)
        before = {k: v.clone() for k, v in model.state_dict().items() if "lora_B" in k or ".zo_" in k}
        # a bound no projection meets: the in-graph guard rejects the step
        step.config = ZOConfig(queries=2, optimizer=name, max_grad=1e-12)
        with torch.no_grad():
            b = synthetic_batch
            step(b.input_ids, b.attention_mask, b.labels, torch.tensor(3), torch.tensor(0.5), torch.tensor(0.05))
        after = {k: v for k, v in model.state_dict().items() if k in before}
        assert all(torch.equal(before[k], after[k]) for k in before), name
        assert before and any(".zo_" in k for k in before)


@pytest.mark.parametrize("rule", ["momentum", "adam", "hizoo", "fzoo"])
def test_resume_and_replay_are_bit_exact(capsys, tmp_path, rule):
    # constant lr: the part run stops at --steps 4 and resumes to 8 (a decay would tie each lr to --steps)
    lr = ["--lr", LR[rule], "--optimizer", rule, "--lr-schedule", "constant"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert cli(capsys, "train", *FAST, *lr, "--steps", 8, "--save-every", 4, "--out", full)[0] == 0
    assert cli(capsys, "train", *FAST, *lr, "--steps", 4, "--save-every", 4, "--out", part)[0] == 0
    assert cli(capsys, "train", "--out", part, "--resume", "--steps", 8, "--no-progress")[0] == 0
    a, b = read_adapter(full / "adapter")[0], read_adapter(part / "adapter")[0]
    assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if k.endswith("lora_B"))
    # the rule's state is checkpointed (and restored: the resumed run would differ otherwise)
    *_, opt_full = load_checkpoint(full / "checkpoint")
    *_, opt_part = load_checkpoint(part / "checkpoint")
    if rule == "fzoo":
        assert opt_full is None and not (full / "checkpoint" / "zo_state.safetensors").exists()
    else:
        assert opt_full.keys() == opt_part.keys() and all(torch.equal(opt_full[k], opt_part[k]) for k in opt_full)
    # the log alone rebuilds the adapter, the rule's state with it
    assert cli(capsys, "replay", "--log", full / "metrics.jsonl", "--out", tmp_path / "re")[0] == 0
    r = read_adapter(tmp_path / "re")[0]
    assert all(torch.equal(a[k].view(torch.uint8), r[k].view(torch.uint8)) for k in a)
    recs = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()[1:]]
    assert all(("curvature" in rec) == (rule == "hizoo") for rec in recs)


def test_rule_errors(capsys, tmp_path):
    rc, err = cli(capsys, "train", *FAST, "--optimizer", "adamw", "--steps", 1, "--out", tmp_path / "a")
    assert rc == 2 and "first-order optimizer" in err and not (tmp_path / "a").exists()
    rc, err = cli(capsys, "train", *FAST, "--estimator", "fo", "--optimizer", "momentum", "--steps", 1)
    assert rc == 2 and "zeroth-order rule" in err
    rc, err = cli(capsys, "train", *FAST, "--optimizer", "adam", "--beta2", 1.0, "--steps", 1)
    assert rc == 2 and "--beta2 must be in [0, 1)" in err
    rc, err = cli(capsys, "train", *FAST, "--optimizer", "hizoo", "--data-mode", "split", "--steps", 1)
    assert rc == 2 and "--data-mode repeat" in err
    # resuming with another rule: refused, naming both
    out = tmp_path / "run"
    assert cli(capsys, "train", *FAST, "--optimizer", "momentum", "--steps", 2, "--out", out)[0] == 0
    rc, err = cli(capsys, "train", "--out", out, "--resume", "--optimizer", "adam", "--steps", 4)
    assert rc == 2 and "--optimizer momentum, not adam" in err
    # a corrupted optimizer state: one line, nothing written
    state = Path(out / "checkpoint" / "zo_state.safetensors")
    data = bytearray(state.read_bytes())
    data[-3] ^= 0xFF
    state.write_bytes(bytes(data))
    before = (out / "metrics.jsonl").read_bytes()
    rc, err = cli(capsys, "train", "--out", out, "--resume", "--steps", 4)
    assert rc == 2 and "zo_state.safetensors" in err and "checksum" in err
    assert (out / "metrics.jsonl").read_bytes() == before


def test_non_finite_optimizer_state_is_refused(capsys, tmp_path):
    from safetensors.torch import load_file, save_file

    from mobizo.checkpoint import tensors_sha256, write_sums

    out = tmp_path / "run"
    assert cli(capsys, "train", *FAST, "--optimizer", "adam", "--lr", 0.01, "--steps", 2, "--out", out)[0] == 0
    path = out / "checkpoint" / "zo_state.safetensors"
    state = load_file(str(path))
    key = next(k for k in state if k.endswith("zo_v"))
    state[key][0, 0] = float("nan")
    save_file(state, str(path), metadata={"format": "pt", "sha256": tensors_sha256(state)})  # a valid checksum
    write_sums(path.parent)  # and the checkpoint's SHA256SUMS over the new bytes: only the values are wrong
    rc, err = cli(capsys, "train", "--out", out, "--resume", "--steps", 4)
    assert rc == 2 and "non-finite" in err and key in err


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["momentum", "adam", "sign", "fzoo", "hizoo"])
def test_eager_executorch_and_native_follow_one_trajectory(tmp_path, rule):
    """Each rule's update is in-graph: the native trainer equals the Python ExecuTorch engine bitwise on one
    bundle (losses, g, curvature, B, the rule's state), resumes bit for bit, its log replays; the program
    follows the eager step on the same batches (float rounding apart)."""
    import subprocess

    from mobizo.build import assemble
    from mobizo.bundle import gather, make_bundle, read_bundle
    from mobizo.config import TrainConfig
    from mobizo.engines.eager import EagerEngine
    from mobizo.engines.executorch import ExecuTorchEngine
    from mobizo.mplora import adapter_state
    from mobizo.native import build
    from mobizo.replay import replay

    flat = dict(model="tiny", task="synthetic", queries=2, batch_size=2, max_length=16, eval_examples=8, seed=3)
    # a constant lr: the Python engine and eager below are driven at LR[rule] on every step
    flat.update(optimizer=rule, lr=LR[rule], lr_schedule="constant", eps=0.05, steps=6, save_every=3, progress=False)
    cfg = TrainConfig.from_flat(**flat)
    bundle = make_bundle(cfg, tmp_path / "bundle")
    exe = build()

    def native(out, *args):
        r = subprocess.run([str(exe), str(bundle), "--out", str(out), "--quiet", *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()[1:]]

    recs = native(tmp_path / "native")
    # the Python engine on the same program and rows, and eager on the same rows
    b = read_bundle(bundle)
    et = ExecuTorchEngine(bundle, fixed_length=True)
    run = assemble(cfg)
    eager = EagerEngine(run.model, "prge", run.zo_config())
    for s, rec in enumerate(recs, 1):
        batch = gather(b, s)
        a, e = et.train_step(batch, s, LR[rule], 0.05), eager.train_step(batch, s, LR[rule], 0.05)
        assert rec["projected_grads"] == a.projected_grads and rec["loss"] == a.loss  # bitwise, through JSON
        assert rec.get("curvature") == a.extra.get("curvature")
        assert abs(a.loss - e.loss) <= 1e-4 * abs(e.loss)
    native_b = read_adapter(tmp_path / "native" / "adapter")[0]
    ours = {f"{k}": v for k, v in et.adapter_state().items()}
    assert all(torch.equal(native_b[k], ours[k]) for k in ours)
    assert max((ours[k] - v).abs().max().item() for k, v in adapter_state(run.model).items()) <= 1e-5
    assert max(v.abs().max().item() for k, v in ours.items() if k.endswith("lora_B")) > 1e-3  # it moved
    *_, native_state = load_checkpoint(tmp_path / "native" / "checkpoint")
    if et.optimizer_state() is not None:
        assert all(torch.equal(native_state[k], v) for k, v in et.optimizer_state().items())
        eager_state = eager.optimizer_state()
        assert max((native_state[k] - v).abs().max().item() for k, v in eager_state.items()) <= 1e-4
    else:
        assert native_state is None
    # interrupted at the step-3 checkpoint and resumed: byte for byte
    native(tmp_path / "part", "--steps", "3")
    native(tmp_path / "part", "--resume")
    part = read_adapter(tmp_path / "part" / "adapter")[0]
    assert all(torch.equal(part[k], native_b[k]) for k in part)
    # the native log replays (the update re-run eagerly: float rounding apart)
    replay(tmp_path / "native" / "metrics.jsonl", tmp_path / "re")
    re = read_adapter(tmp_path / "re")[0]
    assert max((re[k] - native_b[k]).abs().max().item() for k in re) <= 1e-5


def test_lr_auto_probes_and_logs_its_choice(capsys, tmp_path):
    """--lr auto trains a few steps at each candidate from the same start, keeps the lowest validation loss,
    restores the adapter, and the run continues with the chosen lr (in the log, the checkpoint and resume)."""
    from mobizo.trainer import PROBE_FACTORS
    from mobizo.zo_optim import DEFAULT_LR

    out = tmp_path / "run"
    rc, err = cli(
        capsys,
        "train",
        *FAST[:-4],
        "--lr",
        "auto",
        "--optimizer",
        "momentum",
        "--steps",
        3,
        "--out",
        out,
        "--eps",
        0.05,
    )
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    table = summary["lr_probe"]
    assert [t["lr"] for t in table[1:]] == [float(f"{DEFAULT_LR['momentum'] * f:.3g}") for f in PROBE_FACTORS]
    better = [t for t in table[1:] if t["loss"] is not None and t["loss"] < table[0]["loss"]]
    want = min(better, key=lambda t: (t["loss"], -t["lr"]))["lr"] if better else table[1]["lr"]
    assert summary["config"]["lr"] == want
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["config"]["lr"] == want and all(r["lr"] == want for r in recs[1:])
    # the probe left no trace on the adapter: the run equals a run started at the chosen lr
    plain = tmp_path / "plain"
    assert (
        cli(
            capsys,
            "train",
            *FAST[:-4],
            "--lr",
            want,
            "--optimizer",
            "momentum",
            "--steps",
            3,
            "--out",
            plain,
            "--eps",
            0.05,
        )[0]
        == 0
    )
    a, b = read_adapter(out / "adapter")[0], read_adapter(plain / "adapter")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    rc, err = cli(capsys, "train", "--out", out, "--resume", "--lr", "auto", "--steps", 4)
    assert rc == 2 and "a resumed run keeps its own" in err
    rc, err = cli(capsys, "bundle", "--lr", "auto", "--out", tmp_path / "b")
    assert rc == 2 and "--lr auto probes" in err and not (tmp_path / "b").exists()


def test_the_defaults_are_written_out_and_replay(capsys, tmp_path):
    """No --optimizer, --lr or --lr-schedule: the run is fzoo at 3e-2 decayed by a cosine over --steps, and
    its log header, checkpoint and summary say so (a later change of defaults cannot change what --resume or
    replay does); each step's logged lr follows the cosine, and the log replays to the adapter bit for bit.
    ZO-SGD's own defaults are 1e-2 at a constant lr. A decayed run's --steps is kept on --resume."""
    from mobizo.checkpoint import read_state
    from mobizo.schedule import lr_at

    base = FAST[: FAST.index("--lr")]  # FAST without its --lr / --eps
    out, sgd = tmp_path / "default", tmp_path / "sgd"
    assert cli(capsys, "train", *base, "--steps", 4, "--save-every", 2, "--out", out)[0] == 0
    assert cli(capsys, "train", *base, "--steps", 2, "--optimizer", "sgd", "--out", sgd)[0] == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    saved = [
        json.loads(lines[0])["config"],
        read_state(out / "checkpoint")["config"],
        json.loads((out / "summary.json").read_text())["config"],
    ]
    assert all((c["optimizer"], c["lr"], c["lr_schedule"]) == ("fzoo", 0.03, "cosine") for c in saved)
    lrs = [json.loads(line)["lr"] for line in lines[1:] if "step" in json.loads(line)]
    assert lrs == [lr_at(s, 0.03, 4, "cosine") for s in range(1, 5)] and lrs[0] > lrs[-1]
    assert cli(capsys, "replay", "--log", out / "metrics.jsonl", "--out", tmp_path / "re")[0] == 0
    a, r = read_adapter(out / "adapter")[0], read_adapter(tmp_path / "re")[0]
    assert all(torch.equal(a[k].view(torch.uint8), r[k].view(torch.uint8)) for k in a)
    header = json.loads((sgd / "metrics.jsonl").read_text().splitlines()[0])["config"]
    assert (header["optimizer"], header["lr"], header["lr_schedule"]) == ("sgd", 0.01, "constant")
    rc, err = cli(capsys, "train", "--out", out, "--resume", "--steps", 8, "--no-progress")
    assert rc == 2 and "with --lr-schedule cosine --steps shapes every step's lr" in err


def test_the_flags_help_states_the_defaults_zo_optim_holds():
    """config stays free of torch, so the --lr / --optimizer / --lr-schedule help spells the defaults out:
    it must say what zo_optim holds."""
    from mobizo.config import FIELDS
    from mobizo.zo_optim import DEFAULT_LR, DEFAULT_RULE, DEFAULT_SCHEDULE, FO_DEFAULT_LR

    lr_help = FIELDS["lr"].metadata["help"]
    assert all(f"{rule} {lr:g}" in lr_help for rule, lr in DEFAULT_LR.items())
    assert f"fo: sgd {FO_DEFAULT_LR['sgd']:g}, adamw {FO_DEFAULT_LR['adamw']:g}" in lr_help
    assert f"{DEFAULT_RULE} (default" in FIELDS["optimizer"].metadata["help"]
    schedule_help = FIELDS["lr_schedule"].metadata["help"]
    assert all(f"{schedule} for {rule}" in schedule_help for rule, schedule in DEFAULT_SCHEDULE.items())
