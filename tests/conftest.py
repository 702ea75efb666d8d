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


# The tiny training run the engine tests export and train (test_executorch, test_native, test_quantize, ...): two
# query directions over batches of four at 32 tokens, whose program exports in about a minute on two cores. A
# module states only how its run differs. A changed field changes the exported program, whose shapes (queries,
# batch, length in the manifest) the tests compare against.
TINY_RUN = dict(
    model="tiny",
    task="synthetic",
    queries=2,
    batch_size=4,
    max_length=32,
    eval_examples=24,
    eval_batch_size=8,
    optimizer="sgd",  # lr 1.0 is ZO-SGD's scale on tiny; pinned, so the default rule can move
    lr=1.0,
    eps=0.05,
    seed=3,
    progress=False,
)


@pytest.fixture(scope="session")
def tiny_flags():
    """``tiny_flags(**differences)``: a fresh dict of the tiny run's ``TrainConfig.from_flat`` fields. A difference
    of None leaves that field out: TrainConfig's default, or a value the caller passes itself."""

    def make(**differences):
        return {k: v for k, v in {**TINY_RUN, **differences}.items() if v is not None}

    return make


@pytest.fixture
def synthetic_batch(tiny_pair):
    from mobizo.data import Encoder, collate
    from mobizo.tasks import get_task

    _, tok = tiny_pair
    exs = get_task("synthetic").load("train")[:8]
    enc = Encoder(tok)
    return collate([enc.example(e) for e in exs], tok.pad_token_id, 64)


def _run_cli(argv):
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


@pytest.fixture(scope="session")
def run_cli():
    """``run_cli(argv)`` runs the CLI in-process and returns (exit code, stderr text). Session-scoped so that
    module and session fixtures (an export, a bench run) can use it too."""
    return _run_cli


torch.set_num_threads(1)
