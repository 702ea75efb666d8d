"""The native on-device trainer (`mobizo-train`, C++ in native/) trains a bundle exactly like the Python engine.

One program is exported per module (~1 min on 2 cores); the binary is built once and cached
(~20 s the first time). Everything else runs the binary on that bundle (~0.4 s per 40 steps).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import resource
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _checkpoints import legacy_checkpoint
from safetensors.torch import load_file

from mobizo.config import TrainConfig
from mobizo.errors import MobizoError

STEPS = 40


@pytest.fixture(scope="module")
def binary():
    from mobizo.native import build

    return build()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_flags):
    from mobizo.bundle import make_bundle

    d = tmp_path_factory.mktemp("native") / "bundle"
    make_bundle(TrainConfig.from_flat(**tiny_flags(), steps=STEPS, save_every=10), d)
    return d


def native(binary, bundle, out, *args, env=None, preexec_fn=None):
    return subprocess.run(
        [str(binary), str(bundle), "--out", str(out), "--quiet", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=preexec_fn,
        timeout=300,
    )


def strict_lines(path: Path) -> list[dict]:
    def no_constants(tok):
        raise ValueError(f"non-strict JSON token {tok}")

    return [json.loads(line, parse_constant=no_constants) for line in path.read_text().splitlines()]


def trajectory(run_dir: Path) -> list[dict]:
    """The step records without their timings."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in strict_lines(run_dir / "metrics.jsonl")[1:]]


@pytest.fixture(scope="module")
def ref_run(binary, bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    p = native(binary, bundle, out)
    assert p.returncode == 0, p.stderr
    return out


def edited_copy(bundle: Path, dst: Path, file: str = "run.json", **changes) -> Path:
    shutil.copytree(bundle, dst)
    data = json.loads((dst / file).read_text())
    data.update(changes)
    (dst / file).write_text(json.dumps(data))
    return dst


# ---------------------------------------------------------------- the bundle's batches


def _make_batch_equals_gather(run, data, steps):
    from mobizo.bundle import Bundle, batch_indices, gather
    from mobizo.engines import Shapes
    from mobizo.trainer import make_batch

    T, K = data.input_ids.shape[-1], data.labels.shape[-1]
    cfg = run.cfg
    if run.engine.shapes.length is None:  # the eager engine: fix the program's shapes
        run = dataclasses.replace(
            run, engine=SimpleNamespace(shapes=Shapes(T, K, cfg.optim.batch_size, cfg.data.eval_batch_size))
        )
    arrays = {
        "input_ids": data.input_ids,
        "attention_mask": data.attention_mask,
        "labels": data.labels,
        "real_rows": data.real_rows,
        "batches": batch_indices(len(run.train), cfg.optim.batch_size, steps, cfg.seed),
    }
    if data.gold is not None:
        arrays["gold"] = data.gold
    b = Bundle(Path("."), {"steps": steps}, arrays)
    for step in range(1, steps + 1):
        want, got = make_batch(run, step), gather(b, step)
        assert torch.equal(want.input_ids, got.input_ids), step
        assert torch.equal(want.attention_mask, got.attention_mask), step
        assert torch.equal(want.labels, got.labels), step
        assert (want.gold is None) == (got.gold is None) and (want.gold is None or torch.equal(want.gold, got.gold))


def test_gathered_rows_equal_make_batch(bundle, tiny_flags):
    """The bundle's pre-collated rows, gathered per step, are the trainer's batches (and the bundle is a --program)."""
    from mobizo.build import build_run as prepare
    from mobizo.bundle import BundleData, read_bundle

    run = prepare(TrainConfig.from_flat(**tiny_flags(), steps=STEPS, engine="executorch", program=str(bundle)))
    b = read_bundle(bundle)

    data = BundleData(*(b.arrays[k] for k in ("input_ids", "attention_mask", "labels", "real_rows", "gold")))
    _make_batch_equals_gather(run, data, STEPS)


@pytest.mark.parametrize("case", ["answer", "filler"])
def test_gather_equals_make_batch_answer_objective_and_filler_rows(case, tmp_path, tiny_flags):
    from mobizo.build import build_run as prepare
    from mobizo.bundle import collate_examples

    if case == "answer":
        cfg = TrainConfig.from_flat(**tiny_flags(objective="answer"), train_examples=64)
    else:  # multiple choice with 2-4 candidates: examples with fewer than 4 get filler rows
        rng = random.Random(0)
        rows = []
        for i in range(24):
            n = rng.choice([2, 3, 4])
            labels = "ABCD"[:n]
            choices = {"text": [f"{i + j} apples" for j in range(n)], "label": list(labels)}
            rows.append({"question": f"what is {i} plus {i % 5}?", "answerKey": rng.choice(labels), "choices": choices})
        for split in ("train", "validation"):
            (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = TrainConfig.from_flat(**tiny_flags(task="arc-easy", batch_size=3), data=str(tmp_path))
    run = prepare(cfg)
    assert (run.objective, run.choices) == (("answer", 0) if case == "answer" else ("choice-mean", 4))
    data = collate_examples(run, cfg.data.max_length, run.answer_len)
    if case == "filler":
        assert int(data.real_rows.min()) == 2
    _make_batch_equals_gather(run, data, 20)


# ---------------------------------------------------------------- parity, adapters, resume


def test_native_equals_python_executorch_engine_bitwise(bundle, ref_run):
    from mobizo.bundle import train_python
    from mobizo.checkpoint import read_adapter

    records, _raw, state = train_python(bundle, STEPS)
    lines = (ref_run / "metrics.jsonl").read_text().splitlines()
    run = json.loads((bundle / "run.json").read_text())
    assert lines[0] == run["log_header"]  # the header, verbatim
    nat = strict_lines(ref_run / "metrics.jsonl")[1:]
    assert [list(r) for r in nat] == [["step", "loss", "projected_grads", "lr", "eps", "seconds"]] * STEPS
    diff = 0.0
    for want, got in zip(records, nat, strict=True):
        diff = max(
            diff,
            abs(want["loss"] - got["loss"]),
            *(abs(a - b) for a, b in zip(want["projected_grads"], got["projected_grads"])),
        )
        assert {k: v for k, v in got.items() if k != "seconds"} == want, want["step"]
    adapter, _config = read_adapter(ref_run / "adapter", require_checksum=True)
    assert adapter.keys() == state.keys()
    b_diff = max((adapter[k] - state[k]).abs().max().item() for k in state)
    assert all(torch.equal(adapter[k], state[k]) for k in state)
    assert max(adapter[k].abs().max().item() for k in state if k.endswith("lora_B")) > 1e-3  # B moved
    print(f"\nnative vs Python ExecuTorch engine over {STEPS} steps: max |diff| of loss/g = {diff}, of B = {b_diff}")
    summary = json.loads((ref_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_step"] == STEPS and summary["engine"] == "native"


def test_bundle_program_has_the_fixed_length_and_steps_as_eager_does(bundle, tmp_path, tiny_flags):
    """A bundle exports its program for exactly --max-length (the native trainer pads every batch to it:
    a quicker export, no symbolic length); its steps on batches padded to 32 tokens equal the eager
    engine's on batches padded to their own longest row."""
    from mobizo.api import train
    from mobizo.bundle import train_python
    from mobizo.engines.executorch import read_manifest

    assert read_manifest(bundle).dynamic_length is False
    records, _, _ = train_python(bundle, 6)
    train(TrainConfig.from_flat(**tiny_flags(), steps=6, eval_every=0, save_every=0, out=str(tmp_path / "eager")))
    eager = strict_lines(tmp_path / "eager" / "metrics.jsonl")[1:]
    eager = [r for r in eager if "projected_grads" in r]
    assert len(eager) == 6
    for want, got in zip(eager, records, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-5), got["step"]
        assert got["projected_grads"] == pytest.approx(want["projected_grads"], rel=1e-3, abs=1e-4), got["step"]


def test_adapter_and_checkpoint_load_in_python_and_peft(ref_run, tiny_dir, tmp_path, run_cli):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mobizo.checkpoint import load_checkpoint, read_adapter
    from mobizo.models import load_model
    from mobizo.mplora import inject, load_adapter_state

    state, config = read_adapter(ref_run / "adapter", require_checksum=True)
    assert config["r"] == 8 and config["lora_alpha"] == 16
    ck_state, _, st, _ = load_checkpoint(ref_run / "checkpoint")  # checksums of state.json and tensors verified
    assert st["step"] == STEPS and all(torch.equal(ck_state[k], state[k]) for k in state)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(ref_run / "adapter")).eval()
    ours, _ = load_model(str(tiny_dir))
    inject(ours, sorted({k.rsplit(".", 1)[0] for k in state}), 8, 16, 3)
    load_adapter_state(ours, state)
    ids = torch.randint(3, 500, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    code, err = run_cli(
        [
            "eval",
            "--model",
            tiny_dir,
            "--adapter",
            ref_run / "adapter",
            "--eval-examples",
            16,
            "--max-length",
            32,
            "--json",
            tmp_path / "e.json",
        ]
    )
    assert code == 0, err
    # the log is complete: `mobizo replay` (eager noise and update) rebuilds the adapter from it
    from mobizo.replay import replay

    replay(ref_run / "metrics.jsonl", tmp_path / "replayed")
    rebuilt, _ = read_adapter(tmp_path / "replayed")
    assert max((rebuilt[k] - state[k]).abs().max().item() for k in state) <= 1e-5


def test_per_step_lr_eps_schedule(binary, bundle, tmp_path):
    """A bundle with lr/eps per step (schedule.bin), written with write_bundle from a bundle (also a program dir)."""
    from mobizo.bundle import BundleData, read_bundle, train_python, write_bundle

    b = read_bundle(bundle)
    data = BundleData(*(b.arrays[k] for k in ("input_ids", "attention_mask", "labels", "real_rows", "gold")))
    lrs, epss = [1.0] * 6 + [0.25] * 6, [0.05] * 6 + [0.1] * 6
    sched = write_bundle(
        tmp_path / "sched",
        bundle,
        data,
        b.arrays["batches"][:12],
        lr=lrs,
        eps=epss,
        log_header=json.loads(b.run["log_header"]),
        adapter_config=b.run["adapter"]["config"],
        adapter_metadata=b.run["adapter"]["metadata"],
        save_every=5,
    )
    assert "schedule" in json.loads((sched / "run.json").read_text())["arrays"]
    out = tmp_path / "run"
    p = subprocess.run([str(binary), str(sched), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "step 12/12" in p.stdout, p.stderr  # progress, without --quiet
    records, _, state = train_python(sched)
    assert trajectory(out) == records and [r["lr"] for r in records] == lrs
    from mobizo.checkpoint import read_adapter

    adapter, _ = read_adapter(out / "adapter")
    assert all(torch.equal(adapter[k], state[k]) for k in state)


def test_resume_continues_bitwise(binary, bundle, ref_run, tmp_path):
    out = tmp_path / "run"
    p = native(binary, bundle, out, "--steps", 20)
    assert p.returncode == 0, p.stderr
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 20
    p = native(binary, bundle, out, "--resume")
    assert p.returncode == 0, p.stderr
    assert trajectory(out) == trajectory(ref_run)
    for f in (
        "adapter/adapter_model.safetensors",
        "checkpoint/adapter_model.safetensors",
        "adapter/adapter_config.json",
    ):
        assert (out / f).read_bytes() == (ref_run / f).read_bytes(), f
    p = native(binary, bundle, out, "--resume", "--steps", 10)  # the checkpoint is past --steps
    assert p.returncode == 2 and "past --steps 10" in p.stderr


def test_checkpoint_sums_are_sha256sum_files_python_reads(ref_run):
    """The native checkpoint's SHA256SUMS: the bytes Python writes for the same files, checked by `sha256sum -c`."""
    from mobizo.checkpoint import SUMS, read_sums, sums_text, verify_sums
    from mobizo.util import file_sha256

    ck = ref_run / "checkpoint"
    files = sorted(p.name for p in ck.iterdir() if p.name != SUMS)
    assert files == ["adapter_config.json", "adapter_model.safetensors", "rollback.safetensors", "state.json"]
    assert (ck / SUMS).read_text() == sums_text({f: file_sha256(ck / f)[1] for f in files})
    verify_sums(ck, read_sums(ck))
    p = subprocess.run(["sha256sum", "--check", "--strict", SUMS], cwd=ck, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.count(": OK") == 4, p.stdout + p.stderr
    state = json.loads((ck / "state.json").read_text())
    assert state["checkpoint_format"] == 2 and "sha256" not in state


@pytest.fixture(scope="module")
def part_run(binary, bundle, tmp_path_factory):
    """A run stopped at step 20 (checkpoint of step 20), to copy and damage."""
    out = tmp_path_factory.mktemp("part") / "run"
    p = native(binary, bundle, out, "--steps", 20)
    assert p.returncode == 0, p.stderr
    return out


@pytest.mark.parametrize(
    "name", ["state.json", "adapter_config.json", "adapter_model.safetensors", "rollback.safetensors", "SHA256SUMS"]
)
def test_a_flipped_bit_in_the_checkpoint_is_one_line_naming_the_file(binary, bundle, part_run, tmp_path, name):
    out = shutil.copytree(part_run, tmp_path / "run")
    ck = out / "checkpoint"
    path = ck / name
    data = bytearray(path.read_bytes())
    # where the file's own checks cannot see it: a digit of the state, the base model's name (the adapter config
    # is not otherwise read), a data byte, a digit of the state.json line's checksum
    i = len(data) - 3
    if name == "state.json":
        i = data.index(b'"step": 20') + 9
    elif name == "adapter_config.json":
        i = data.index(b'"tiny"') + 1
    elif name == "SHA256SUMS":
        i = data.index(b"  state.json") - 1
    data[i] = data[i] ^ 0x01 if name != "SHA256SUMS" else ord("0" if data[i] != ord("0") else "1")  # (still hex)
    path.write_bytes(bytes(data))
    victim = ck / ("state.json" if name == "SHA256SUMS" else name)
    assert one_line_error(native(binary, bundle, out, "--resume")) == (
        f"mobizo-train: error: cannot resume: {victim}: checksum mismatch (the file is corrupted) "
        "(start again with --overwrite)"
    )
    with pytest.raises(MobizoError, match=re.escape(f"{victim}: checksum mismatch (the file is corrupted)")):
        from mobizo.checkpoint import load_checkpoint

        load_checkpoint(ck)  # Python says the same


def test_a_damaged_sums_list_is_one_line(binary, bundle, part_run, tmp_path):
    hint = " (start again with --overwrite)"
    out = shutil.copytree(part_run, tmp_path / "run")
    ck = out / "checkpoint"
    text = (ck / "SHA256SUMS").read_text()
    cases = {
        text.replace(text.splitlines(True)[0], ""): f"{ck}/SHA256SUMS: adapter_config.json is not listed",
        text[:-3]: f"{ck}/SHA256SUMS: truncated",
        text + text.splitlines(True)[1]: f"{ck}/SHA256SUMS: malformed line 5",
        "x" + text[1:]: f"{ck}/SHA256SUMS: malformed line 1",
        text.replace("  state.json", " /state.json"): f"{ck}/SHA256SUMS: malformed line 4",
    }
    for damaged, want in cases.items():
        (ck / "SHA256SUMS").write_text(damaged)
        got = one_line_error(native(binary, bundle, out, "--resume"))
        assert got == f"mobizo-train: error: cannot resume: {want} (the file is corrupted){hint}", damaged
    (ck / "SHA256SUMS").unlink()  # gone from a format-2 checkpoint
    got = one_line_error(native(binary, bundle, out, "--resume"))
    assert got == f"mobizo-train: error: cannot resume: {ck}/SHA256SUMS: missing{hint}"


def test_legacy_checkpoint_resumes_bitwise(binary, bundle, ref_run, part_run, tmp_path):
    """A format-1 checkpoint (the sha256 of state.json's canonical JSON inside it, no SHA256SUMS), as mobizo-train
    wrote it before: --resume verifies it the old way, continues bit for bit and writes format 2 from then on."""
    out = shutil.copytree(part_run, tmp_path / "run")
    legacy_checkpoint(out / "checkpoint", native=True)
    saved = shutil.copytree(out / "checkpoint", tmp_path / "legacy")
    p = native(binary, bundle, out, "--resume")
    assert p.returncode == 0, p.stderr
    assert trajectory(out) == trajectory(ref_run)
    for f in ("adapter/adapter_model.safetensors", "checkpoint/adapter_model.safetensors"):
        assert (out / f).read_bytes() == (ref_run / f).read_bytes(), f
    assert (out / "checkpoint" / "SHA256SUMS").read_bytes() == (ref_run / "checkpoint" / "SHA256SUMS").read_bytes()
    # the legacy checksum is still checked: a changed value is caught
    shutil.rmtree(out / "checkpoint")
    shutil.copytree(saved, out / "checkpoint")
    state = out / "checkpoint" / "state.json"
    state.write_text(state.read_text().replace('"skipped_steps": 0', '"skipped_steps": 1'))
    assert one_line_error(native(binary, bundle, out, "--resume")) == (
        f"mobizo-train: error: cannot resume: {state}: checksum mismatch (the file is corrupted) "
        "(start again with --overwrite)"
    )


def _consistent(out: Path, ref: list[dict]) -> int:
    """After a kill: the checkpoint (if any) loads with verified checksums and the log covers it."""
    from mobizo.checkpoint import load_checkpoint
    from mobizo.fsio import resolve_dir

    if resolve_dir(out / "checkpoint") is None:
        return -1
    _, _, state, _ = load_checkpoint(out / "checkpoint")
    text = (out / "metrics.jsonl").read_text()
    complete = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]  # a cut last line is dropped
    recs = [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in complete[1:]]
    assert len(recs) >= state["step"] and recs == ref[: len(recs)]
    return state["step"]


def test_sigkill_at_random_moments_then_resume_matches(binary, bundle, ref_run, tmp_path):
    from mobizo.fsio import resolve_dir

    b = edited_copy(bundle, tmp_path / "b", save_every=3)  # checkpoints every 3 steps (the trajectory is the same)
    ref = trajectory(ref_run)
    env = {**os.environ, "MOBIZO_TEST_SLOW_CHECKPOINT": "0.02"}  # widen the windows inside atomic writes
    rng, out, kills, resumed, moments, done = random.Random(20240915), tmp_path / "run", 0, 0, [], False
    while kills < 8 or not done:
        if done or resolve_dir(out / "checkpoint") is None:  # finished, or killed before its first checkpoint
            args, done = (["--overwrite"] if out.exists() else []), False
        else:
            args, resumed = ["--resume"], resumed + 1
        p = subprocess.Popen(
            [str(binary), str(b), "--out", str(out), "--quiet", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if kills < 8:
            time.sleep(rng.uniform(0.05, 0.9))
            if p.poll() is None:
                p.kill()
                p.wait()
                kills += 1
                names = [e.name for e in out.iterdir()] if out.exists() else []
                moments.append((_consistent(out, ref), any(".tmp-" in n or ".old" in n for n in names)))
                # the marker is written before any entry (a killed run can always be replaced with --overwrite)
                assert ".mobizo" in names or not {"metrics.jsonl", "checkpoint", ".checkpoint.old"} & set(names), names
                continue
        assert p.wait(timeout=120) == 0, p.stderr.read()
        done = True
    print(f"\n{kills} kills (checkpoint step, inside an atomic write) = {moments}, {resumed} resumes")
    assert trajectory(out) == ref
    f = "adapter/adapter_model.safetensors"
    assert (out / f).read_bytes() == (ref_run / f).read_bytes()
    # no scratch left after the final run; the marker is an entry, not scratch
    assert [e.name for e in out.iterdir() if e.name.startswith(".")] == [".mobizo"]


# ---------------------------------------------------------------- errors: one line, exit code 2


def one_line_error(p) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mobizo-train: error: "), p.stderr
    return lines[0]


def test_bad_bundles_are_refused_before_anything_is_written(binary, bundle, tmp_path):
    out = tmp_path / "out"
    assert "does not exist" in one_line_error(native(binary, tmp_path / "nope", out))
    missing = shutil.copytree(bundle, tmp_path / "missing")
    (missing / "labels.bin").unlink()
    assert "is missing labels.bin" in one_line_error(native(binary, missing, out))
    bad = shutil.copytree(bundle, tmp_path / "bad")
    data = bytearray((bad / "train.pte").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "train.pte").write_bytes(bytes(data))
    assert "train.pte is truncated or corrupted" in one_line_error(native(binary, bad, out))
    cut = shutil.copytree(bundle, tmp_path / "cut")
    (cut / "input_ids.bin").write_bytes((cut / "input_ids.bin").read_bytes()[:-8])
    assert "input_ids.bin is truncated or corrupted" in one_line_error(native(binary, cut, out))
    m = json.loads((bundle / "manifest.json").read_text())
    layer = next(iter(m["adapter_shapes"]))
    shapes = {**m["adapter_shapes"], layer: [64, 4]}
    mism = edited_copy(bundle, tmp_path / "mism", "manifest.json", adapter_shapes=shapes)
    assert "manifest.json does not match train.pte" in one_line_error(native(binary, mism, out))
    other = edited_copy(bundle, tmp_path / "other", pte_sha256="0" * 64)
    assert "another program" in one_line_error(native(binary, other, out))
    (tmp_path / "garbled").mkdir()
    shutil.copytree(bundle, tmp_path / "garbled" / "b")
    (tmp_path / "garbled" / "b" / "run.json").write_text("{not json")
    assert "malformed JSON" in one_line_error(native(binary, tmp_path / "garbled" / "b", out))
    assert not out.exists()  # nothing half-written


def test_out_directory_rules(binary, bundle, ref_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "summary.json").write_text("{}")  # looks like a run, but carries no marker
    assert "is not empty" in one_line_error(native(binary, bundle, out))
    line = one_line_error(native(binary, bundle, out, "--overwrite"))
    assert line.endswith(f"--overwrite: {out} is not a mobizo run directory (no .mobizo marker); not deleting anything")
    assert "no checkpoint" in one_line_error(native(binary, bundle, out, "--resume"))
    assert "exclude each other" in one_line_error(native(binary, bundle, out, "--resume", "--overwrite"))
    (out / ".mobizo").write_text('{"mobizo": "0.1.0", "kind": "program"}\n')  # another kind of directory
    assert "not a mobizo run directory" in one_line_error(native(binary, bundle, out, "--overwrite"))
    (out / ".mobizo").write_text("{not json")
    assert "not a mobizo run directory" in one_line_error(native(binary, bundle, out, "--overwrite"))
    assert sorted(e.name for e in out.iterdir()) == [".mobizo", "notes.txt", "summary.json"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "summary.json").read_text() == "{}"
    assert "bundle holds batches for 40 steps" in one_line_error(native(binary, bundle, tmp_path / "x", "--steps", 41))


def test_marker_and_overwrite_keeps_foreign_files(binary, bundle, ref_run, tmp_path):
    from mobizo.rundir import read_marker, write_marker

    version = json.loads((bundle / "run.json").read_text())["mobizo_version"]
    marker = (ref_run / ".mobizo").read_text()
    assert marker == json.dumps({"mobizo": version, "kind": "run"}) + "\n"
    assert read_marker(ref_run) == {"mobizo": version, "kind": "run"}
    # --overwrite of a native run: only mobizo's entries (and their scratch) go, notes.txt and the marker stay
    run = shutil.copytree(ref_run, tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    for d in ("best", "program", ".adapter.old", ".checkpoint.tmp-abc", ".overwrite.trash-xyz"):
        (run / d).mkdir()
        (run / d / "f").write_text("x")
    (run / ".notes.txt.old").write_text("mine too")  # an ".X.old" of a file that is not mobizo's
    p = native(binary, bundle, run, "--overwrite", "--steps", 5)
    assert p.returncode == 0, p.stderr
    assert sorted(e.name for e in run.iterdir()) == [
        ".mobizo",
        ".notes.txt.old",
        "adapter",
        "checkpoint",
        "metrics.jsonl",
        "notes.txt",
        "summary.json",
    ]
    assert (run / "notes.txt").read_text() == "mine" and (run / ".mobizo").read_text() == marker
    assert len(trajectory(run)) == 5 and json.loads((run / "summary.json").read_text())["final_step"] == 5
    # a directory that Python marked as a run is replaced too
    py = tmp_path / "py"
    py.mkdir()
    write_marker(py, "run")
    (py / "summary.json").write_text("{}")
    p = native(binary, bundle, py, "--overwrite", "--steps", 2)
    assert p.returncode == 0, p.stderr
    assert len(trajectory(py)) == 2
    # only the scratch of a run killed at its very start: counts as empty, and is cleaned
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "..mobizo.tmp-a1b2c3").write_text("{")
    (fresh / ".checkpoint.tmp-q").mkdir()
    (fresh / ".overwrite.trash-z").mkdir()
    p = native(binary, bundle, fresh, "--steps", 2)
    assert p.returncode == 0, p.stderr
    assert not [e.name for e in fresh.iterdir() if e.name.startswith(".") and e.name != ".mobizo"]
    # --resume writes a missing marker (a run of an older mobizo-train) and leaves an existing one alone
    (fresh / ".mobizo").unlink()
    p = native(binary, bundle, fresh, "--resume", "--steps", 3)
    assert p.returncode == 0, p.stderr
    assert (fresh / ".mobizo").read_text() == marker and len(trajectory(fresh)) == 3


def test_write_errors_are_one_line(binary, bundle, tmp_path):
    """A full disk (here: a 8 KB file-size limit) fails with one line and leaves no scratch behind."""
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
    out = tmp_path / "out"
    line = one_line_error(native(binary, bundle, out, preexec_fn=limit))
    assert "cannot write" in line and "File too large" in line
    assert not [e.name for e in out.iterdir() if ".tmp-" in e.name]


def test_a_full_log_is_cut_back_to_its_last_whole_line(binary, bundle, tmp_path, tiny_flags):
    """A write of metrics.jsonl that fails midway (a full disk; here a 16 KB file-size limit, above the
    adapter's 14 KB) names the file and leaves only whole lines (it used to leave the line cut)."""
    from mobizo.bundle import make_bundle

    long = tmp_path / "long"
    make_bundle(TrainConfig.from_flat(**tiny_flags(steps=300, save_every=0)), long, program=bundle)  # the same program
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
    out = tmp_path / "out"
    line = one_line_error(native(binary, long, out, preexec_fn=limit))
    assert line == f"mobizo-train: error: cannot write {out}/metrics.jsonl: File too large"
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("\n") and 15000 < len(text) < 16384
    steps = [r["step"] for r in strict_lines(out / "metrics.jsonl")[1:]]
    assert steps == list(range(1, len(steps) + 1))
    p = native(binary, long, out, "--resume")  # with room again
    assert p.returncode == 0, p.stderr
    assert [r["step"] for r in strict_lines(out / "metrics.jsonl")[1:]] == list(range(1, 301))


def test_steps_must_be_at_least_one_for_both_trainers(binary, bundle, tmp_path, run_cli):
    """`mobizo native train BUNDLE --steps 0` used to exit 0 with a "completed" run of loss null, while
    `mobizo train --steps 0` is an error: both refuse it, with the same line, and write nothing."""
    out = tmp_path / "out"
    assert one_line_error(native(binary, bundle, out, "--steps", 0)).startswith(
        "mobizo-train: error: --steps must be >= 1, got 0 (usage: mobizo-train BUNDLE"
    )
    assert "--steps must be an integer >= 1, got 'x'" in one_line_error(native(binary, bundle, out, "--steps", "x"))
    for argv in (
        ["native", "train", bundle, "--steps", 0],
        ["train", "--steps", 0],
        ["native", "train", bundle, "--steps", -3],
    ):
        code, err = run_cli([*argv, "--out", out, "--no-progress"])
        assert code == 2 and err == f"mobizo: error: --steps must be >= 1, got {argv[-1]}\n", err
    assert not out.exists()


def test_diverging_run_stops_and_logs_strict_json(binary, bundle, tmp_path):
    # updates overflow B (the program leaves B alone and reports g as NaN), or B blows up the losses
    b = edited_copy(bundle, tmp_path / "b", lr=3e38)
    out = tmp_path / "run"
    line = one_line_error(native(binary, b, out))
    assert "consecutive bad steps" in line
    recs = strict_lines(out / "metrics.jsonl")[1:]  # null, never NaN
    skipped = [r for r in recs if r.get("skipped")]
    assert all(r.get("skipped") for r in recs[-3:]) and all(r["projected_grads"] == [None, None] for r in skipped)
    assert all(isinstance(r["loss"], float) for r in recs)  # the guard refused the overflowing updates (B_LIMIT)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["last_checkpoint_step"] == 0


def test_python_wrapper_raises_the_binary_error(binary, bundle, tmp_path):
    from mobizo.native import train

    summary = train(bundle, tmp_path / "run", steps=3, binary=binary)
    assert summary["final_step"] == 3
    with pytest.raises(MobizoError, match="is not empty"):
        train(bundle, tmp_path / "run", binary=binary)


def test_cli_native_train_then_eval_equals_the_python_executorch_run(binary, bundle, tmp_path, run_cli):
    """`mobizo native train BUNDLE` and `mobizo train --engine executorch --program BUNDLE` (the same program
    driven from Python) end with the same adapter, and `mobizo eval --adapter` scores them identically."""
    flags = [
        "--queries",
        2,
        "--batch-size",
        4,
        "--max-length",
        32,
        "--eval-examples",
        24,
        "--eval-batch-size",
        8,
        "--optimizer",
        "sgd",
        "--lr",
        1.0,
        "--eps",
        0.05,
        "--seed",
        3,
        "--steps",
        20,
        "--save-every",
        10,
        "--no-progress",
    ]
    code, err = run_cli(["native", "train", bundle, "--out", tmp_path / "nat", "--steps", 20, "--no-progress"])
    assert code == 0, err
    code, err = run_cli(["train", "--engine", "executorch", "--program", bundle, *flags, "--out", tmp_path / "py"])
    assert code == 0, err
    a, b = (load_file(str(tmp_path / r / "adapter" / "adapter_model.safetensors")) for r in ("nat", "py"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    scores = []
    # --eval-batch-size too: a native run saves no eval settings (it does not evaluate), and the chunking
    # sets the order the loss is summed in (the 8th digit)
    for r in ("nat", "py"):
        code, err = run_cli(
            [
                "eval",
                "--max-length",
                32,
                "--eval-examples",
                24,
                "--eval-batch-size",
                8,
                "--seed",
                3,
                "--no-progress",
                "--adapter",
                tmp_path / r / "adapter",
                "--json",
                tmp_path / f"{r}.json",
            ]
        )
        assert code == 0, err
        scores.append(json.loads((tmp_path / f"{r}.json").read_text()))
    assert scores[0]["accuracy"] == scores[1]["accuracy"] and scores[0]["loss"] == scores[1]["loss"]
