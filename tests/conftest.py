"""Test-session settings and shared fixtures."""

import copy
import os

# One intra-op thread: the tiny model gains nothing from more, and on a busy (shared CI) machine
# OpenMP threads that wait on each other at every barrier make a 10 ms step take seconds.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# mobizo's cache (kept programs, weight-file digests): the session's own, not the user's
import tempfile

os.environ["MOBIZO_CACHE"] = tempfile.mkdtemp(prefix="mobizo-test-cache-")

import pytest
import torch

from mobizo.util import quiet_third_party

quiet_third_party()


# Fixtures that export an ExecuTorch program, build or run the native trainer, or start processes: a test that
# uses one is in the slow tier (`pytest -m "not slow"` is the quick loop; CI runs everything).
SLOW_FIXTURES = {
    "exports",
    "program",
    "programs",
    "bundle",
    "binary",
    "ref_run",
    "wide",
    "et_program",
    "quick",
    "fork",
    "references",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    """Every test runs in its own directory: runs without --out land in ./runs/ there, not in the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_pair():
    from mobizo.models import build_tiny

    return build_tiny()


@pytest.fixture
def tiny(tiny_pair):
    """A fresh copy of the built-in tiny model and its tokenizer."""
    model, tok = tiny_pair
    return copy.deepcopy(model), tok


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_pair):
    """The tiny model saved as a local Hugging Face checkpoint (config + safetensors + tokenizer)."""
    model, tok = tiny_pair
    d = tmp_path_factory.mktemp("tiny-hf")
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def synthetic_batch(tiny_pair):
    from mobizo.data import Encoder, collate
    from mobizo.tasks import get_task

    _, tok = tiny_pair
    exs = get_task("synthetic").load("train")[:8]
    enc = Encoder(tok)
    return collate([enc.example(e) for e in exs], tok.pad_token_id, 64)


def legacy_checkpoint(ck, native: bool = False) -> None:
    """Turn a checkpoint into format 1, as mobizo wrote it before ``SHA256SUMS``: the same files, ``state.json``
    without ``checkpoint_format`` and with the sha256 of its canonical JSON inside, no ``SHA256SUMS`` (what a run
    interrupted before the upgrade leaves behind). ``native``: ``state.json`` as mobizo-train wrote it (one line)."""
    import json

    from mobizo.checkpoint import SUMS, _state_sha256
    from mobizo.util import dumps

    path = ck / "state.json"
    state = json.loads(path.read_text())
    assert state.pop("checkpoint_format") == 2 and "sha256" not in state
    state["sha256"] = _state_sha256(state)
    path.write_text(json.dumps(state, sort_keys=True) + "\n" if native else dumps(state, indent=1, sort_keys=True))
    (ck / SUMS).unlink()


def run_cli(argv):
    """Run the CLI in-process; returns (exit code, stderr text)."""
    import contextlib
    import io

    from mobizo.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            code = e.code
    return code, err.getvalue()


torch.set_num_threads(1)
