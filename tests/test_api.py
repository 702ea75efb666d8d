"""The public Python API (README "Python API"), the run directory's ownership rules, and the bad input
that used to be silently ignored or an internal error."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mobizo
from mobizo import TrainConfig
from mobizo.errors import MobizoError

README = Path(__file__).resolve().parents[1] / "README.md"
FAST = [
    "--queries",
    2,
    "--batch-size",
    4,
    "--max-length",
    32,
    "--eval-examples",
    16,
    "--no-progress",
    "--eval-every",
    0,
    "--optimizer",
    "sgd",
    "--lr",
    2.0,
    "--eps",
    0.02,
]


def _readme_example() -> str:
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_python_api_example_runs(tmp_path):
    """The README's example, verbatim: train, resume, evaluate, PEFT-like model, ZO step by hand, objects."""
    env: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), env)  # noqa: S102 - our own README
    assert env["summary"]["final_step"] == 5 and env["logits"].shape[-1] == len(env["tokenizer"])
    assert env["losses"].shape == (2, 2) and torch.isfinite(env["g"]).all()
    assert (tmp_path / "runs" / "api-demo" / ".mobizo").is_file()
    # the hand-made step changed B and save_adapter wrote a PEFT adapter mobizo (and peft) read back
    from mobizo.checkpoint import read_adapter

    state, config = read_adapter(tmp_path / "runs" / "by-hand")
    assert config["r"] == 8 and any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in state.items())


def test_api_resume_equals_an_uninterrupted_run_and_the_cli(tmp_path, run_cli):
    cfg = TrainConfig.from_flat(
        queries=2,
        batch_size=4,
        optimizer="sgd",
        lr=2.0,
        eps=0.02,
        max_length=32,
        eval_every=0,
        eval_examples=16,
        save_every=3,
        progress=False,
    )
    full = mobizo.train(cfg, steps=8, out=str(tmp_path / "full"))
    mobizo.train(cfg, steps=4, out=str(tmp_path / "part"))
    resumed = mobizo.train(out=str(tmp_path / "part"), resume=True, steps=8, progress=False)  # the rest: saved
    assert resumed["config"] == full["config"] and resumed["final_loss"] == full["final_loss"]
    a, b = (load_file(str(tmp_path / r / "adapter" / "adapter_model.safetensors")) for r in ("full", "part"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    # and byte for byte: the safetensors metadata used to come out in a random order per write
    for f in (
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "checkpoint/adapter_model.safetensors",
    ):
        assert (tmp_path / "full" / f).read_bytes() == (tmp_path / "part" / f).read_bytes(), f
    meta = (tmp_path / "full" / "adapter" / "adapter_model.safetensors").read_bytes()[8:120]
    assert meta.startswith(b'{"__metadata__":{"format":"pt","lora_alpha":"16.0","r":"8","sha256":"'), meta
    # a changed trajectory flag is refused by the API exactly as by the CLI
    with pytest.raises(MobizoError, match="used --queries 2, not 3"):
        mobizo.train(out=str(tmp_path / "part"), resume=True, steps=9, queries=3, progress=False)
    code, err = run_cli(
        ["train", "--out", tmp_path / "part", "--resume", "--steps", 9, "--queries", 3, "--no-progress"]
    )
    assert code == 2 and "used --queries 2, not 3" in err
    # evaluate() = `mobizo eval --adapter`
    m = mobizo.evaluate(cfg, adapter=tmp_path / "full" / "adapter")
    code, _ = run_cli(
        [
            "eval",
            "--max-length",
            32,
            "--eval-examples",
            16,
            "--adapter",
            tmp_path / "full" / "adapter",
            "--json",
            tmp_path / "e.json",
            "--no-progress",
        ]
    )
    assert code == 0 and json.loads((tmp_path / "e.json").read_text())["accuracy"] == m["accuracy"]
    assert m["accuracy"] == full["eval_accuracy"]


def test_get_mplora_model_keeps_the_hf_call_and_output(tiny):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    model, tok = tiny
    ids = tok("The movie was great . It was", return_tensors="pt")
    before = model(**ids).logits
    out = mobizo.get_mplora_model(model, mobizo.MPLoRAConfig(rank=4, alpha=8, seed=1))
    assert out is model and model.mplora_layers and all(n.endswith(("q_proj", "v_proj")) for n in model.mplora_layers)
    res = model(**ids)
    assert isinstance(res, CausalLMOutputWithPast) and torch.equal(res.logits, before)  # B = 0: unchanged
    with pytest.raises(MobizoError, match="already has MP-LoRA layers"):
        mobizo.get_mplora_model(model)


def test_engines_satisfy_the_engine_protocol(tiny):
    from mobizo.engines import Engine
    from mobizo.engines.eager import EagerEngine

    model, _ = tiny
    mobizo.get_mplora_model(model)
    assert isinstance(EagerEngine(model, "prge"), Engine)


# ---------------------------------------------------------------- the run directory owns its files


def test_overwrite_refuses_foreign_folders_and_replaces_only_mobizo_entries(tmp_path, run_cli):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    (mine / "summary.json").write_text("{}")  # a name mobizo uses does not make it a run
    code, err = run_cli(["train", *FAST, "--steps", 1, "--out", mine, "--overwrite"])
    assert code == 2 and "not a mobizo run directory" in err and err.count("\n") == 1
    assert sorted(p.name for p in mine.iterdir()) == ["summary.json", "thesis.tex"]
    # `--out .` with --overwrite in a working directory: refused the same way, nothing deleted
    code, err = run_cli(["train", *FAST, "--steps", 1, "--out", ".", "--overwrite"])
    assert code == 2 and "not a mobizo run directory" in err
    # export --overwrite replaces only a program directory, and only if it holds nothing else
    code, err = run_cli(["export", "--out", mine, "--overwrite", "--no-progress"])
    assert code == 2 and "not a mobizo program directory" in err and "loading model" not in err  # checked first
    assert (mine / "thesis.tex").read_text() == "precious"
    code, err = run_cli(["replay", "--log", mine / "summary.json", "--out", mine / "thesis.tex"])
    assert code == 2 and "is not a directory" in err


@pytest.mark.slow  # two exports
def test_export_overwrite_replaces_a_program_with_its_tokenizer(tmp_path, run_cli):
    prog = tmp_path / "prog"
    lengths, rules = [], []
    # the second export replaces the first, tokenizer included; the update rule is the program's own
    for extra in ([], ["--overwrite", "--fixed-length", "--optimizer", "momentum"]):
        code, err = run_cli(["export", "--out", prog, "--no-progress", "--max-length", 24, *extra])
        assert code == 0, err
        manifest = json.loads((prog / "manifest.json").read_text())
        lengths.append(manifest["dynamic_length"])
        rules.append(manifest["optimizer"])
    assert sorted(p.name for p in prog.iterdir()) == [".mobizo", "manifest.json", "tokenizer", "train.pte"]
    assert lengths == [True, False]  # --fixed-length: a program for exactly --max-length tokens
    assert rules == ["fzoo", "momentum"]  # the default rule, spelled out


def test_resume_and_overwrite_exclude_each_other_and_out_defaults_under_runs(tmp_path, run_cli):
    code, err = run_cli(["train", *FAST, "--steps", 1, "--out", tmp_path / "x", "--resume", "--overwrite"])
    assert code == 2 and "exclude each other" in err
    code, err = run_cli(["train", *FAST, "--steps", 1])  # no --out: a fresh directory under ./runs
    assert code == 0, err
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("synthetic-prge-") and (run / "adapter").is_dir() and (run / ".mobizo").is_file()


# ---------------------------------------------------------------- flags that do not apply, former internal errors

BAD = [
    (["train", "--program", "p"], "--program applies to --engine executorch only"),
    (["train", "--reexport"], "--reexport applies to --engine executorch only"),
    (["train", "--fixed-length"], "--fixed-length applies to --engine executorch only"),
    (["train", "--optimizer", "adamw"], "--optimizer adamw is a first-order optimizer"),
    (["train", "--train-a"], "--train-a applies to --estimator fo only"),
    (["train", "--estimator", "fo", "--engine", "executorch"], "zeroth-order estimators"),
    (["train", "--template", "{text}"], "--template does not apply to task synthetic"),
    (["train", "--data", "d"], "--data does not apply to it"),
    (["eval", "--max-length", 0], "--max-length must be >= 2"),
    (["eval", "--eval-batch-size", 0], "--eval-batch-size must be >= 1"),
    (["eval", "--eval-batch-size", -1], "--eval-batch-size must be >= 1"),
    (["train", "--lr", "inf"], "--lr must be a finite number"),
    (["train", "--queries", "two"], "invalid int value"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[m for _, m in BAD])
def test_bad_flags_are_one_line_errors(tmp_path, argv, message, run_cli):
    code, err = run_cli([*argv, "--no-progress"])
    assert code == 2 and err.startswith("mobizo: error:") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "runs").exists()


def test_deeply_nested_json_is_a_clear_error(tmp_path, run_cli):
    line = '{"text": "a", "label": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
    (tmp_path / "d").mkdir()
    for split in ("train", "validation"):
        (tmp_path / "d" / f"{split}.jsonl").write_text(line)
    code, err = run_cli(
        [
            "train",
            "--task",
            "custom-cls",
            "--data",
            tmp_path / "d",
            "--template",
            "{text}",
            "--label-words",
            "a,b",
            "--steps",
            1,
            "--no-progress",
            "--out",
            tmp_path / "o",
        ]
    )
    assert code == 2 and "nested too deeply" in err and "train.jsonl:1" in err and not (tmp_path / "o").exists()


def test_huge_lr_is_caught_by_the_guard_and_all_json_is_strict(tmp_path, run_cli):
    out = tmp_path / "o"
    code, err = run_cli(["train", *FAST, "--steps", 5, "--lr", 1e30, "--out", out])
    assert code == 2 and "3 consecutive bad steps" in err
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r.get("skipped") for r in recs] == [True] * 3 and recs[0]["projected_grads"] == [None, None]
    assert json.loads((out / "summary.json").read_text())["status"] == "stopped"
    for f in out.rglob("*.json*"):
        text = f.read_text()
        assert "Infinity" not in text and "NaN" not in text, f
        docs = text.splitlines() if f.suffix == ".jsonl" else [text]
        for doc in docs:
            json.loads(doc, parse_constant=lambda c, f=f: pytest.fail(f"{f}: {c}"))
    code, err = run_cli(["replay", "--log", out / "metrics.jsonl", "--out", tmp_path / "re"])
    assert code == 0, err  # a log with null g in skipped steps replays


def test_the_api_prints_nothing_with_progress_off(tmp_path, tiny_dir):
    """mobizo.evaluate(..., progress=False) used to show transformers' "Loading weights" bar and torchao's
    "Failed to load .../_C_mxfp8...so" lines (printed when transformers imports torchao): a fresh process
    prints nothing but its result."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import mobizo\n"
        f"m = mobizo.evaluate(mobizo.TrainConfig.from_flat(model={str(tiny_dir)!r}), progress=False, eval_examples=4)\n"
        "print(m['n'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    for k in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "TORCH_CPP_LOG_LEVEL"):
        env.pop(k, None)  # (set by this test session's quiet_third_party)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and p.stdout == "4\n" and p.stderr == "", p.stderr
