"""--device / --dtype (mobizo.devices): selection, mixed precision (g survives bf16), replay and resume
across devices and dtypes, the bad-input lines. CPU only: the CUDA/MPS paths are exercised with
monkeypatched availability and with the device code path (CPU copies of B) forced on the CPU."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from mobizo import devices
from mobizo import step as step_mod
from mobizo.checkpoint import load_checkpoint, read_adapter
from mobizo.cli import main
from mobizo.data import Encoder, collate
from mobizo.engines.eager import EagerEngine
from mobizo.errors import MobizoError
from mobizo.mplora import inject, lora_layers
from mobizo.step import ZOConfig, ZOStep
from mobizo.tasks import get_task

FAST = ["--model", "tiny", "--eval-every", "0", "--eval-examples", "8", "--batch-size", "4", "--queries", "2"]
FAST += ["--max-length", "32", "--train-examples", "64", "--no-progress", "--lr", "0.05", "--eps", "0.01"]
FAST += ["--optimizer", "sgd"]


def cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's errors
        rc = e.code
    err = capsys.readouterr().err
    if rc != 0:
        assert [line.startswith("mobizo: error:") for line in err.splitlines()] == [True], err
    return rc, err


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


# ---------------------------------------------------------------- selection


@pytest.mark.parametrize(
    "cuda,mps,want", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu"), (True, False, "cuda")]
)
def test_default_device_is_the_best_available(monkeypatch, cuda, mps, want):
    monkeypatch.setattr(devices, "cuda_available", lambda: cuda)
    monkeypatch.setattr(devices, "mps_available", lambda: mps)
    assert devices.best_device() == want
    assert devices.device_name(None) == want and devices.device_name("cpu") == "cpu"


def test_cuda_is_one_gpu_per_torchrun_process(monkeypatch):
    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert devices.resolve("cuda") == torch.device("cuda")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert devices.resolve("cuda") == torch.device("cuda", 1)
    assert devices.resolve(None) == torch.device("cuda", 1)  # the default follows the availability
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(MobizoError, match="LOCAL_RANK 2, but only 2 CUDA device"):
        devices.resolve("cuda")
    assert devices.resolve("cpu") == torch.device("cpu")


def test_backend_is_nccl_on_cuda_gloo_elsewhere(monkeypatch):
    from mobizo import distributed

    assert devices.backend_for(torch.device("cuda", 1)) == "nccl"
    assert devices.backend_for("cpu") == "gloo" and devices.backend_for("mps") == "gloo"
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))

    def init(backend, timeout):
        calls.append(("init", backend))
        raise RuntimeError("stop here")

    monkeypatch.setattr(torch.distributed, "init_process_group", init)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    for k, v in {"RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv(distributed.BACKEND_ENV, raising=False)
    for device in (torch.device("cuda", 1), torch.device("cpu")):
        with pytest.raises(distributed.DistError, match="could not join"):
            distributed.Group.join(device)
    assert calls == [("set_device", torch.device("cuda", 1)), ("init", "nccl"), ("init", "gloo")]
    monkeypatch.setenv(distributed.BACKEND_ENV, "gloo")  # the override still wins
    calls.clear()
    with pytest.raises(distributed.DistError):
        distributed.Group.join(torch.device("cuda", 0))
    assert calls == [("init", "gloo")]


def test_float16_runs_on_this_cpu_and_a_missing_kernel_is_named(monkeypatch):
    # this torch build has CPU kernels for everything a forward needs in fp16 and bf16: allowed
    devices.check_dtype(torch.device("cpu"), "float16")
    devices.check_dtype(torch.device("cpu"), "bfloat16")

    def probes(dtype, device):
        def missing():
            raise NotImplementedError(f'"addmm_impl_cpu_" not implemented for {dtype}')

        return [("softmax", lambda: None), ("linear (addmm)", missing)]

    monkeypatch.setattr(devices, "_probes", probes)
    devices._unsupported.cache_clear()
    try:
        with pytest.raises(MobizoError) as e:
            devices.check_dtype(torch.device("cpu"), "float16")
        assert str(e.value).startswith("--dtype float16 is not supported on cpu by torch ")
        assert "linear (addmm) failed (NotImplementedError" in str(e.value) and "use --dtype float32" in str(e.value)
    finally:
        devices._unsupported.cache_clear()


# ---------------------------------------------------------------- mixed precision: g survives bf16


def _g(model, batch, eps: float, q: int = 16, steps=(1, 2, 3)) -> torch.Tensor:
    """g of ``steps`` (all q directions each) at the same B, concatenated, float64."""
    st = ZOStep(model, ZOConfig("prge", q, seed=3))
    out = []
    with torch.no_grad():
        for s in steps:
            plus, minus = st.losses(
                st.noise(torch.tensor(s)), batch.input_ids, batch.attention_mask, batch.labels, torch.tensor(eps)
            )
            out.append((plus - minus) / (2 * eps))
    return torch.cat(out).double()


def _errors(g: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative L2 error, Pearson correlation) of g against the float32 reference."""
    return float((g - ref).norm() / ref.norm()), float(torch.corrcoef(torch.stack([g, ref]))[0, 1])


def _bf16_losses(model, input_ids, attention_mask, labels):
    """answer_losses without the upcast: the cross-entropy reduced in the logits' (half) dtype."""
    T, K = input_ids.shape[1], labels.shape[1]
    logits = step_mod.lm_logits(model, input_ids, attention_mask, torch.arange(T - K - 1, T - 1))
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none")
    valid = labels != -100
    return torch.where(valid, ce.reshape(labels.shape), torch.zeros_like(ce.reshape(labels.shape))).sum(-1), valid.sum(
        -1
    )


def test_projected_gradients_survive_a_bf16_base(tiny, monkeypatch):
    """g with the base in bf16 (A, B, z, losses, L+ - L- and the update float32) against the float32 g of the
    same model, batch and directions: 48 values (q = 16, 3 steps) at the default eps 1e-2.

    Measured on this model: relative L2 error 0.014, correlation 0.9999 (fp16: 0.0016). The error is the
    rounding of bf16 activations (8-bit mantissa, ~0.2% per element) showing through the finite
    difference, so it grows as 1/eps (0.14 at eps 1e-3). The bound (5%, correlation 0.999) leaves 3.5x
    headroom; the naive all-bf16 step (adapter and the loss reduction in bf16 too) misses it by 10x: bf16
    has ~2-3 significant digits, so a loss near 6.4 is known only to its ulp 0.03, i.e. g to steps of
    0.03 / 2eps = 1.6 when |g| is ~1.3 (measured: error 0.47, correlation 0.91).
    """
    base, tok = tiny

    def adapted(m):
        inject(m, ["q_proj", "v_proj"], 8, 16.0, 0)  # A: the same seeded values whatever the base's dtype
        gen = torch.Generator().manual_seed(1)
        for _, layer in lora_layers(m):  # a trained-looking B, so perturbations meet a real adapter
            layer.lora_B.copy_(0.05 * torch.randn(layer.lora_B.shape, generator=gen))
        return m

    enc = Encoder(tok)
    batch = collate([enc.example(e) for e in get_task("synthetic").load("train")[:16]], tok.pad_token_id, 64)
    eps = 1e-2
    ref = _g(adapted(copy.deepcopy(base)), batch, eps)
    # as --dtype makes it: the base cast, then a float32 adapter injected beside it
    rel, corr = _errors(_g(adapted(copy.deepcopy(base).to(torch.bfloat16)), batch, eps), ref)
    assert rel < 0.05 and corr > 0.999, (rel, corr)
    rel16, corr16 = _errors(_g(adapted(copy.deepcopy(base).to(torch.float16)), batch, eps), ref)
    assert rel16 < 0.01 and corr16 > 0.9999, (rel16, corr16)
    # naive: everything bf16 (A, B, z, the update: the model cast after injection) and the loss reduced in bf16
    monkeypatch.setattr(step_mod, "answer_losses", _bf16_losses)
    naive_rel, naive_corr = _errors(_g(adapted(copy.deepcopy(base)).to(torch.bfloat16), batch, eps), ref)
    assert naive_rel > 0.2 and naive_corr < 0.99, (naive_rel, naive_corr)  # fails the bound by far


def test_adapter_is_float32_beside_a_half_base_and_saved_float32_on_the_cpu(tiny):
    model, _ = tiny
    model.to(torch.bfloat16)
    inject(model, None, 4, 8.0, 0)
    for _, layer in lora_layers(model):
        assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
        assert layer.base.weight.dtype == torch.bfloat16
    x = torch.randn(2, 3, model.config.hidden_size, dtype=torch.bfloat16)
    layer = lora_layers(model)[0][1]
    assert layer(x).dtype == torch.bfloat16  # the base's dtype goes on
    engine = EagerEngine(model, "prge", ZOConfig("prge", 2))
    assert {(v.dtype, v.device.type) for v in engine.adapter_state().values()} == {(torch.float32, "cpu")}
    assert {z.dtype for z in engine.step.noise(torch.tensor(1))} == {torch.float32}


# ---------------------------------------------------------------- end to end, replay and resume


def test_bf16_run_trains_evaluates_generates_and_replays_bitwise(capsys, tmp_path):
    out = tmp_path / "run"
    rc, _ = cli(capsys, "train", *FAST, "--steps", "6", "--save-every", "3", "--dtype", "bfloat16", "--out", out)
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["dtype"] == "bfloat16" and summary["device"] == "cpu"
    assert summary["skipped_steps"] == 0 and 0 <= summary["eval_accuracy"] <= 1
    header = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert header["config"]["dtype"] == "bfloat16"
    trained, _ = read_adapter(out / "adapter")
    adapter, *_ = load_checkpoint(out / "checkpoint")
    assert {v.dtype for v in [*trained.values(), *adapter.values()]} == {torch.float32}
    assert sum(float(v.abs().sum()) for k, v in trained.items() if k.endswith("lora_B")) > 0
    # the log replays (on the CPU, float32) to the bf16 run's adapter bit for bit: B's update is float32 from g
    assert cli(capsys, "replay", "--log", out / "metrics.jsonl", "--out", tmp_path / "re")[0] == 0
    assert same_bits(trained, read_adapter(tmp_path / "re")[0])
    # eval of the adapter on a bf16 base
    rc, _ = cli(
        capsys,
        "eval",
        "--model",
        "tiny",
        "--adapter",
        out / "adapter",
        "--dtype",
        "bfloat16",
        "--eval-examples",
        "8",
        "--max-length",
        "32",
        "--no-progress",
        "--json",
        tmp_path / "e.json",
    )
    assert rc == 0 and json.loads((tmp_path / "e.json").read_text())["n"] == 8
    # a resume keeps --dtype; another dtype is another trajectory: refused, naming both
    rc, err = cli(capsys, "train", *FAST, "--steps", "8", "--resume", "--dtype", "float32", "--out", out)
    assert rc == 2 and f"--resume: the run in {out} used --dtype bfloat16, not float32" in err
    assert cli(capsys, "train", *FAST, "--steps", "8", "--resume", "--out", out)[0] == 0
    assert cli(capsys, "replay", "--log", out / "metrics.jsonl", "--out", tmp_path / "re", "--overwrite")[0] == 0
    assert same_bits(read_adapter(out / "adapter")[0], read_adapter(tmp_path / "re")[0])


def test_bf16_generation_and_fo_baseline(tiny):
    from mobizo.generation import SamplingConfig, generate

    model, tok = tiny
    ids = torch.tensor([[1, 50, 60, 70]])
    ref = model(input_ids=ids).logits[0, -1]
    half = copy.deepcopy(model).to(torch.bfloat16)
    inject(half, None, 4, 8.0, 0)
    engine = EagerEngine(half, None)
    dec = engine.decoder(ids, torch.ones_like(ids))
    assert dec.logits.dtype == torch.float32 and dec.logits.device.type == "cpu"
    torch.testing.assert_close(dec.logits[0], ref, atol=0.05, rtol=0)  # bf16 rounding of a random model's logits
    text = generate(engine, tok, [1, 50, 60, 70], SamplingConfig(max_new_tokens=4, temperature=0.8, seed=1))
    assert isinstance(text, str)
    # the FO baseline: float32 LoRA parameters trained through a bf16 base
    fo_model = copy.deepcopy(model).to(torch.bfloat16)
    inject(fo_model, None, 4, 8.0, 0)
    fo = EagerEngine(fo_model, "fo", optimizer="adamw")
    enc = Encoder(tok)
    batch = collate([enc.example(e) for e in get_task("synthetic").load("train")[:4]], tok.pad_token_id, 32)
    losses = [fo.train_step(batch, s, 1e-2, 0.0).loss for s in range(1, 4)]
    assert all(math.isfinite(v) and v < 100 for v in losses)
    state = fo.adapter_state()
    assert {v.dtype for v in state.values()} == {torch.float32}
    assert any(float(v.abs().sum()) > 0 for k, v in state.items() if k.endswith("lora_B"))
    assert all(
        t.device.type == "cpu"
        for s in fo.optimizer_state()["state"].values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    )


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_device_path_updates_b_on_the_cpu_bitwise(capsys, tmp_path, monkeypatch, optimizer):
    """The path a GPU run takes (z made on the CPU, B and the rule's state updated on CPU copies and copied to
    the model) forced on the CPU: the same adapter bit for bit as the ordinary path, through a checkpoint
    resume (the copies are remade from the loaded model), and the log replays to it."""
    args = [*FAST, "--optimizer", optimizer, "--lr", "0.01" if optimizer == "adam" else "0.05", "--save-every", "3"]
    assert cli(capsys, "train", *args, "--steps", "6", "--out", tmp_path / "plain")[0] == 0
    monkeypatch.setattr(step_mod, "host_update", lambda device: True)
    made = []
    real = step_mod.HostLayer.__init__

    def counting(self, *a, **k):
        made.append(1)
        real(self, *a, **k)

    monkeypatch.setattr(step_mod.HostLayer, "__init__", counting)
    assert cli(capsys, "train", *args, "--steps", "4", "--out", tmp_path / "host")[0] == 0
    assert cli(capsys, "train", *args, "--steps", "6", "--resume", "--out", tmp_path / "host")[0] == 0
    assert made  # the host copies were used
    plain, host = read_adapter(tmp_path / "plain" / "adapter")[0], read_adapter(tmp_path / "host" / "adapter")[0]
    assert same_bits(plain, host)
    if optimizer == "adam":
        p_state = load_checkpoint(tmp_path / "plain" / "checkpoint")[3]
        h_state = load_checkpoint(tmp_path / "host" / "checkpoint")[3]
        assert same_bits(p_state, h_state)
    monkeypatch.undo()
    assert cli(capsys, "replay", "--log", tmp_path / "host" / "metrics.jsonl", "--out", tmp_path / "re")[0] == 0
    assert same_bits(host, read_adapter(tmp_path / "re")[0])


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written


BAD = [
    (["train", "--device", "cuda"], "--device cuda: CUDA is not available: this torch ("),
    (["train", "--device", "mps"], "--device mps: MPS is not available here (it needs macOS on Apple silicon)"),
    (["train", "--engine", "executorch", "--device", "cuda"], "--engine executorch runs on the CPU in float32: "),
    (["train", "--engine", "executorch", "--dtype", "bfloat16"], "--dtype bfloat16 applies to --engine eager only"),
    (["train", "--quantize", "int8", "--dtype", "bfloat16"], "--quantize int8 quantizes a float32 base"),
    (["train", "--dtype", "float64"], "invalid choice: 'float64'"),
    (["export", "--dtype", "float16"], "mobizo export runs on the CPU in float32: --dtype float16 applies to"),
    (["export", "--device", "cuda"], "mobizo export runs on the CPU in float32: --device cuda applies to"),
    (["bundle", "--device", "mps"], "mobizo bundle runs on the CPU in float32: --device mps applies to"),
    (["eval", "--device", "cuda"], "--device cuda: CUDA is not available"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_device_input_is_one_line_and_nothing_written(capsys, tmp_path, argv, message):
    out = tmp_path / "out"
    tail = [] if argv[0] == "eval" else ["--out", out]
    rc, err = cli(capsys, *argv, "--model", "tiny", *tail)
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()
