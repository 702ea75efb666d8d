"""What the ExecuTorch path holds in memory: no base weights in the Python process, one packed copy
of the frozen weights whichever methods are loaded (issue: training inside the runtime must be the
lightest way to train). Asserts on what is loaded, not on timings."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from mobizo.build import assemble, build_engine
from mobizo.config import TrainConfig

# one wide layer: its packed weights (~13 MB) stand well above the allocator's noise
WIDE = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=1,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def common(tiny_flags):
    """The tiny run's flags without the model (each test names its own), at 24 tokens, lr 0.5 and seed 1."""
    return tiny_flags(model=None, max_length=24, eval_examples=8, lr=0.5, seed=1)


@pytest.fixture(scope="module")
def wide(tmp_path_factory, tiny_pair, common):
    """(model dir, program dir): a one-layer 512-wide Llama saved as a checkpoint, and its program."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mobizo.build import export

    _, tok = tiny_pair
    d = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), **WIDE)).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    export(TrainConfig.from_flat(model=str(d / "model"), **common), str(d / "program"))
    return d / "model", d / "program"


def test_a_run_on_a_program_loads_no_base_weights(wide, tmp_path, monkeypatch, common):
    # Modules that bind these loaders by name at import (``from safetensors import safe_open``) are
    # imported first: one imported while they are patched would keep the refusing stand-in for good
    # and fail later tests (peft's adapter loading did, when this test ran before test_native).
    import peft.utils.save_and_load  # noqa: F401
    import safetensors.torch
    import transformers
    import transformers.modeling_utils

    from mobizo import models

    model_dir, program = wide

    def refuse(*a, **k):
        raise AssertionError("the base weights were loaded")

    # every way the weights could be read: mobizo's loader, transformers', safetensors'
    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    cfg = TrainConfig.from_flat(model=str(model_dir), **common, engine="executorch", program=str(program))
    from mobizo.build import needs_weights

    assert not needs_weights(cfg)
    run = assemble(cfg, weights=False)
    from mobizo.engines.executorch import ProgramBase

    # not even the architecture: what the run needs of the model comes from the program
    assert isinstance(run.model, ProgramBase) and list(run.model.adapter_shapes) == run.targets
    build_engine(run)  # identity checked from the manifest and the weight files' sha256
    from mobizo.trainer import make_batch

    out = run.engine.train_step(make_batch(run, 1), 1, 0.5, 0.05)
    assert len(out.projected_grads) == 2
    # and through the trainer, eval included
    from mobizo.trainer import train

    summary = train(cfg.replace(steps=3, out=str(tmp_path / "run")))
    assert summary["eval"]["loss"] > 0 and (tmp_path / "run" / "adapter").is_dir()


def test_changed_weight_files_are_refused_without_loading_them(wide, tmp_path, common):
    import shutil

    from mobizo.errors import MobizoError

    model_dir, program = wide
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    from safetensors.torch import load_file, save_file

    f = next(other.glob("*.safetensors"))
    state = load_file(str(f))
    k = next(iter(state))
    state[k] = state[k] + 1
    save_file(state, str(f), metadata={"format": "pt"})
    cfg = TrainConfig.from_flat(model=str(other), **common, engine="executorch", program=str(program))
    with pytest.raises(MobizoError, match="base_weights_sha256"):
        build_engine(assemble(cfg, weights=False))


# Loads train_step, then score, in a fresh process; prints the anonymous memory each load added.
PROBE = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon"):
                return int(line.split()[1]) * 1024

    program, shared = Path(sys.argv[1]), sys.argv[2] == "engine"
    if shared:
        from mobizo.engines.executorch import ExecuTorchEngine
        eng = ExecuTorchEngine(program)
        before = anon()
        eng._method("score")
        print(json.dumps({"score": anon() - before, "shared": eng.shared_weights}))
    else:  # the stock runtime as it comes: every method packs its own copy
        from executorch.runtime import Runtime
        p = Runtime.get().load_program(program / "train.pte")
        p.load_method("train_step")
        before = anon()
        p.load_method("score")
        print(json.dumps({"score": anon() - before, "shared": False}))
""")


def test_the_frozen_weights_are_packed_once_across_methods(wide):
    model_dir, program = wide
    from safetensors import safe_open

    f = next(model_dir.glob("*.safetensors"))
    with safe_open(str(f), "pt") as st:  # the XNNPACK-run linears: every projection, and the LM head
        linear = sum(st.get_tensor(k).numel() * 4 for k in st.keys() if k.endswith("proj.weight"))  # noqa: SIM118
        head = st.get_tensor("lm_head.weight").numel() * 4

    def probe(mode):
        r = subprocess.run(
            [sys.executable, "-c", PROBE, str(program), mode], capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    stock, ours = probe("stock"), probe("engine")
    # the measurement sees a second copy when there is one...
    assert stock["score"] > 0.8 * linear, (stock, linear, head)
    # ...and the engine's score method adds none, not even the LM head: the shared-prompt train step
    # reads only the candidates' rows of it (step.candidate_logits), and score runs it unpacked
    # (export.UnpackedHead), so nothing ever packs it
    assert ours["shared"] and ours["score"] < 0.5 * head, (ours, linear, head)


# Trains three steps in a fresh process; prints the locked memory, the losses and B.
LOCK_PROBE = textwrap.dedent("""
    import json, sys
    from mobizo.build import assemble, build_engine
    from mobizo.config import TrainConfig
    from mobizo.engines.executorch import runtime
    from mobizo.trainer import make_batch

    if sys.argv[3] == "stock":
        runtime.release_program_pages = lambda path: 0
    cfg = TrainConfig.from_flat(**json.loads(sys.argv[1]), engine="executorch", program=sys.argv[2])
    run = assemble(cfg, weights=False)
    eng = build_engine(run)
    losses = [eng.train_step(make_batch(run, s), s, 0.5, 0.05).losses for s in (1, 2, 3)]
    b = {k: v.tolist() for k, v in eng.adapter_state().items() if k.endswith("lora_B")}
    locked = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmLck"))
    print(json.dumps({"locked_kb": locked, "losses": losses, "b": b}))
""")


def test_the_program_is_not_kept_locked_in_memory(wide, common):
    """The Python runtime locks every segment of the .pte it loads (the embedding table the portable
    gather reads, all of it); the engine unlocks and drops those clean file pages after each load, so
    only the rows the steps touch come back. Same numbers as with the pages kept."""
    model_dir, program = wide

    def probe(mode):
        r = subprocess.run(
            [sys.executable, "-c", LOCK_PROBE, json.dumps({**common, "model": str(model_dir)}), str(program), mode],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    stock, ours = probe("stock"), probe("engine")
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    embedding = vocab * WIDE["hidden_size"] * 4  # the input embedding table, float32
    assert stock["locked_kb"] * 1024 >= embedding, stock["locked_kb"]  # the measurement sees the lock...
    assert ours["locked_kb"] == 0  # ...and the engine leaves none
    assert ours["losses"] == stock["losses"] and ours["b"] == stock["b"]


@pytest.mark.slow  # exports
def test_a_run_that_changes_only_program_inputs_reuses_the_kept_export(tmp_path, monkeypatch, common):
    """lr, eps, steps and --out are inputs of the program, not part of it: the second run gets the
    program the first exported from the cache (hard links), without exporting."""
    import os

    from mobizo import build
    from mobizo.trainer import train

    cfg = TrainConfig.from_flat(model="tiny", **{**common, "max_length": 20}, engine="executorch", steps=2)
    train(cfg.replace(out=str(tmp_path / "a")))

    def refuse(*a, **k):
        raise AssertionError("exported again")

    monkeypatch.setattr(build, "export_program", refuse)
    summary = train(cfg.replace(lr=0.1, eps=0.01, steps=3, out=str(tmp_path / "b")))
    assert summary["eval"]["loss"] > 0
    a, b = tmp_path / "a" / "program" / "train.pte", tmp_path / "b" / "program" / "train.pte"
    assert a.read_bytes() == b.read_bytes()
    assert os.stat(b).st_nlink >= 2  # a link to the kept copy, not a second copy on disk
    # a change the program is built from (q) is not served from the cache
    with pytest.raises(AssertionError, match="exported again"):
        train(cfg.replace(queries=4, out=str(tmp_path / "c")))
    # nor is a run that asks for a --fixed-length program (the kept one takes any length)
    with pytest.raises(AssertionError, match="exported again"):
        train(cfg.replace(fixed_length=True, out=str(tmp_path / "d")))


# Trains three steps on the program in a fresh process (eval and adapter saving included); prints
# which heavy modules the process imported, the logged losses, the eval and the adapter's B.
LIGHT_PROBE = textwrap.dedent("""
    import json, sys
    from mobizo import build
    from mobizo.config import TrainConfig
    from mobizo.trainer import train

    if sys.argv[3] == "skeleton":  # the run as it was before ProgramBase: the architecture on meta
        build.program_base = lambda cfg: None
    cfg = TrainConfig.from_flat(**json.loads(sys.argv[1]), engine="executorch", program=sys.argv[2])
    summary = train(cfg)
    from safetensors.torch import load_file
    from pathlib import Path
    out = Path(cfg.run.out)
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    b = {k: v.tolist() for k, v in load_file(str(out / "adapter" / "adapter_model.safetensors")).items()}
    heavy = sorted(m for m in sys.modules if m == "torch._dynamo" or m == "peft" or m.startswith(
        ("transformers.models.", "transformers.modeling_utils", "transformers.configuration_utils")))
    print(json.dumps({"heavy": heavy, "losses": [r["loss"] for r in records if "loss" in r],
                      "eval": summary["eval"], "b": b, "config": (out / "adapter" / "adapter_config.json").read_text()}))
""")


def test_a_run_on_a_program_imports_no_model_code_and_trains_the_same(wide, tmp_path, common):
    model_dir, program = wide
    # the run reads the tokenizer the program carries, not the model's (identical on the run's texts)
    assert (program / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((program / "manifest.json").read_text())["tokenizer"] == "tokenizer"

    def probe(mode):
        flat = dict(model=str(model_dir), **common, steps=3, eval_every=0, save_every=0, out=str(tmp_path / mode))
        r = subprocess.run(
            [sys.executable, "-c", LIGHT_PROBE, json.dumps(flat), str(program), mode],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    light, skeleton = probe("light"), probe("skeleton")
    # no transformers config or model code, no torch._dynamo, no PEFT: ~190 MiB resident the run never pays
    assert light["heavy"] == [], light["heavy"]
    assert "torch._dynamo" in skeleton["heavy"]  # what the probe sees when they are imported
    assert len(light["losses"]) == 3
    assert light["losses"] == skeleton["losses"] and light["b"] == skeleton["b"]
    timing = ("seconds", "examples_per_second")
    assert {k: v for k, v in light["eval"].items() if k not in timing} == {
        k: v for k, v in skeleton["eval"].items() if k not in timing
    }
    assert light["config"] == skeleton["config"]


def test_a_program_is_checked_against_the_adapter_the_run_asks_for(wide, common):
    from mobizo.errors import MobizoError

    model_dir, program = wide
    cfg = TrainConfig.from_flat(
        model=str(model_dir), **common, engine="executorch", program=str(program), target_modules="q_proj"
    )
    with pytest.raises(MobizoError, match="target_spec"):
        build_engine(assemble(cfg, weights=False))


# Trains a step, evaluates, then trains a step, in a fresh process; prints the resident bytes of train.pte's
# mapping after each (the unpacked LM head is read from the mapping by score).
PAGES_PROBE = textwrap.dedent("""
    import json, sys
    from mobizo.build import assemble, build_engine
    from mobizo.config import TrainConfig
    from mobizo.trainer import make_batch, run_eval

    def mapped():
        total, inside = 0, False
        for line in open("/proc/self/smaps"):
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = line.rstrip().endswith("train.pte")
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
        return total

    cfg = TrainConfig.from_flat(**json.loads(sys.argv[1]), engine="executorch", program=sys.argv[2])
    run = assemble(cfg, weights=False)
    eng = build_engine(run)
    eng.train_step(make_batch(run, 1), 1, 0.5, 0.05)
    after_step = mapped()
    run_eval(run)  # the trainer's eval: score over the validation examples
    after_eval = mapped()
    eng.train_step(make_batch(run, 1), 1, 0.5, 0.05)  # the same step again: it touches the same pages
    print(json.dumps({"after_step": after_step, "after_eval": after_eval, "after_next_step": mapped()}))
""")


def test_the_pages_an_eval_reads_are_released_when_training_resumes(wide, common):
    model_dir, program = wide
    r = subprocess.run(
        [sys.executable, "-c", PAGES_PROBE, json.dumps(dict(model=str(model_dir), **common)), str(program)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    # eval reads more of the mapping than a step (score's unpacked LM head: all of it); the next step
    # lets those pages go and holds what a step holds
    assert got["after_eval"] > got["after_step"] > 0, got
    assert got["after_next_step"] == got["after_step"], got
