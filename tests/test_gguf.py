"""GGUF in, Hugging Face out: a tiny Llama written as GGUF (llama.cpp's names and q/k permutation,
a byte-level BPE vocabulary) loads, trains, converts, and its adapters load with peft."""

import json
import struct

import pytest
import torch
from _gguf import write_gguf

from mobizo.errors import MobizoError


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_pair):
    model, tok = tiny_pair
    return write_gguf(model, tok, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def loaded(tiny_gguf):
    from mobizo.models import load_model

    return load_model(str(tiny_gguf))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_round_trip_equals_the_source_model(tiny_pair, loaded):
    src, tok = tiny_pair
    model, gtok = loaded
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(model.config, "quantization_config")
    assert gtok.padding_side == "left" and gtok.pad_token_id == tok.pad_token_id
    text = "the movie was great, I loved it"
    assert gtok(text)["input_ids"][-8:] == tok(text)["input_ids"][-8:]
    ids = torch.tensor([tok(text)["input_ids"]])
    torch.testing.assert_close(_logits(model, ids), _logits(src, ids), rtol=0, atol=1e-5)


def test_quantized_gguf_dequantizes_close_to_source(tiny_pair, tmp_path):
    from mobizo.models import load_model

    src, tok = tiny_pair
    path = write_gguf(src, tok, tmp_path / "q8.gguf", qtype="Q8_0")
    model, _ = load_model(str(path))
    ids = torch.tensor([tok("a tiny quantized model")["input_ids"]])
    a, b = _logits(model, ids), _logits(src, ids)
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    assert not torch.equal(a, b)  # really went through Q8_0


def test_train_eval_convert_and_peft_round_trip(tiny_gguf, tmp_path, run_cli):
    """GGUF train -> eval -> convert -> peft: the adapter on the converted checkpoint gives mobizo's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mobizo.checkpoint import read_adapter
    from mobizo.config import TrainConfig
    from mobizo.convert import convert_gguf
    from mobizo.models import load_model
    from mobizo.mplora import inject, load_adapter_state
    from mobizo.trainer import train

    run = tmp_path / "run"
    summary = train(
        TrainConfig.from_flat(
            model=str(tiny_gguf),
            task="synthetic",
            queries=2,
            batch_size=4,
            max_length=32,
            steps=3,
            eval_every=0,
            save_every=0,
            eval_examples=16,
            optimizer="sgd",
            lr=1.0,
            eps=0.05,
            progress=False,
            out=str(run),
        )
    )
    assert summary["status"] == "completed" and summary["config"]["model"] == str(tiny_gguf)
    code, err = run_cli(["eval", "--model", tiny_gguf, "--adapter", run / "adapter", "--eval-examples", 16])
    assert code == 0, err

    out = convert_gguf(tiny_gguf, tmp_path / "hf")
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    htok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    peft_model = PeftModel.from_pretrained(base, run / "adapter").eval()

    mine, tok = load_model(str(tiny_gguf))
    state, cfg = read_adapter(run / "adapter")
    assert any(v.abs().max() > 0 for k, v in state.items() if k.endswith("lora_B"))
    inject(mine, sorted({k.rsplit(".", 1)[0] for k in state}), int(cfg["r"]), float(cfg["lora_alpha"]), 0)
    load_adapter_state(mine, state)
    text = "the food was awful"
    assert htok(text)["input_ids"] == tok(text)["input_ids"]
    ids = torch.tensor([tok(text)["input_ids"]])
    torch.testing.assert_close(_logits(peft_model, ids), _logits(mine, ids), rtol=0, atol=1e-5)
    # the converted directory is an ordinary mobizo model too
    code, err = run_cli(["eval", "--model", out, "--adapter", run / "adapter", "--eval-examples", 16])
    assert code == 0, err
    with pytest.raises(MobizoError, match="not empty"):
        convert_gguf(tiny_gguf, out)


def test_bad_gguf_inputs_are_one_line_errors(tiny_pair, tmp_path, run_cli):
    from mobizo.convert import convert_gguf
    from mobizo.models import load_model

    src, tok = tiny_pair
    notgguf = tmp_path / "model.gguf"
    notgguf.write_bytes(b"PK\x03\x04 definitely a zip file, not a gguf" * 4)
    with pytest.raises(MobizoError, match="not a GGUF file"):
        load_model(str(notgguf))
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(MobizoError, match="not a GGUF file"):
        load_model(str(tmp_path / "empty.gguf"))
    bert = write_gguf(src, tok, tmp_path / "bert.gguf", arch="bert")
    with pytest.raises(MobizoError, match="architecture 'bert' is not one transformers .* can read"):
        load_model(str(bert))
    q81 = write_gguf(src, tok, tmp_path / "q81.gguf", raw_types={"blk.0.attn_q.weight": "Q8_1"})
    with pytest.raises(MobizoError, match="blk.0.attn_q.weight is stored as Q8_1, which the gguf package"):
        load_model(str(q81))
    good = write_gguf(src, tok, tmp_path / "good.gguf")
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(MobizoError, match="truncated"):
        load_model(str(tmp_path / "cut.gguf"))
    missing = write_gguf(src, tok, tmp_path / "missing.gguf", drop={"blk.1.ffn_up.weight"})
    with pytest.raises(MobizoError, match="no tensor for model.layers.1.mlp.up_proj.weight"):
        load_model(str(missing))
    with pytest.raises(MobizoError, match="does not exist"):
        load_model(str(tmp_path / "nowhere.gguf"))
    # through the CLI: one line, exit 2, nothing written
    code, err = run_cli(["train", "--model", q81, "--steps", 1, "--out", tmp_path / "o"])
    assert code == 2 and "Q8_1" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
    with pytest.raises(MobizoError, match="Q8_1"):
        convert_gguf(q81, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert struct.unpack_from("<I", data, 4)[0] == 3  # the writer's GGUF version, which the reader accepts


# The peak is this process's VmHWM (its own address space's high-water mark: ru_maxrss would also count the
# pytest process it was forked from).
PEAK = r"""
import json, sys
import psutil, torch
from mobizo.util import quiet_third_party
quiet_third_party()
torch.set_num_threads(1)
import transformers.modeling_utils  # the imports' memory is not the load's
from mobizo.models import load_model
model, _ = load_model(sys.argv[1])
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps([peak, psutil.Process().memory_info().rss, sum(p.numel() * 4 for p in model.parameters())]))
"""


@pytest.mark.slow
def test_loading_peaks_at_the_loaded_footprint(tiny_pair, tmp_path):
    """A GGUF whose embedding and LM head are 262144 x 128 (Q8_0; 256 MiB of float weights): loading used to
    dequantize each whole (Llama's tensor processor, like Gemma's, made them skip the row-slab path), a
    second copy plus the dequantizer's temporaries: peak = loaded + 1.14x the weights. Now the processor is
    asked whether it changes a tensor, and the slabs go straight into the model: peak = loaded + 0.26x
    (one slab in flight)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from transformers import LlamaConfig, LlamaForCausalLM

    from mobizo.models import TINY_CONFIG, random_model

    _, tok = tiny_pair
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlamaConfig(vocab_size=262144, **ids, **{**TINY_CONFIG, "hidden_size": 128, "intermediate_size": 256})
    path = write_gguf(random_model(LlamaForCausalLM, config, 0, "wide"), tok, tmp_path / "wide.gguf", qtype="Q8_0")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", PEAK, str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    peak, after, weights = json.loads(p.stdout.splitlines()[-1])
    assert weights > 2 * 262144 * 128 * 4  # the embedding and the LM head dominate
    assert peak - after < 0.5 * weights, ((peak - after) / 2**20, weights / 2**20)


def test_the_parsed_metadata_is_let_go_before_the_weights_load(tiny_gguf, monkeypatch):
    """The GGUF metadata parsed once for the tokenizer and the config (a 262k-token vocabulary: ~130 MiB for
    Gemma 3) used to stay in memory while the weights loaded; it is released first."""
    import transformers.modeling_gguf_pytorch_utils as mod

    from mobizo import convert
    from mobizo.models import load_model

    original, seen = mod.load_gguf_checkpoint, []
    real = convert._load_streaming

    def streaming(*args, **kwargs):
        seen.append(mod.load_gguf_checkpoint is original)  # the memoizing wrapper is gone, and its memo with it
        return real(*args, **kwargs)

    monkeypatch.setattr(convert, "_load_streaming", streaming)
    load_model(str(tiny_gguf))
    assert seen == [True]
