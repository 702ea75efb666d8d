"""End to end through the CLI: outputs, resume, PEFT compatibility, FO baseline, bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file

FAST = [
    "--queries",
    2,
    "--batch-size",
    4,
    "--max-length",
    48,
    "--eval-examples",
    16,
    "--no-progress",
    "--optimizer",
    "sgd",
    "--lr",
    2.0,
    "--eps",
    0.02,
]


def _adapter(d):
    return load_file(str(d / "adapter" / "adapter_model.safetensors"))


def test_train_outputs_and_resume_is_the_same_trajectory(tmp_path, run_cli):
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_cli(["train", *FAST, "--steps", 12, "--eval-every", 6, "--save-every", 4, "--out", full])[0] == 0
    # metrics.jsonl: one record per step with the documented fields; eval records at 6 and 12
    recs = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()][1:]  # skip header
    assert [r["step"] for r in recs] == list(range(1, 13))
    assert {"step", "loss", "projected_grads", "lr", "eps", "seconds"} <= set(recs[0])
    assert len(recs[0]["projected_grads"]) == 2
    assert [r["step"] for r in recs if "eval_accuracy" in r] == [6, 12]
    summary = json.loads((full / "summary.json").read_text())
    assert summary["final_step"] == 12 and summary["eval_accuracy"] == recs[-1]["eval_accuracy"]
    assert summary["final_loss"] == recs[-1]["loss"]
    cfg = json.loads((full / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    # a run stopped at step 8 (say, killed after its checkpoint) and resumed ends bitwise equal
    assert run_cli(["train", *FAST, "--steps", 8, "--eval-every", 6, "--save-every", 4, "--out", part])[0] == 0
    code, err = run_cli(["train", "--out", part, "--resume", "--steps", 12])
    assert code == 0, err
    a, b = _adapter(full), _adapter(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(torch.count_nonzero(a[k]) for k in a if "lora_B" in k)
    rp = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r["loss"] for r in rp] == [r["loss"] for r in recs]
    # resuming a finished run to a later --steps continues it; conflicting flags are refused
    code, err = run_cli(["train", "--out", part, "--resume", "--queries", 4])
    assert code == 2 and "used --queries 2, not 4" in err


def test_adapter_loads_in_peft_and_matches_our_model(tmp_path, tiny_dir, run_cli):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    code, err = run_cli(["train", "--model", tiny_dir, *FAST, "--steps", 6, "--eval-every", 0, "--out", out])
    assert code == 0, err
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()

    from mobizo.checkpoint import read_adapter
    from mobizo.models import load_model
    from mobizo.mplora import inject, load_adapter_state

    ours, _ = load_model(str(tiny_dir))
    state, _ = read_adapter(out / "adapter")
    inject(ours, sorted({k.rsplit(".", 1)[0] for k in state}), 8, 16, 0)
    load_adapter_state(ours, state)
    ids = torch.randint(3, 500, (2, 12))
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = ours(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - plain).abs().max() > 1e-4  # the adapter changes the model
    # and `mobizo eval --adapter` scores the same as the end of training
    code, err = run_cli(
        [
            "eval",
            "--model",
            tiny_dir,
            "--adapter",
            out / "adapter",
            "--eval-examples",
            16,
            "--max-length",
            48,
            "--json",
            tmp_path / "e.json",
        ]
    )
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads((tmp_path / "e.json").read_text())["accuracy"] == summary["eval_accuracy"]


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_the_adapter_config_is_the_lora_config_peft_would_write(tmp_path, fan_in_fan_out):
    # mobizo writes adapter_config.json without importing PEFT (a run on a program never imports it):
    # PEFT must read it back as the very LoraConfig it would have written itself
    from peft import LoraConfig

    from mobizo.checkpoint import write_adapter

    state = {
        "model.layers.0.self_attn.q_proj.lora_A": torch.zeros(4, 8),
        "model.layers.0.self_attn.q_proj.lora_B": torch.zeros(8, 4),
        "model.layers.0.mlp.up_proj.lora_A": torch.zeros(4, 8),
        "model.layers.0.mlp.up_proj.lora_B": torch.zeros(16, 4),
    }
    write_adapter(tmp_path, state, 4, 8.0, "/models/base", fan_in_fan_out)
    want = LoraConfig(
        r=4,
        lora_alpha=8.0,
        target_modules=["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj"],
        lora_dropout=0.0,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path="/models/base",
    )
    got = LoraConfig.from_pretrained(str(tmp_path))
    assert got.to_dict() == want.to_dict()


def test_zero_shot_eval_without_adapter(tmp_path, capsys, run_cli):
    code, err = run_cli(["eval", "--eval-examples", 20, "--json", tmp_path / "z.json"])
    assert code == 0, err
    z = json.loads((tmp_path / "z.json").read_text())
    assert 0.0 <= z["accuracy"] <= 1.0 and z["n"] == 20 and z["adapter"] is None
    assert "accuracy" in capsys.readouterr().out


def test_first_order_baseline_learns(tmp_path, run_cli):
    code, err = run_cli(
        [
            "train",
            "--estimator",
            "fo",
            "--optimizer",
            "adamw",
            "--lr",
            3e-2,
            "--batch-size",
            8,
            "--steps",
            60,
            "--eval-every",
            0,
            "--eval-examples",
            64,
            "--max-length",
            48,
            "--no-progress",
            "--out",
            tmp_path / "fo",
        ]
    )
    assert code == 0, err
    recs = [json.loads(line) for line in (tmp_path / "fo" / "metrics.jsonl").read_text().splitlines()][1:]
    first = sum(r["loss"] for r in recs[:5]) / 5
    last = sum(r["loss"] for r in recs[-5:]) / 5
    assert last < 0.7 * first
    assert "projected_grads" in recs[0] and recs[0]["projected_grads"] == []


def test_zo_training_learns_the_synthetic_task(tmp_path, run_cli):
    """P-RGE on the random-init tiny model: validation accuracy clearly above the start."""
    code, err = run_cli(
        [
            "train",
            "--queries",
            4,
            "--batch-size",
            8,
            "--optimizer",
            "sgd",
            "--lr",
            4.0,
            "--eps",
            0.02,
            "--steps",
            200,
            "--eval-every",
            0,
            "--eval-examples",
            200,
            "--max-length",
            48,
            "--no-progress",
            "--out",
            tmp_path / "zo",
        ]
    )
    assert code == 0, err
    s = json.loads((tmp_path / "zo" / "summary.json").read_text())
    code, _ = run_cli(["eval", "--eval-examples", 200, "--max-length", 48, "--json", tmp_path / "z.json"])
    before = json.loads((tmp_path / "z.json").read_text())["accuracy"]
    assert s["eval_accuracy"] >= before + 0.1, (before, s["eval_accuracy"])


BAD = [
    (["train", "--estimator", "sgd"], "invalid choice: 'sgd'"),
    (["train", "--task", "nope"], "unknown task 'nope'"),
    (["train", "--queries", 0], "--queries must be >= 1"),
    (["train", "--queries", 3, "--batch-size", 16, "--data-mode", "split"], "divisible"),
    (["train", "--target-modules", "foo_proj"], "matched no layer"),
    (["train", "--model", "/nonexistent/model"], "does not exist"),
    (["train", "--lr", "-1"], "--lr must be a positive number"),
    (["train", "--max-length", 8, "--truncation", "error"], "longer than --max-length"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_clear_line_and_nothing_written(tmp_path, argv, message, run_cli):
    out = tmp_path / "out"
    code, err = run_cli([*argv, "--steps", 1, "--no-progress", "--out", out])
    assert code == 2
    assert message in err and err.startswith("mobizo: error:") and err.count("\n") == 1, err
    assert not out.exists()


def test_bad_model_dirs_and_data(tmp_path, run_cli):
    (tmp_path / "m").mkdir()
    code, err = run_cli(["train", "--model", tmp_path / "m", "--steps", 1])
    assert code == 2 and "no config.json" in err
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.jsonl").write_text('{"text": "fine", "label": "good"}\n{"text": "meh", "label": "awful"}\n')
    (d / "validation.jsonl").write_text('{"text": "ok", "label": 1}\n')
    args = [
        "train",
        "--task",
        "custom-cls",
        "--data",
        d,
        "--template",
        "Review: {text} Sentiment:",
        "--label-words",
        "bad,good",
        "--steps",
        1,
        "--out",
        tmp_path / "o",
    ]
    code, err = run_cli(args)
    assert code == 2 and "'awful' is not one of the label words" in err and not (tmp_path / "o").exists()
    (d / "train.jsonl").write_text("")
    code, err = run_cli(args)
    assert code == 2 and "empty" in err
    (d / "train.jsonl").write_text('{"text": "fine", "label": 1}\n{"text": broken\n')
    code, err = run_cli(args)
    assert code == 2 and "malformed JSON" in err


def test_help_says_model_takes_a_gguf_file(capsys):
    from mobizo.cli import main

    for command in ("train", "eval", "export"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help at the terminal width
        model_help = text[text.rindex("--model MODEL") :]  # the option's entry, after the usage line
        assert model_help.startswith("--model MODEL local Hugging Face model directory, a .gguf file"), model_help[:120]


def test_futile_warmup_and_rank_are_warned_in_one_line_each(tmp_path, run_cli):
    code, err = run_cli(
        ["train", *FAST, "--steps", 2, "--warmup-steps", 5000, "--rank", 48, "--eval-every", 0, "--out", tmp_path / "r"]
    )
    assert code == 0, err
    assert err.splitlines() == [
        (
            "mobizo: warning: --warmup-steps 5000 outlasts --steps 2: the lr ramps only to 2/5000 of --lr 2 and "
            "never reaches it"
        ),
        # tiny's v_proj maps 64 features to 2 kv heads x 16
        (
            "mobizo: warning: --rank 48 exceeds the width of model.layers.0.self_attn.v_proj (64 -> 32): its update "
            "has rank 32 at most; the rank beyond that adds cost, not capacity (use --rank 32 or less)"
        ),
    ]
    # (without the start's eval: a 2-step run at lr 2 may end worse than it began, which is warned too)
    flags = ["--steps", 2, "--warmup-steps", 2, "--rank", 32, "--no-eval-at-start"]
    code, err = run_cli(["train", *FAST, *flags, "--out", tmp_path / "s"])
    assert code == 0 and err == "", err


def test_off_a_terminal_training_prints_progress_lines(tmp_path, monkeypatch, run_cli):
    """A run whose stderr is a log (not a terminal) used to print nothing until its result line: it now
    prints a progress line every LINE_SECONDS (30 s) and one at the end; --no-progress silences them."""
    import re

    from mobizo import progress

    flags = [a for a in FAST if a != "--no-progress"] + ["--eval-every", 2, "--steps", 4, "--no-eval-at-start"]
    code, err = run_cli(["train", *flags, "--out", tmp_path / "a"])  # (run_cli's stderr is not a terminal)
    assert code == 0, err
    assert re.fullmatch(
        r"mobizo: eager/prge step 4/4: loss \d\.\d{4}, accuracy \d\.\d{4}, \d+\.\d\d s/step, \d+s in all\n", err
    ), err
    monkeypatch.setattr(progress, "LINE_SECONDS", 0.0)  # a line at every step
    code, err = run_cli(["train", *flags, "--out", tmp_path / "b"])
    assert code == 0, err
    lines = err.splitlines()
    assert len(lines) == 4, err
    for step, line in enumerate(lines, 1):
        eval_part = r", accuracy \d\.\d{4}" if step >= 2 else ""
        end = r"eta \d+s" if step < 4 else r"\d+s in all"
        assert re.fullmatch(
            rf"mobizo: eager/prge step {step}/4: loss \d\.\d{{4}}{eval_part}, \d+\.\d\d s/step, {end}", line
        ), line
    code, err = run_cli(["train", *flags, "--no-progress", "--out", tmp_path / "c"])
    assert code == 0 and err == "", err
