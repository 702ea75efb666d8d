"""mobizo export-adapter: an adapter as a llama.cpp LoRA GGUF, or merged into its base (a Hugging Face
checkpoint, a GGUF), checked against llama.cpp itself (llama-cpp-python's bindings, tests/_llamacpp.py)
and transformers.

The base is the built-in tiny Llama written as an F32 llama GGUF (llama.cpp's names, q/k permutation
and a byte-level BPE vocabulary: tests/test_gguf.py's writer); the adapter is random and nonzero on
every linear layer (GQA q/k of different head counts, and the untied output layer), strong enough to
move the logits by 1.9 where they span +-1.8. The reference is mobizo's eager model: the same GGUF
loaded by mobizo, the adapter loaded with ``mobizo.load_adapter``. 8 prompts of 8 to 101 tokens.

Tolerances (measured on the 2-core development machine, llama-cpp-python 0.3.36):

* F32 LoRA GGUF and F32 merged GGUF in llama.cpp: 7.6e-7 / 8.9e-7 max |logit diff| (float32
  summation order); asserted at 1e-5, still 1e5 times below the adapter's effect. Greedy: the same 32
  tokens on every prompt (the smallest top-2 gap along mobizo's continuations is 2.8e-4, 370 times
  the difference).
* F16 / BF16 / Q8_0 merged GGUF: every tensor byte-identical to llama.cpp's own quantization
  (``llama_model_quantize``) of the F32 merge, so the logits are llama.cpp's; their distance to the
  adapter model is the rounding of the weights (and, in llama.cpp's F16/Q8_0 matmuls, of the
  activations): 8.4e-4 (F16), 8.3e-3 (BF16) and 2.2e-2 (Q8_0) measured, the size of llama.cpp's own
  F16 / Q8_0 of the base alone against the base (3.4e-4 / 9.4e-3); asserted below 1 % / 3 % / 10 %
  of the adapter's effect (measured 0.05 % / 0.4 % / 1.2 %).
* F16 / BF16 / Q8_0 LoRA GGUF: A and B rounded (and the activations, in llama.cpp's Q8_0 matmul):
  1.2e-3 / 1.4e-2 / 3.3e-2 measured (0.07 % / 0.7 % / 1.8 % of the effect), asserted below
  0.5 % / 3 % / 5 %.
* merged Hugging Face checkpoint in transformers: 8.5e-7 measured, asserted at 1e-5.
* leaving out the q/k permutation of B moves llama.cpp's logits by 0.10: asserted > 0.05.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from _gguf import write_gguf

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
RANK, ALPHA = 4, 8.0
N_NEW = 32
TEXTS = [
    "the movie was great, I loved it",
    "Review: a truly great movie! Sentiment:",
    "hello world",
    "one two three four five six seven eight nine ten",
]


@pytest.fixture(scope="module")
def llama_cpp_model():
    # llama.cpp itself (llama-cpp-python, built from its PyPI sdist by .ci/run), not a re-implementation
    from _llamacpp import LlamaCpp

    return LlamaCpp


def _random_adapter(model, seed=0, scale=0.1):
    from mobizo.mplora import MPLoRAConfig, get_mplora_model, lora_layers

    get_mplora_model(model, MPLoRAConfig(rank=RANK, alpha=ALPHA, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * scale)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def _greedy(model, ids, n=N_NEW):
    cur, out, gap = list(ids), [], float("inf")
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([cur])).logits[0, -1]
            top = torch.topk(logits, 2).values
            gap = min(gap, float(top[0] - top[1]))
            out.append(int(logits.argmax()))
            cur.append(out[-1])
    return out, gap


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_pair):
    """The GGUF base, the adapter (saved by mobizo), prompts, and mobizo's logits / greedy tokens."""
    from mobizo.api import load_adapter, save_adapter
    from mobizo.models import load_model

    d = tmp_path_factory.mktemp("deploy")
    src, tok = tiny_pair
    base = write_gguf(src, tok, d / "tiny.gguf")
    trained, _ = load_model(str(base))
    save_adapter(_random_adapter(trained), d / "adapter")
    model, _ = load_model(str(base))
    load_adapter(model, d / "adapter")  # the reference: mobizo's model with the saved adapter
    plain, _ = load_model(str(base))
    rng = np.random.default_rng(0)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    prompts += [[tok.bos_token_id, *rng.integers(3, len(tok), size=n).tolist()] for n in (7, 30, 60, 100)]
    greedy = [_greedy(model, p) for p in prompts]
    return dict(
        dir=d,
        base=base,
        adapter=d / "adapter",
        tok=tok,
        model=model,
        prompts=prompts,
        ref=[_logits(model, p) for p in prompts],
        plain=[_logits(plain, p) for p in prompts],
        greedy=[g for g, _ in greedy],
        gap=min(gap for _, gap in greedy),
    )


def _max_diff(a, b) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


@pytest.fixture(scope="session")
def cli_export(run_cli):
    """``cli_export(*argv)``: `mobizo export-adapter ARGV`, which must succeed."""

    def call(*argv):
        code, err = run_cli(["export-adapter", *argv, "--no-progress"])
        assert code == 0, err
        return code

    return call


def _run_llama_cpp(LlamaCpp, model, loras, prompts, greedy=True):
    with LlamaCpp(model, loras) as llm:
        logits = [llm.logits(p) for p in prompts]
        tokens = [llm.greedy(p, N_NEW) for p in prompts] if greedy else None
    return logits, tokens


def test_lora_gguf_in_llama_cpp_equals_mobizo(world, llama_cpp_model, tmp_path, monkeypatch, cli_export):
    import gguf

    from mobizo import deploy

    out = tmp_path / "lora.gguf"
    cli_export("--adapter", world["adapter"], "--format", "lora-gguf", "--out", out)
    r = gguf.GGUFReader(out)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == ALPHA
    shapes = {t.name: (t.tensor_type.name, [int(x) for x in t.shape]) for t in r.tensors}
    assert shapes["blk.1.attn_k.weight.lora_a"] == ("F32", [64, RANK])  # ggml order: [in, r]
    assert shapes["blk.1.attn_k.weight.lora_b"] == ("F32", [RANK, 32])  # [r, out]; 2 KV heads of 16
    assert shapes["output.weight.lora_b"] == ("F32", [RANK, len(world["tok"])])
    assert len(shapes) == 2 * (7 * 2 + 1)

    base_only, _ = _run_llama_cpp(llama_cpp_model, world["base"], [], world["prompts"], greedy=False)
    assert _max_diff(base_only, world["plain"]) < 1e-5  # llama.cpp reads the base as mobizo does
    effect = _max_diff(world["plain"], world["ref"])
    assert effect > 0.5  # the adapter really moves the logits
    logits, tokens = _run_llama_cpp(llama_cpp_model, world["base"], [out], world["prompts"])
    diff = _max_diff(logits, world["ref"])
    assert diff < 1e-5
    assert tokens == world["greedy"]
    assert world["gap"] > 10 * diff  # no near-tie along the continuations: the greedy match is not luck

    # the q/k permutation of B is what makes it agree: without it llama.cpp computes something else
    monkeypatch.setattr(deploy, "permute_rows", lambda w, n: w)
    cli_export("--adapter", world["adapter"], "--format", "lora-gguf", "--out", out, "--overwrite")
    wrong, _ = _run_llama_cpp(llama_cpp_model, world["base"], [out], world["prompts"], greedy=False)
    assert _max_diff(wrong, world["ref"]) > 0.05


def test_lora_gguf_outtypes(world, llama_cpp_model, tmp_path, cli_export):
    """F16 / BF16 / Q8_0 LoRA files: llama.cpp loads them (Q8_0 A; B's rows of r=4 values fall back to F16, as
    llama.cpp's converter does), within the rounding (module docstring)."""
    import gguf

    effect = _max_diff(world["plain"], world["ref"])
    cases = (("f16", ("F16", "F16"), 5e-3), ("bf16", ("BF16", "BF16"), 3e-2), ("q8_0", ("Q8_0", "F16"), 5e-2))
    for outtype, types, bound in cases:
        out = tmp_path / f"lora-{outtype}.gguf"
        cli_export("--adapter", world["adapter"], "--format", "lora-gguf", "--out", out, "--outtype", outtype)
        got = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
        assert (got["blk.0.attn_q.weight.lora_a"], got["blk.0.attn_q.weight.lora_b"]) == types
        logits, _ = _run_llama_cpp(llama_cpp_model, world["base"], [out], world["prompts"], greedy=False)
        assert _max_diff(logits, world["ref"]) < bound * effect


def _quantize_with_llama_cpp(src, dst, ftype):
    import ctypes

    import llama_cpp as lc

    p = lc.llama_model_quantize_default_params()
    p.ftype, p.nthread = ftype, 1
    assert lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) == 0


def test_merged_gguf_in_llama_cpp(world, llama_cpp_model, tmp_path, cli_export):
    import gguf

    f32 = tmp_path / "merged-f32.gguf"
    cli_export("--adapter", world["adapter"], "--format", "merged-gguf", "--outtype", "f32", "--out", f32)
    logits, tokens = _run_llama_cpp(llama_cpp_model, f32, [], world["prompts"])
    assert _max_diff(logits, world["ref"]) < 1e-5
    assert tokens == world["greedy"]

    # every metadata key of the base (tokenizer included) comes along; the file type is the new one
    src = {k: f.contents() for k, f in gguf.GGUFReader(world["base"]).fields.items() if not k.startswith("GGUF.")}
    effect = _max_diff(world["plain"], world["ref"])
    for outtype, ftype, bound in (("f16", 1, 0.01), ("bf16", 32, 0.03), ("q8_0", 7, 0.1)):
        ours = tmp_path / f"merged-{outtype}.gguf"
        cli_export("--adapter", world["adapter"], "--format", "merged-gguf", "--outtype", outtype, "--out", ours)
        theirs = tmp_path / f"llama-cpp-{outtype}.gguf"
        _quantize_with_llama_cpp(f32, theirs, ftype)
        a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
        ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
        assert sorted(ta) == sorted(tb)
        for name, t in ta.items():
            assert t.tensor_type == tb[name].tensor_type, name
            assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(tb[name].data).view(np.uint8)), name
        fields = {k: f.contents() for k, f in a.fields.items() if not k.startswith("GGUF.")}
        assert fields.pop("general.file_type") == ftype and fields.pop("general.quantization_version") == 2
        assert fields == {k: v for k, v in src.items() if k != "general.file_type"}
        logits, _ = _run_llama_cpp(llama_cpp_model, ours, [], world["prompts"], greedy=False)
        assert _max_diff(logits, world["ref"]) < bound * effect


def test_merged_hf_loads_in_transformers_with_mobizos_logits(world, tmp_path, cli_export):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    cli_export("--adapter", world["adapter"], "--format", "merged-hf", "--out", out)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    for text in TEXTS:
        assert tok(text)["input_ids"] == world["tok"](text)["input_ids"]
    assert _max_diff([_logits(model, p) for p in world["prompts"]], world["ref"]) < 1e-5


def test_merged_hf_folds_conv1d_transposed(tmp_path, tiny_pair, run_cli, cli_export):
    """GPT-2's Conv1D stores W as (in, out): the merge adds (B A)^T there."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from mobizo.api import save_adapter
    from mobizo.models import random_model
    from mobizo.mplora import MPLoRAConfig, get_mplora_model, lora_layers

    _, tok = tiny_pair
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64)
    base = random_model(GPT2LMHeadModel, cfg, 7, "gpt2-tiny")
    base.save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    tok.save_pretrained(tmp_path / "gpt2")
    model = random_model(GPT2LMHeadModel, cfg, 7, str(tmp_path / "gpt2"))
    get_mplora_model(model, MPLoRAConfig(rank=RANK, alpha=ALPHA, target_modules=["c_attn", "c_fc"]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.2)
    save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    cli_export("--adapter", tmp_path / "adapter", "--format", "merged-hf", "--out", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    ids = [1, 40, 77, 5, 300, 12, 9]
    assert _max_diff([_logits(merged, ids)], [_logits(model, ids)]) < 1e-5
    assert _max_diff([_logits(base, ids)], [_logits(model, ids)]) > 1e-2
    # llama.cpp's LoRA format is not verified for GPT-2: refused with one line
    code, err = run_cli(
        ["export-adapter", "--adapter", tmp_path / "adapter", "--format", "lora-gguf", "--out", tmp_path / "x.gguf"]
    )
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "x.gguf").exists()
    assert "llama.cpp export is verified for model type gemma3_text, llama only, not 'gpt2'" in err


def test_hf_base_gives_the_same_lora_gguf(world, tiny_dir, tmp_path, cli_export):
    """The adapter on the tiny model's Hugging Face checkpoint (what llama.cpp's convert_hf_to_gguf.py
    reads) exports to the same tensors as on its GGUF."""
    import gguf

    cli_export("--adapter", world["adapter"], "--format", "lora-gguf", "--out", tmp_path / "a.gguf")
    cli_export(
        "--adapter", world["adapter"], "--model", tiny_dir, "--format", "lora-gguf", "--out", tmp_path / "b.gguf"
    )
    a = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "a.gguf").tensors}
    b = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "b.gguf").tensors}
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_run_directory_export_and_peft_after_convert(world, llama_cpp_model, tmp_path, run_cli, cli_export):
    """A real run on the GGUF: export from RUN (base read off the adapter); `mobizo convert --adapter`
    re-points the adapter at the converted checkpoint so that AutoPeftModelForCausalLM loads it."""
    from peft import AutoPeftModelForCausalLM

    from mobizo.api import load_adapter
    from mobizo.checkpoint import read_adapter
    from mobizo.config import TrainConfig
    from mobizo.models import load_model
    from mobizo.trainer import train

    run = tmp_path / "run"
    cfg = dict(task="synthetic", queries=2, batch_size=4, max_length=32, steps=2, eval_every=0, save_every=0)
    cfg.update(
        eval_examples=8, optimizer="sgd", lr=1.0, eps=0.05, progress=False, out=str(run), model=str(world["base"])
    )
    train(TrainConfig.from_flat(**cfg))
    mine, _ = load_model(str(world["base"]))
    load_adapter(mine, run / "adapter")
    want = [_logits(mine, p) for p in world["prompts"][:3]]

    cli_export("--adapter", run, "--format", "lora-gguf", "--out", tmp_path / "run.gguf")
    logits, _ = _run_llama_cpp(llama_cpp_model, world["base"], [tmp_path / "run.gguf"], world["prompts"][:3], False)
    assert _max_diff(logits, want) < 1e-5

    hf = tmp_path / "hf"
    code, err = run_cli(
        ["convert", "--gguf", world["base"], "--out", hf, "--adapter", run / "adapter", "--no-progress"]
    )
    assert code == 0, err
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(hf.resolve())
    read_adapter(run / "adapter", require_checksum=True)  # the weights (and their checksum) are untouched
    peft_model = AutoPeftModelForCausalLM.from_pretrained(run / "adapter", local_files_only=True).eval()
    assert _max_diff([_logits(peft_model, p) for p in world["prompts"][:3]], want) < 1e-5


@pytest.fixture(scope="session")
def cli_export_error(run_cli):
    """``cli_export_error(argv, out)``: the one-line error of `mobizo export-adapter ARGV --out OUT`, which leaves
    no scratch file beside OUT."""

    def call(argv, out):
        code, err = run_cli(["export-adapter", *argv, "--out", out, "--no-progress"])
        assert code == 2 and err.startswith("mobizo: error: ") and err.count("\n") == 1, err
        leftovers = [p.name for p in out.parent.iterdir() if ".tmp-" in p.name]
        assert not leftovers
        return err

    return call


def test_bad_inputs_are_one_line_errors(world, tiny_pair, tmp_path, cli_export, cli_export_error):
    from transformers import LlamaConfig, LlamaForCausalLM

    from mobizo.models import base_hash, random_model

    src, tok = tiny_pair
    a, out = world["adapter"], tmp_path / "out.gguf"
    lora = ["--adapter", a, "--format", "lora-gguf"]

    narrow = LlamaConfig(**{**src.config.to_dict(), "hidden_size": 32, "intermediate_size": 64})
    other = write_gguf(random_model(LlamaForCausalLM, narrow, 3, "narrow"), tok, tmp_path / "narrow.gguf")
    err = cli_export_error([*lora, "--model", other], out)
    assert f"adapter does not fit base model {other}: lm_head is 32 -> {len(tok)} there, the adapter's is 64" in err
    shallow = LlamaConfig(**{**src.config.to_dict(), "num_hidden_layers": 1})
    one = write_gguf(random_model(LlamaForCausalLM, shallow, 3, "one"), tok, tmp_path / "one.gguf")
    err = cli_export_error([*lora, "--model", one, "--format", "merged-gguf"], out)
    assert "it adapts model.layers.1.mlp.down_proj, the file has no blk.1.ffn_down.weight" in err
    tied = write_gguf(src, tok, tmp_path / "tied.gguf", drop={"output.weight"})
    err = cli_export_error([*lora, "--model", tied], out)
    assert "the file has no output.weight (the output layer is tied to the token embedding in this model)" in err
    qwen = write_gguf(src, tok, tmp_path / "qwen2.gguf", arch="qwen2")
    err = cli_export_error([*lora, "--model", qwen], out)
    assert "llama.cpp export is verified for GGUF architecture gemma3, llama only, not 'qwen2'" in err
    err = cli_export_error(["--adapter", a, "--format", "merged-gguf", "--model", "tiny"], tmp_path / "m.gguf")
    assert "--format merged-gguf needs a .gguf base, tiny is not one" in err
    err = cli_export_error(["--adapter", a, "--format", "merged-hf", "--outtype", "q8_0"], tmp_path / "hf")
    assert "--outtype q8_0 is for GGUF output" in err

    # the recorded base is gone: say so, and how to name one
    moved = tmp_path / "moved"
    shutil.copytree(a, moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone.gguf")
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    err = cli_export_error(["--adapter", moved, "--format", "lora-gguf"], out)
    assert f"the adapter's base model {tmp_path / 'gone.gguf'} (recorded in" in err and "pass --model" in err

    # a run that recorded its base's weights (an ExecuTorch program's manifest) refuses another file
    run = tmp_path / "run"
    shutil.copytree(a, run / "adapter")
    (run / "summary.json").write_text(json.dumps({"config": {"model": str(world["base"])}}))
    (run / "program").mkdir()
    manifest = run / "program" / "manifest.json"
    manifest.write_text(json.dumps({"base_weights_sha256": base_hash(str(tied), None)}))
    err = cli_export_error(["--adapter", run, "--format", "lora-gguf"], out)
    assert f"base model {world['base']} is not the one run {run} trained on" in err
    manifest.write_text(json.dumps({"base_weights_sha256": base_hash(str(world["base"]), None)}))
    cli_export("--adapter", run, "--format", "lora-gguf", "--out", out)

    # an existing --out is kept unless --overwrite
    before = out.read_bytes()
    err = cli_export_error([*lora], out)
    assert f"--out {out} is not empty (use --overwrite to replace it)" in err and out.read_bytes() == before
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    err = cli_export_error(["--adapter", a, "--format", "merged-hf"], tmp_path / "full")
    assert "is not empty" in err and (tmp_path / "full" / "mine.txt").read_text() == "keep"


def test_a_failed_write_leaves_nothing(world, tmp_path, monkeypatch):
    from mobizo import deploy
    from mobizo.deploy import export_adapter

    out = tmp_path / "m.gguf"
    out.write_bytes(b"the previous file")
    calls = []

    def boom(a, qtype):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(a, qtype)

    real = deploy.encode
    monkeypatch.setattr(deploy, "encode", boom)
    from mobizo.errors import MobizoError

    with pytest.raises(MobizoError, match=r"cannot write .*m\.gguf: No space left on device"):  # one line, the path
        export_adapter(world["adapter"], "merged-gguf", out, overwrite=True)
    assert out.read_bytes() == b"the previous file"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
