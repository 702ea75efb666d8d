import itertools
import math

import pytest

from mobizo.errors import MobizoError
from mobizo.schedule import lr_at


def test_constant_and_warmup():
    assert [lr_at(s, 2.0, 10) for s in (1, 5, 10)] == [2.0, 2.0, 2.0]
    assert [lr_at(s, 2.0, 10, "constant", 4) for s in (1, 2, 4, 5, 10)] == [0.5, 1.0, 2.0, 2.0, 2.0]


def test_linear_and_cosine_decay():
    lin = [lr_at(s, 1.0, 10, "linear") for s in range(1, 11)]
    assert lin[0] == 1.0 and lin[-1] == pytest.approx(0.1) and all(a > b for a, b in itertools.pairwise(lin))
    cos = [lr_at(s, 1.0, 10, "cosine", 2) for s in range(1, 11)]
    assert cos[:3] == [0.5, 1.0, 1.0]
    assert cos[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a >= b for a, b in itertools.pairwise(cos[1:])) and cos[-1] > 0
    assert lr_at(5, 1.0, 9, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 9)))
    # a resumed run past its --steps keeps the last lr instead of going negative
    assert lr_at(12, 1.0, 10, "linear") == pytest.approx(0.1)


def test_bad_schedules():
    with pytest.raises(MobizoError, match="unknown --lr-schedule 'step'"):
        lr_at(1, 1.0, 10, "step")
    with pytest.raises(MobizoError, match="--warmup-steps must be"):
        lr_at(1, 1.0, 10, "linear", -1)
    with pytest.raises(MobizoError, match="leaves no step"):
        lr_at(1, 1.0, 10, "cosine", 10)
    with pytest.raises(MobizoError, match="numbered from 1"):
        lr_at(0, 1.0, 10)


def test_threads(monkeypatch):
    import torch

    from mobizo.threads import apply_threads, default_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert default_threads() == 3
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert 1 <= default_threads() <= (len(__import__("os").sched_getaffinity(0)))
        assert apply_threads(2) == 2 and torch.get_num_threads() == 2
        with pytest.raises(MobizoError, match="--threads must be"):
            apply_threads(0)
    finally:
        torch.set_num_threads(before)


def test_resume_with_a_decaying_schedule_keeps_steps(tmp_path, run_cli):
    """--steps shapes every lr of a linear/cosine schedule: a resumed run may not change it."""
    flags = [
        "--queries",
        2,
        "--batch-size",
        4,
        "--max-length",
        32,
        "--eval-examples",
        8,
        "--eval-every",
        0,
        "--optimizer",
        "sgd",
        "--lr",
        2.0,
        "--eps",
        0.02,
        "--lr-schedule",
        "cosine",
        "--warmup-steps",
        1,
        "--no-progress",
    ]
    assert run_cli(["train", *flags, "--steps", 3, "--out", tmp_path / "r"])[0] == 0
    code, err = run_cli(["train", "--resume", "--out", tmp_path / "r", "--steps", 5, "--no-progress"])
    assert code == 2 and "--lr-schedule cosine --steps shapes every step's lr" in err
    import json

    lrs = [json.loads(x)["lr"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[1:]]
    assert lrs == pytest.approx([2.0, 2.0, 1.0])  # warmup to 2.0, then cosine over the remaining 2 steps
