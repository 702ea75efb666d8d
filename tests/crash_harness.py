"""Fault injection for ``mobizo train``: SIGKILL a training process at random moments, resume, repeat.

The engine is a parameter (``--engine`` is passed through), so the same harness
drives the eager and the ExecuTorch engines. Two launchers run the real CLI
entry point ``mobizo.cli.main`` in a separate OS process:

* :class:`SubprocessLauncher`: ``python -m mobizo train ...`` (what a user runs);
* :class:`ForkLauncher`: a fork of a server that already imported torch and
  transformers (``tests/_forkserver.py``), which makes a kill/resume cycle ~1 s
  instead of ~5 s so CI can afford dozens of kills.

After every kill :func:`check_out` verifies that every file in ``--out`` is
readable (JSON parses, each complete metrics line parses, safetensors load with
matching checksums, checkpoints load) and that replaying the log up to the
checkpoint's step rebuilds the checkpoint's adapter.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

# Small and fast: ~40 steps of ~10 ms, a checkpoint every 3 steps.
FAST_ARGS = [
    "--model",
    "tiny",
    "--steps",
    "40",
    "--save-every",
    "3",
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


def child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "PYTHONWARNINGS": "ignore",
        }
    )
    env.update(extra or {})
    return env


# ---------------------------------------------------------------- launchers


class SubprocessProc:
    def __init__(self, argv: list[str], env: dict, log: Path):
        self.log = log
        with open(log, "ab") as f:
            self.p = subprocess.Popen(
                [sys.executable, "-m", "mobizo", *argv], env=env, stdout=f, stderr=f, stdin=subprocess.DEVNULL, cwd=ROOT
            )
        self.pid = self.p.pid

    def poll(self):
        return self.p.poll()

    def kill(self) -> None:
        self.p.send_signal(signal.SIGKILL)

    def wait(self, timeout: float = 300) -> int:
        return self.p.wait(timeout)


class SubprocessLauncher:
    name = "subprocess"

    def start(self, argv, env_extra, log: Path) -> SubprocessProc:
        return SubprocessProc(argv, child_env(env_extra), log)

    def close(self) -> None:
        pass


class ForkProc:
    def __init__(self, server: ForkLauncher, pid: int, log: Path):
        self.server, self.pid, self.log = server, pid, log
        self.rc = None

    def poll(self):
        if self.rc is None:
            self.rc = self.server._req({"cmd": "wait", "pid": self.pid, "block": False})["rc"]
        return self.rc

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float = 300) -> int:
        if self.rc is None:
            deadline = time.monotonic() + timeout
            while self.poll() is None:
                if time.monotonic() > deadline:
                    self.kill()
                    raise TimeoutError(f"process {self.pid} did not finish in {timeout} s")
                time.sleep(0.01)
        return self.rc


class ForkLauncher:
    name = "fork"

    def __init__(self, env_extra: dict | None = None):
        self.p = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("_forkserver.py"))],
            env=child_env(env_extra),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )
        hello = self.p.stdout.readline()
        if not hello:
            raise RuntimeError("the fork server did not start")

    def _req(self, req: dict) -> dict:
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def start(self, argv, env_extra, log: Path) -> ForkProc:
        pid = self._req({"cmd": "run", "argv": list(argv), "env": env_extra or {}, "log": str(log)})["pid"]
        return ForkProc(self, pid, log)

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(30)


# ---------------------------------------------------------------- checks


def _scratch(name: str) -> bool:
    return name.startswith(".") and (".tmp-" in name or ".trash-" in name)


def read_jsonl(path: Path) -> list[dict]:
    """Every newline-terminated line must parse as an object; a final fragment without newline is a cut write."""
    text = path.read_bytes().decode("utf-8")
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines[:-1], 1):
        rec = json.loads(line)
        assert isinstance(rec, dict), f"{path}:{i}: not an object"
        out.append(rec)
    return out


def check_out(out: Path, replay_check: bool = True, tol: float = 0.0) -> dict:
    """Assert every file in ``out`` is readable; returns facts (checkpoint step, logged steps).

    With ``replay_check``, replaying the log up to the checkpoint's step must rebuild the checkpoint's
    adapter (bitwise for eager, within ``tol`` for an engine whose update runs outside PyTorch).
    """
    from mobizo.checkpoint import load_checkpoint, read_adapter
    from mobizo.fsio import resolve_dir

    facts = {"checkpoint_step": None, "logged_steps": 0, "files": 0}
    if not out.exists():
        return facts
    for entry in sorted(out.iterdir()):
        name = entry.name
        if _scratch(name):
            continue  # an unfinished write (never read by mobizo; removed on --resume)
        facts["files"] += 1
        if entry.is_dir():
            if (entry / "state.json").exists():
                load_checkpoint(entry)  # adapter checksum, state, optimizer checksum
            elif (entry / "adapter_config.json").exists():
                read_adapter(entry, require_checksum=True)
            else:
                for f in entry.rglob("*"):
                    if f.is_file():
                        f.read_bytes()
        elif name.endswith(".jsonl"):
            recs = read_jsonl(entry)
            if name == "metrics.jsonl" and recs:
                assert recs[0].get("mobizo_log") == 1, "metrics.jsonl must start with its header"
                steps = [r["step"] for r in recs[1:]]
                assert steps == list(range(1, len(steps) + 1)), f"metrics steps not contiguous: {steps}"
                facts["logged_steps"] = len(steps)
        elif name.endswith(".json"):
            json.loads(entry.read_text(encoding="utf-8"))
        else:
            entry.read_bytes()
    ckpt = resolve_dir(out / "checkpoint")
    if ckpt is not None:
        adapter, _, state, _ = load_checkpoint(out / "checkpoint")
        facts["checkpoint_step"] = state["step"]
        assert facts["logged_steps"] >= state["step"], "the log must cover the checkpoint"
        if replay_check and state["config"]["estimator"] != "fo":
            from mobizo.replay import replay

            with tempfile.TemporaryDirectory() as tmp:
                replay(out / "metrics.jsonl", Path(tmp) / "a", upto=state["step"])
                rebuilt, _ = read_adapter(Path(tmp) / "a")
            assert_same(adapter, rebuilt, tol, "replayed log vs checkpoint")
    return facts


def assert_same(a: dict, b: dict, tol: float, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: different tensors"
    for k, va in a.items():
        if tol == 0.0:
            same = va.dtype == b[k].dtype and torch.equal(va.view(torch.uint8), b[k].view(torch.uint8))
            assert same, f"{what}: {k} differs bitwise (max |diff| {float((va - b[k]).abs().max())})"
        else:
            diff = float((va.float() - b[k].float()).abs().max())
            assert diff <= tol, f"{what}: {k} differs by {diff} > {tol}"


# ---------------------------------------------------------------- the kill / resume loop

MODES = ("time", "step", "tmp", "swap")


@dataclass
class KillStats:
    kills: int = 0
    by_mode: dict = field(default_factory=dict)
    processes: int = 0
    checkpoint_steps: list = field(default_factory=list)


def _wait_for(proc, cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if cond():
            return True
        time.sleep(0.002)
    return False


def _logged_step(out: Path) -> int:
    try:
        with open(out / "metrics.jsonl", "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            tail = f.read().decode("utf-8", "replace").split("\n")
        for line in reversed(tail[:-1]):
            try:
                return int(json.loads(line).get("step", 0))
            except (ValueError, AttributeError):
                continue
    except OSError:
        pass
    return 0


def _listing(out: Path) -> list[str]:
    try:
        return os.listdir(out)
    except OSError:
        return []


def kill_resume(
    launcher,
    out: Path,
    args: list[str],
    kills: int,
    rng: random.Random,
    slow: float = 0.05,
    total_steps: int = 40,
    log: Path | None = None,
    stats: KillStats | None = None,
    tol: float = 0.0,
) -> KillStats:
    """Run ``train`` in ``out`` to completion, SIGKILLing it ``kills`` times at random moments.

    After each kill: :func:`check_out`, then resume (or start again with --overwrite when the
    kill came before the first checkpoint existed), exactly as a user would.
    """
    from mobizo.fsio import resolve_dir

    stats = stats or KillStats()
    log = log or out.with_name(out.name + ".log")
    env = {"MOBIZO_TEST_SLOW_CHECKPOINT": str(slow)} if slow else {}
    done = 0
    while True:
        resume = resolve_dir(out / "checkpoint") is not None
        argv = ["train", *args, "--out", str(out), "--resume" if resume else "--overwrite"]
        proc = launcher.start(argv, env, log)
        stats.processes += 1
        if done < kills:
            mode = rng.choice(MODES)
            if mode == "time":
                hit = not _wait_for(proc, lambda: False, rng.uniform(0.0, 3.0)) and proc.poll() is None
            elif mode == "step":
                target = rng.randint(1, total_steps)
                hit = _wait_for(proc, lambda target=target: _logged_step(out) >= target, 60)
            elif mode == "tmp":  # inside a write: the new version is being written / fsynced
                hit = _wait_for(proc, lambda: any(".tmp-" in n for n in _listing(out)), 60)
                if hit:
                    time.sleep(rng.uniform(0.0, slow))
            else:  # "swap": between the two renames, target missing and only .old complete
                hit = _wait_for(proc, lambda: any(n.endswith(".old") for n in _listing(out)), 60)
            if proc.poll() is None:
                proc.kill()
                rc = proc.wait()
                if rc == -signal.SIGKILL:  # (rc 0: it finished between poll and kill; handled below)
                    done += 1
                    stats.kills += 1
                    key = mode if hit or mode == "time" else mode + "(late)"
                    stats.by_mode[key] = stats.by_mode.get(key, 0) + 1
                    try:
                        facts = check_out(out, tol=tol)
                    except Exception as e:
                        raise AssertionError(
                            f"after kill {stats.kills} ({key}): {type(e).__name__}: {e}\n{_describe(out, log)}"
                        ) from e
                    stats.checkpoint_steps.append(facts["checkpoint_step"])
                    continue
        rc = proc.wait()
        if rc != 0:
            raise AssertionError(f"{' '.join(argv)} exited {rc}:\n{_describe(out, log)}")
        if done >= kills:
            return stats
        # finished before the remaining kills: nothing left to interrupt in this run
        return stats


def _describe(out: Path, log: Path) -> str:
    """What a failure report needs: the tree of ``out`` and the end of the processes' output."""
    lines = []
    if out.exists():
        for f in sorted(out.rglob("*")):
            lines.append(f"  {f.relative_to(out)}{'/' if f.is_dir() else f' ({f.stat().st_size} B)'}")
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    return "out:\n" + "\n".join(lines) + "\nlog tail:\n" + tail


def final_check(out: Path, reference: Path, tol: float, steps: int) -> None:
    """The interrupted run's outputs equal the uninterrupted run's; nothing half-written is left."""
    from mobizo.checkpoint import read_adapter

    check_out(out, tol=tol)
    leftovers = [n for n in os.listdir(out) if n.startswith(".") and n != ".mobizo"]  # the run marker is no scratch
    assert not leftovers, f"scratch entries left in {out}: {leftovers}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_step"] == steps
    a, _ = read_adapter(out / "adapter", require_checksum=True)
    b, _ = read_adapter(reference / "adapter", require_checksum=True)
    assert_same(a, b, tol, "interrupted vs uninterrupted adapter")
    if tol == 0.0:
        mine = [r["projected_grads"] for r in read_jsonl(out / "metrics.jsonl")[1:]]
        ref = [r["projected_grads"] for r in read_jsonl(reference / "metrics.jsonl")[1:]]
        assert mine == ref, "the interrupted run's logged projected gradients differ from the uninterrupted run's"
