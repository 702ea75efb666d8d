"""Build-time checks the CLI runs before anything is written: --max-length vs the model's positions,
candidates that tokenize to nothing."""

import pytest
import torch

from mobizo.data import Encoder, check_candidates
from mobizo.errors import MobizoError
from mobizo.models import check_max_length, max_positions
from mobizo.tasks import Example


def test_max_length_beyond_the_position_table(tiny):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)).eval()
    with pytest.raises(IndexError):  # what an unchecked --max-length 40 runs into
        gpt2(input_ids=torch.zeros((1, 40), dtype=torch.long))
    assert max_positions(gpt2) == 32
    check_max_length(gpt2, 32)
    with pytest.raises(MobizoError, match=r"--max-length 40 is longer than the 32 positions of model") as e:
        check_max_length(gpt2, 40)
    assert "\n" not in str(e.value)
    model, _ = tiny
    assert max_positions(model) == 512
    check_max_length(model, 512)
    with pytest.raises(MobizoError, match="512 positions"):
        check_max_length(model, 513)


def test_max_length_defaults_to_what_the_model_allows(tmp_path, tiny_dir, run_cli):
    """A model with 64 positions: the default --max-length (128) used to be an error there; it is now 64.
    A --max-length the user gives beyond the positions stays an error."""
    import json
    import shutil

    d = tmp_path / "short"
    shutil.copytree(tiny_dir, d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    argv = ["train", "--model", d, "--steps", 1, "--queries", 2, "--batch-size", 2, "--eval-examples", 4]
    code, err = run_cli([*argv, "--no-progress", "--out", tmp_path / "run"])
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    header = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert summary["config"]["max_length"] == header["config"]["max_length"] == 64
    code, err = run_cli([*argv, "--max-length", 128, "--no-progress", "--out", tmp_path / "given"])
    assert code == 2 and not (tmp_path / "given").exists()
    assert (
        err
        == f"mobizo: error: --max-length 128 is longer than the 64 positions of model {d}; use --max-length 64 or less\n"
    )
    code, err = run_cli(["eval", "--model", d, "--eval-examples", 4, "--no-progress"])
    assert code == 0, err
    code, err = run_cli(
        [
            "train",
            "--steps",
            1,
            "--queries",
            2,
            "--batch-size",
            2,
            "--eval-examples",
            4,
            "--no-progress",
            "--out",
            tmp_path / "tiny",
        ]
    )
    assert code == 0 and json.loads((tmp_path / "tiny" / "summary.json").read_text())["config"]["max_length"] == 128


def test_candidates_that_tokenize_to_nothing(tiny):
    _, tok = tiny
    enc = Encoder(tok)
    good = [Example(prompt="Review: fine Sentiment:", candidates=[" bad", " good"], label=0)]
    check_candidates(enc, good, "train")
    bad = good + [Example(prompt="Review: x Sentiment:", candidates=[" bad", ""], label=1)]
    with pytest.raises(MobizoError, match=r"train example 2: candidate '' tokenizes to no tokens") as e:
        check_candidates(enc, bad, "train")
    assert "\n" not in str(e.value)
    with pytest.raises(MobizoError, match="validation example 1: answer ''"):
        check_candidates(enc, [Example(prompt="Q:", target="")], "validation")
