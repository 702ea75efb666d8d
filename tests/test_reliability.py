"""Replay from the log, the divergence guard, corrupted checkpoints, atomic writes, safe loading, --out checks."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _checkpoints import legacy_checkpoint

from mobizo.checkpoint import (
    CONFIG,
    OPTIMIZER,
    ROLLBACK,
    STATE,
    SUMS,
    WEIGHTS,
    ZO_STATE,
    load_checkpoint,
    read_adapter,
    save_adapter,
    save_checkpoint,
)
from mobizo.cli import main
from mobizo.errors import MobizoError
from mobizo.fsio import atomic_write_dir, clean_stale, resolve_dir

SRC = Path(__file__).resolve().parents[1] / "src"
FAST = [
    "--model",
    "tiny",
    "--eval-every",
    "0",
    "--eval-examples",
    "8",
    "--batch-size",
    "4",
    "--queries",
    "2",
    "--max-length",
    "32",
    "--train-examples",
    "64",
    "--no-progress",
]


def run_cli(capsys, *argv) -> tuple[int, str]:
    """main(argv) in-process: (exit code, stderr); asserts errors are single 'mobizo: error:' lines."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    if rc != 0:
        lines = [line for line in err.splitlines() if line.startswith("mobizo: error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
    return rc, err


def train(capsys, out, *extra) -> tuple[int, str]:
    """A run in ``out``: ZO-SGD unless ``extra`` names a rule (a resumed run keeps its own)."""
    rule = [] if {"--optimizer", "--resume"} & set(extra) else ["--optimizer", "sgd"]
    return run_cli(capsys, "train", *FAST, *rule, "--out", out, *extra)


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[1:]]


def b_norm(state: dict) -> float:
    return float(sum(v.abs().sum() for k, v in state.items() if k.endswith("lora_B")))


# ---------------------------------------------------------------- replay


@pytest.mark.parametrize(
    "extra",
    [
        ["--estimator", "prge"],
        ["--estimator", "mezo", "--queries", "1", "--seed", "5"],
        ["--estimator", "prge-outer", "--weight-decay", "0.1", "--data-mode", "split"],
    ],
    ids=["prge", "mezo", "prge-outer-wd"],
)
def test_replay_rebuilds_the_trained_adapter_bitwise(capsys, tmp_path, extra):
    out = tmp_path / "run"
    assert train(capsys, out, "--steps", "15", "--save-every", "4", "--lr", "0.05", "--eps", "0.01", *extra)[0] == 0
    rc, _ = run_cli(capsys, "replay", "--model", "tiny", "--log", out / "metrics.jsonl", "--out", tmp_path / "re")
    assert rc == 0
    trained, _ = read_adapter(out / "adapter")
    replayed, _cfg = read_adapter(tmp_path / "re", require_checksum=True)
    assert b_norm(trained) > 0 and same_bits(trained, replayed)
    # a prefix of the log rebuilds an intermediate state: the last checkpoint's is the final one here
    rc, _ = run_cli(
        capsys, "replay", "--log", out / "metrics.jsonl", "--out", tmp_path / "re", "--overwrite", "--steps", "15"
    )
    assert rc == 0 and same_bits(trained, read_adapter(tmp_path / "re")[0])


def test_replay_after_resume_and_skipped_steps(capsys, tmp_path):
    """Skipped steps (|g| > --max-grad) are not applied; a resumed run's log still replays exactly."""
    out = tmp_path / "run"
    args = ["--lr", "0.05", "--eps", "0.01", "--max-grad", "0.3", "--max-bad-steps", "1000", "--save-every", "5"]
    assert train(capsys, out, "--steps", "12", *args)[0] == 0
    assert train(capsys, out, "--steps", "30", "--resume")[0] == 0
    recs = records(out)
    assert [r["step"] for r in recs] == list(range(1, 31))
    skipped = [r["step"] for r in recs if r.get("skipped")]
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < len(skipped) < 30 and summary["skipped_steps"] == len(skipped)
    assert all(any(abs(g) > 0.3 for g in r["projected_grads"]) for r in recs if r.get("skipped"))
    assert run_cli(capsys, "replay", "--log", out / "metrics.jsonl", "--out", tmp_path / "re")[0] == 0
    assert same_bits(read_adapter(out / "adapter")[0], read_adapter(tmp_path / "re")[0])


def test_replay_rejects_bad_logs(capsys, tmp_path):
    out = tmp_path / "run"
    assert train(capsys, out, "--steps", "6", "--save-every", "0")[0] == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    log = tmp_path / "m.jsonl"

    def replay_err(text: str) -> str:
        log.write_text(text)
        shutil.rmtree(tmp_path / "re", ignore_errors=True)
        rc, err = run_cli(capsys, "replay", "--log", log, "--out", tmp_path / "re")
        assert rc == 2
        return err

    assert "gap" in replay_err("\n".join(lines[:3] + lines[4:]) + "\n")
    assert "header" in replay_err("\n".join(lines[1:]) + "\n")
    assert "malformed JSON" in replay_err("\n".join(lines[:2] + ["{oops"] + lines[2:]) + "\n")
    assert "--queries" in replay_err(
        "\n".join(lines[:2] + [lines[2].replace('"projected_grads": [', '"projected_grads": [1.0, ')]) + "\n"
    )
    # a last line cut by a kill (no newline) was never applied: replay ignores it
    log.write_text("\n".join(lines) + "\n" + lines[-1][:20])
    assert run_cli(capsys, "replay", "--log", log, "--out", tmp_path / "ok")[0] == 0
    # the first-order baseline logs no projected gradients
    fo = tmp_path / "fo"
    assert train(capsys, fo, "--steps", "2", "--estimator", "fo", "--save-every", "0")[0] == 0
    rc, err = run_cli(capsys, "replay", "--log", fo / "metrics.jsonl", "--out", tmp_path / "re2")
    assert rc == 2 and "zeroth-order" in err
    # an existing non-empty --out is refused
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    rc, err = run_cli(capsys, "replay", "--log", out / "metrics.jsonl", "--out", tmp_path / "busy")
    assert rc == 2 and "not empty" in err


# ---------------------------------------------------------------- divergence guard


@pytest.mark.parametrize(
    "flags,why",
    [
        (["--eps", "3e38"], "non-finite losses"),  # B +- eps z overflows: NaN losses
        (["--lr", "1e300"], "an update that overflows B"),  # finite losses, the float32 update is inf
        (["--max-grad", "1e-9"], "|g| above --max-grad"),
    ],
)
def test_guard_skips_counts_and_stops_keeping_the_last_good_checkpoint(capsys, tmp_path, flags, why):
    out = tmp_path / "run"
    rc, err = train(capsys, out, "--steps", "20", "--save-every", "2", "--max-bad-steps", "3", *flags)
    assert rc == 2, why
    assert "training stopped at step 3: 3 consecutive bad steps" in err and "last good checkpoint: step 0" in err
    recs = records(out)
    assert [r["step"] for r in recs] == [1, 2, 3] and all(r["skipped"] for r in recs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["skipped_steps"] == 3 and summary["last_checkpoint_step"] == 0
    assert not (out / "adapter").exists()  # no final adapter from a diverged run
    # the checkpoint is intact: step 0 (none written inside the bad streak), B untouched by the skipped steps
    adapter, _, state, _ = load_checkpoint(out / "checkpoint")
    assert state["step"] == 0 and b_norm(adapter) == 0.0
    # ... and resumable with saner settings (lr / eps / max-grad may change on resume)
    rc, err = train(capsys, out, "--steps", "8", "--resume", "--lr", "0.01", "--eps", "0.01", "--max-grad", "1e6")
    assert rc == 0 and "resuming with" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["skipped_steps"] == 0
    assert [r["step"] for r in records(out)] == list(range(1, 9))
    assert run_cli(capsys, "replay", "--log", out / "metrics.jsonl", "--out", tmp_path / "re")[0] == 0
    assert same_bits(read_adapter(out / "adapter")[0], read_adapter(tmp_path / "re")[0])


def test_guard_counts_survive_a_resume(capsys, tmp_path):
    out = tmp_path / "run"
    args = ["--lr", "0.05", "--eps", "0.01", "--max-grad", "0.3", "--max-bad-steps", "1000", "--save-every", "4"]
    assert train(capsys, out, "--steps", "20", *args)[0] == 0
    full = json.loads((out / "summary.json").read_text())["skipped_steps"]
    out2 = tmp_path / "run2"
    assert train(capsys, out2, "--steps", "10", *args)[0] == 0
    assert train(capsys, out2, "--steps", "20", "--resume")[0] == 0
    assert json.loads((out2 / "summary.json").read_text())["skipped_steps"] == full > 0


def test_bare_resume_continues_with_the_saved_flags(capsys, tmp_path):
    """`mobizo train --resume --out DIR` alone finishes an interrupted run as it was started."""
    from mobizo.config import TrainConfig
    from mobizo.trainer import train as train_api

    class Killed(BaseException):
        pass

    def die_at_6(step, rec):
        if step == 6:
            raise Killed()

    out = tmp_path / "run"
    cfg = TrainConfig.from_flat(
        steps=9,
        save_every=4,
        lr=0.05,
        max_bad_steps=7,
        batch_size=4,
        queries=2,
        max_length=32,
        eval_every=0,
        eval_examples=8,
        train_examples=64,
        out=str(out),
        progress=False,
    )
    with pytest.raises(Killed):
        train_api(cfg, on_step=die_at_6)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 4
    assert run_cli(capsys, "train", "--resume", "--out", out, "--no-progress")[0] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_step"] == 9 and summary["config"]["lr"] == 0.05 and summary["config"]["batch_size"] == 4
    assert json.loads((out / "checkpoint" / "state.json").read_text())["settings"]["max_bad_steps"] == 7
    assert [r["step"] for r in records(out)] == list(range(1, 10))


def test_resume_refuses_trajectory_changes(capsys, tmp_path):
    out = tmp_path / "run"
    assert train(capsys, out, "--steps", "3", "--save-every", "0")[0] == 0
    rc, err = train(capsys, out, "--steps", "6", "--resume", "--queries", "4")
    assert rc == 2 and "--queries" in err


# ---------------------------------------------------------------- corrupted / half-written checkpoints


@pytest.fixture
def ckpt_run(capsys, tmp_path):
    out = tmp_path / "run"
    assert train(capsys, out, "--steps", "6", "--save-every", "3")[0] == 0
    return out


def _resume(capsys, out):
    return train(capsys, out, "--steps", "8", "--resume")


def test_truncated_checkpoint_errors_clearly(capsys, ckpt_run):
    w = ckpt_run / "checkpoint" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    rc, err = _resume(capsys, ckpt_run)
    assert rc == 2 and "cannot resume" in err and "unreadable safetensors" in err and "mobizo replay" in err


def test_bit_flip_in_checkpoint_is_caught_by_the_checksum(capsys, ckpt_run):
    w = ckpt_run / "checkpoint" / "adapter_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0x01
    w.write_bytes(bytes(data))
    rc, err = _resume(capsys, ckpt_run)
    assert rc == 2 and "checksum mismatch" in err


@pytest.mark.parametrize(
    "text", ["", "{", "[]", '{"step": -1}', '{"step": "3", "config": {}}', '{"step": 3, "config": 7}']
)
def test_bad_state_json_errors_clearly(capsys, ckpt_run, text):
    (ckpt_run / "checkpoint" / "state.json").write_text(text)
    rc, err = _resume(capsys, ckpt_run)
    assert rc == 2 and "state" in err


def test_edited_state_json_is_caught_by_its_checksum(capsys, ckpt_run):
    path = ckpt_run / "checkpoint" / "state.json"
    path.write_text(path.read_text().replace('"seed": 0', '"seed": 1'))
    rc, err = _resume(capsys, ckpt_run)
    assert rc == 2 and "state.json: checksum mismatch" in err


def test_edited_adapter_config_is_caught(capsys, ckpt_run):
    cfg_path = ckpt_run / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "lora_alpha": 32.0}))
    with pytest.raises(MobizoError, match="lora_alpha"):
        read_adapter(ckpt_run / "adapter")
    cfg_path.write_text(json.dumps({**cfg, "r": 4}))
    with pytest.raises(MobizoError, match="r=4"):
        read_adapter(ckpt_run / "adapter")
    cfg_path.write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(MobizoError, match="use_dora"):
        read_adapter(ckpt_run / "adapter")


def test_adapter_config_naming_other_modules_is_refused(capsys, ckpt_run):
    """target_modules k_proj,o_proj on q/v tensors: PEFT would ignore the tensors; eval used to load them."""
    cfg_path = ckpt_run / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    for accepted in (cfg["target_modules"], ["q_proj", "v_proj"], ["self_attn.q_proj", "v_proj"], r".*\.[qv]_proj"):
        cfg_path.write_text(json.dumps({**cfg, "target_modules": accepted}))
        read_adapter(ckpt_run / "adapter")
    cfg_path.write_text(json.dumps({**cfg, "target_modules": ["k_proj", "o_proj"]}))
    rc, err = run_cli(capsys, "eval", "--adapter", ckpt_run / "adapter", "--eval-examples", "4", "--no-progress")
    assert rc == 2
    assert err.strip() == (
        f"mobizo: error: {cfg_path}: target_modules names k_proj, o_proj, but the weights adapt q_proj, v_proj "
        "(mismatched files: PEFT would ignore those tensors)"
    )
    for refused in (["q_proj"], r".*\.k_proj", "[unclosed", 7):
        cfg_path.write_text(json.dumps({**cfg, "target_modules": refused}))
        with pytest.raises(MobizoError, match="target_modules"):
            read_adapter(ckpt_run / "adapter")


def test_optimizer_state_checksum(capsys, tmp_path):
    out = tmp_path / "fo"
    assert train(capsys, out, "--steps", "3", "--estimator", "fo", "--optimizer", "adamw", "--save-every", "0")[0] == 0
    assert load_checkpoint(out / "checkpoint")[3] is not None
    opt = out / "checkpoint" / "optimizer.pt"
    data = bytearray(opt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    opt.write_bytes(bytes(data))
    rc, err = _resume(capsys, out)
    assert rc == 2 and "optimizer.pt: checksum mismatch" in err


HINT = " (rebuild the adapter from metrics.jsonl with `mobizo replay`, or start again with --overwrite)"


@pytest.fixture(scope="module")
def full_checkpoints(tmp_path_factory):
    """Checkpoints holding every kind of file: a ZO rule's state and a rollback point; an FO optimizer."""
    adapter = {"m.lora_A": torch.randn(2, 3), "m.lora_B": torch.randn(4, 2)}
    rollback = {"adapter.m.lora_A": adapter["m.lora_A"], "adapter.m.lora_B": torch.zeros(4, 2)}
    state = {"step": 5, "config": {"seed": 1}, "skipped_steps": 1, "rollback": {"step": 3}}
    d = tmp_path_factory.mktemp("ck")
    save_checkpoint(d / "zo", adapter, 2, 4.0, "tiny", state, {"m.m": torch.ones(4, 2)}, False, rollback)
    fo = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(4)}}, "param_groups": [{"params": [0]}]}
    save_checkpoint(d / "fo", adapter, 2, 4.0, "tiny", state, fo, False)
    return d


def test_checkpoint_sums_list_every_file_and_sha256sum_checks_them(ckpt_run, full_checkpoints):
    for ck, files in (
        (ckpt_run / "checkpoint", [CONFIG, WEIGHTS, ROLLBACK, STATE]),  # (the rollback point: step 3's)
        (full_checkpoints / "zo", [CONFIG, WEIGHTS, ROLLBACK, STATE, ZO_STATE]),
        (full_checkpoints / "fo", [CONFIG, WEIGHTS, OPTIMIZER, STATE]),
    ):
        assert sorted(p.name for p in ck.iterdir()) == sorted([*files, SUMS])
        lines = (ck / SUMS).read_text().splitlines()
        assert [line[66:] for line in lines] == sorted(files) and all(line[64:66] == "  " for line in lines)
        state = json.loads((ck / STATE).read_text())
        assert state["checkpoint_format"] == 2 and "sha256" not in state  # no canonical-JSON checksum any more
        p = subprocess.run(["sha256sum", "--check", "--strict", SUMS], cwd=ck, capture_output=True, text=True)
        assert p.returncode == 0 and p.stdout.count(": OK") == len(files), p.stdout + p.stderr
        load_checkpoint(ck)


def _flip(path: Path) -> None:
    """One bit changed where the file's own checks cannot see it: the base model's name or a digit of a JSON
    file (still valid JSON), a data byte of another file."""
    data = bytearray(path.read_bytes())
    i = len(data) - 3
    if path.suffix == ".json":
        i = data.index(b'"tiny"') + 1 if b'"tiny"' in data else [m.start() for m in re.finditer(rb"[1-9]", data)][-1]
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "kind, name",
    [("zo", n) for n in (STATE, CONFIG, WEIGHTS, ZO_STATE, ROLLBACK)] + [("fo", OPTIMIZER)],
)
def test_a_flipped_bit_in_any_listed_file_is_one_line_naming_it(full_checkpoints, tmp_path, kind, name):
    ck = tmp_path / "checkpoint"
    shutil.copytree(full_checkpoints / kind, ck)
    _flip(ck / name)
    with pytest.raises(MobizoError) as e:
        load_checkpoint(ck)
    assert str(e.value) == f"cannot resume: {ck / name}: checksum mismatch (the file is corrupted){HINT}"


def test_a_damaged_sums_file_is_one_line(full_checkpoints, tmp_path):
    src = full_checkpoints / "zo"
    text = (src / SUMS).read_text()
    first = text.splitlines(True)[0]  # adapter_config.json's line
    other = "0" if text[0] != "0" else "1"
    cases = {  # SHA256SUMS as damaged -> the error
        text.replace(text.splitlines(True)[-1], ""): f"{SUMS}: {ZO_STATE} is not listed (the file is corrupted)",
        other + text[1:]: f"{CONFIG}: checksum mismatch (the file is corrupted)",
        "x" + text[1:]: f"{SUMS}: malformed line 1 (the file is corrupted)",
        text.replace(first, first.replace("  ", " /")): f"{SUMS}: malformed line 1 (the file is corrupted)",
        text + first: f"{SUMS}: malformed line 6 (the file is corrupted)",
        text[:-5]: f"{SUMS}: truncated (the file is corrupted)",
        "": f"{SUMS}: truncated (the file is corrupted)",
    }
    for k, (damaged, want) in enumerate(cases.items()):
        ck = tmp_path / str(k) / "checkpoint"
        shutil.copytree(src, ck)
        (ck / SUMS).write_text(damaged)
        with pytest.raises(MobizoError) as e:
            load_checkpoint(ck)
        assert str(e.value) == f"cannot resume: {ck}/{want}{HINT}", damaged
    # a listed file deleted; SHA256SUMS deleted from a format-2 checkpoint
    ck = tmp_path / "deleted" / "checkpoint"
    shutil.copytree(src, ck)
    (ck / ROLLBACK).unlink()
    with pytest.raises(MobizoError, match=re.escape(f"{ck / ROLLBACK}: missing")):
        load_checkpoint(ck)
    (ck / SUMS).unlink()
    with pytest.raises(MobizoError, match=re.escape(f"cannot resume: {ck / SUMS}: missing{HINT}")):
        load_checkpoint(ck)


def test_legacy_checkpoint_resumes_bit_exactly(capsys, tmp_path):
    """A format-1 checkpoint (canonical-JSON sha256 inside state.json, no SHA256SUMS) resumes, and is verified."""
    args = ("--save-every", "3", "--lr", "2.0")
    assert train(capsys, tmp_path / "full", "--steps", "8", *args)[0] == 0
    part = tmp_path / "part"
    assert train(capsys, part, "--steps", "6", *args)[0] == 0
    legacy_checkpoint(part / "checkpoint")
    saved = tmp_path / "legacy"
    shutil.copytree(part / "checkpoint", saved)
    assert not (saved / SUMS).exists() and "sha256" in json.loads((saved / STATE).read_text())
    assert load_checkpoint(saved)[2]["step"] == 6
    assert _resume(capsys, part)[0] == 0  # to step 8
    for f in ("adapter/adapter_model.safetensors", "checkpoint/adapter_model.safetensors"):
        assert (part / f).read_bytes() == (tmp_path / "full" / f).read_bytes(), f

    def steps(run: Path) -> list[tuple]:  # (without the end-of-run eval the shorter run logged at step 6)
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()[1:]]
        return [(r["step"], r["loss"], r["projected_grads"], r["lr"]) for r in recs]

    assert steps(part) == steps(tmp_path / "full") and len(steps(part)) == 8
    assert (part / "checkpoint" / SUMS).is_file()  # the next checkpoint is written in format 2
    # the legacy checksum is still checked
    path = saved / STATE
    path.write_text(path.read_text().replace('"skipped_steps": 0', '"skipped_steps": 1'))
    with pytest.raises(MobizoError, match=re.escape(f"{path}: checksum mismatch (the file is corrupted)")):
        load_checkpoint(saved)


def test_checkpoint_format_newer_than_this_mobizo_is_refused(full_checkpoints, tmp_path):
    ck = tmp_path / "checkpoint"
    shutil.copytree(full_checkpoints / "zo", ck)
    state = json.loads((ck / STATE).read_text())
    (ck / STATE).write_text(json.dumps({**state, "checkpoint_format": 3}))
    from mobizo.checkpoint import write_sums

    write_sums(ck)
    with pytest.raises(MobizoError, match=re.escape("checkpoint format 3 is newer than this mobizo reads (2)")):
        load_checkpoint(ck)


def test_resume_uses_the_old_twin_after_a_kill_between_the_renames(capsys, ckpt_run):
    ck = ckpt_run / "checkpoint"
    os.replace(ck, ckpt_run / ".checkpoint.old")  # the state right after the first rename of a swap
    (ckpt_run / ".checkpoint.tmp-abc").mkdir()  # and a half-written new version
    (ckpt_run / ".checkpoint.tmp-abc" / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    assert resolve_dir(ck) == ckpt_run / ".checkpoint.old"
    assert _resume(capsys, ckpt_run)[0] == 0
    assert sorted(p.name for p in ckpt_run.iterdir()) == [
        ".mobizo",
        "adapter",
        "best",
        "checkpoint",
        "metrics.jsonl",
        "summary.json",
    ]


def test_atomic_write_dir_never_exposes_a_partial_version(tmp_path):
    state = {"m.lora_A": torch.ones(2, 3), "m.lora_B": torch.zeros(4, 2)}
    target = tmp_path / "adapter"
    save_adapter(target, state, 2, 4.0, "tiny")

    def failing(d: Path) -> None:
        (d / "adapter_config.json").write_text("{}")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write_dir(target, failing)
    assert read_adapter(target)[0].keys() == state.keys()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # the failed version was removed
    # stale scratch and an obsolete .old twin are cleaned; a needed .old twin is kept
    (tmp_path / ".adapter.tmp-x").mkdir()
    (tmp_path / ".adapter.old").mkdir()
    (tmp_path / ".summary.json.tmp-y").write_text("{")
    (tmp_path / ".checkpoint.old").mkdir()
    assert sorted(clean_stale(tmp_path)) == [".adapter.old", ".adapter.tmp-x", ".summary.json.tmp-y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint.old", "adapter"]


def test_files_get_ordinary_permissions(ckpt_run):
    mode = (ckpt_run / "adapter" / "adapter_model.safetensors").stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


# ---------------------------------------------------------------- output paths


def test_out_validation(capsys, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("precious")
    rc, err = train(capsys, f, "--steps", "2")
    assert rc == 2 and "is not a directory" in err
    rc, err = train(capsys, f / "sub", "--steps", "2")
    assert rc == 2 and "cannot create --out" in err
    # a non-empty --out is refused without --resume / --overwrite, and left untouched
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    rc, err = train(capsys, d, "--steps", "2")
    assert rc == 2 and "is not empty" in err
    # --overwrite only replaces a directory that carries mobizo's marker, even one with a summary.json
    (d / "summary.json").write_text("{}")
    rc, err = train(capsys, d, "--steps", "2", "--overwrite")
    assert rc == 2 and "is not a mobizo run directory" in err and "not deleting anything" in err
    assert (d / "notes.txt").read_text() == "keep me" and (d / "summary.json").read_text() == "{}"
    rc, err = train(capsys, tmp_path / "empty", "--steps", "2", "--resume")
    assert rc == 2 and "no checkpoint" in err
    run = tmp_path / "run"
    assert train(capsys, run, "--steps", "2", "--save-every", "0")[0] == 0
    first = (run / "metrics.jsonl").read_text()
    (run / "notes.txt").write_text("mine")  # a user's file inside a run directory survives --overwrite
    (run / "best").mkdir(exist_ok=True)
    assert train(capsys, run, "--steps", "3", "--save-every", "0", "--overwrite")[0] == 0
    assert (run / "notes.txt").read_text() == "mine"
    assert (run / "metrics.jsonl").read_text() != first and json.loads((run / "summary.json").read_text())[
        "final_step"
    ] == 3
    rc, err = train(capsys, run, "--steps", "3", "--resume", "--overwrite")
    assert rc == 2 and "exclude each other" in err


def test_unwritable_out(capsys, tmp_path, monkeypatch):
    import mobizo.rundir as trainer

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(trainer.os, "access", lambda p, m: False if Path(p) == locked else real(p, m))
    rc, err = train(capsys, locked / "run", "--steps", "2")
    assert rc == 2 and "is not writable" in err
    rc, err = train(capsys, locked, "--steps", "2")
    assert rc == 2 and "is not writable" in err


# ---------------------------------------------------------------- safe loading


def _train_with_file_limit(out: Path, limit: int, *extra) -> subprocess.CompletedProcess:
    """`mobizo train` in a process whose files may not grow past ``limit`` bytes: a full disk, for one file."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mobizo", "train", *FAST, "--save-every", "0", "--out", str(out), *extra],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_a_full_disk_names_the_file_and_leaves_no_torn_line(capsys, tmp_path):
    """metrics.jsonl used to be left cut mid-line at the limit (16,384 bytes) with `mobizo: error: File too
    large`, naming no file."""
    out = tmp_path / "run"
    p = _train_with_file_limit(out, 16384, "--steps", "150")
    assert p.returncode == 2
    assert p.stderr == (
        f"mobizo: error: cannot write {out}/metrics.jsonl: File too large (the log keeps every whole line; "
        "free space and resume with --resume)\n"
    )
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("\n") and 15000 < len(text) < 16384
    records = [json.loads(line) for line in text.splitlines()]  # every line whole, strict JSON
    assert [r["step"] for r in records[1:]] == list(range(1, len(records)))
    rc, _ = train(capsys, out, "--steps", "150", "--save-every", "0", "--resume")  # with room again
    assert rc == 0 and [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()[1:]] == [
        *range(1, 151)
    ]
    # a checkpoint that cannot be written: named, and no scratch left behind
    out = tmp_path / "small"
    p = _train_with_file_limit(out, 8192, "--steps", "3")
    assert p.returncode == 2 and p.stderr == f"mobizo: error: cannot write {out}/checkpoint: File too large\n"
    assert sorted(e.name for e in out.iterdir()) == [".mobizo", "metrics.jsonl"]


def test_weights_are_only_loaded_safely():
    """No pickle: safetensors, or torch.load(weights_only=True); no remote code by default."""
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*import pickle|^\s*from pickle|import dill|import joblib", text, re.MULTILINE), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert "trust_remote_code=True" not in text, path
        assert not re.search(r"use_safetensors\s*=\s*False", text), path


def test_remote_code_is_not_run_without_the_flag(tmp_path):
    from safetensors.torch import save_file

    from mobizo.models import load_model

    model = tmp_path / "evil"
    model.mkdir()
    sentinel = tmp_path / "pwned"
    (model / "config.json").write_text(
        json.dumps(
            {
                "model_type": "evil_lm",
                "architectures": ["EvilForCausalLM"],
                "auto_map": {
                    "AutoConfig": "configuration_evil.EvilConfig",
                    "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                    "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None],
                },
            }
        )
    )
    payload = f"open({str(sentinel)!r}, 'w').write('x')\n"
    for name in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (model / name).write_text(payload)
    save_file({"w": torch.zeros(1)}, str(model / "model.safetensors"))
    with pytest.raises(MobizoError):
        load_model(str(model))
    assert not sentinel.exists()


def test_model_dir_without_safetensors_is_refused(tmp_path):
    from mobizo.models import load_model

    (tmp_path / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(MobizoError, match="safetensors"):
        load_model(str(tmp_path))


def test_trust_remote_code_flag_reaches_the_loader(monkeypatch, capsys, tmp_path):
    from mobizo import models

    seen = []

    def fake(path, dtype=torch.float32, trust_remote_code=False, before_weights=None):
        seen.append(trust_remote_code)
        raise MobizoError("stop here")

    monkeypatch.setattr(models, "load_model", fake)
    for flag in ([], ["--trust-remote-code"]):
        run_cli(capsys, "train", *FAST, "--steps", "1", "--out", tmp_path / f"r{len(seen)}", *flag)
        run_cli(capsys, "eval", "--model", "tiny", "--eval-examples", "4", *flag)
    assert seen == [False, False, True, True]
