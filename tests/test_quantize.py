"""A quantized frozen base (--quantize): every scheme trains eagerly, the XNNPACK-lowerable ones in
ExecuTorch too (following the eager-quantized trajectory), the adapter path stays float, the manifest
records the scheme, and bad input fails with one line before any export work."""

import json
import math
import time

import pytest
import torch
from safetensors.torch import load_file

from mobizo.build import assemble, export
from mobizo.config import TrainConfig
from mobizo.errors import MobizoError
from mobizo.trainer import train

# The two programs: 8-bit per-channel linears; 4-bit grouped linears plus the embedding table and LM head.
PROGRAMS = {"8da8w": dict(quantize="8da8w"), "8da4w-emb": dict(quantize="8da4w", quantize_embeddings=True)}


@pytest.fixture(scope="module")
def common(tiny_flags):
    """The tiny run, evaluated on 16 examples."""
    return tiny_flags(eval_examples=16)


@pytest.fixture(scope="module")
def programs(tmp_path_factory, common):
    out = {}
    for name, q in PROGRAMS.items():
        d = tmp_path_factory.mktemp("qprogram") / name
        export(TrainConfig.from_flat(**common, **q), str(d))
        out[name] = d
    return out


def _operators(pte_path):
    from executorch.exir._serialize._program import deserialize_pte_binary

    p = deserialize_pte_binary(pte_path.read_bytes())
    p = getattr(p, "program", p)
    return {plan.name: ({o.name for o in plan.operators}, len(plan.delegates)) for plan in p.execution_plan}


# ------------------------------------------------------------------ eager


@pytest.mark.parametrize(
    "q",
    [
        dict(quantize="int8"),
        dict(quantize="4w", group_size=16),
        dict(quantize="8da8w"),
        dict(quantize="8da4w"),
        dict(quantize="8da4w", group_size=0, quantize_embeddings=True),
        dict(quantize="8da8w", quantize_embeddings=True),
    ],
    ids=lambda q: "-".join(str(v) for v in q.values()),
)
def test_every_scheme_trains_eagerly(q, tmp_path, common):
    s = train(TrainConfig.from_flat(**common, **q, steps=4, eval_every=0, save_every=0, out=str(tmp_path / "r")))
    assert math.isfinite(s["final_loss"])
    b = [
        v for k, v in load_file(str(tmp_path / "r" / "adapter" / "adapter_model.safetensors")).items() if "lora_B" in k
    ]
    assert b and all(v.dtype == torch.float32 for v in b) and max(v.abs().max().item() for v in b) > 0
    header = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert header["config"]["quantize"] == q["quantize"]


def test_base_is_quantized_and_the_adapter_path_stays_float(common):
    from torchao.quantization import IntxUnpackedToInt8Tensor

    from mobizo.models import build_tiny, weights_hash
    from mobizo.mplora import lora_layers
    from mobizo.quantize import QuantEmbedding, quantization_of

    fp32 = assemble(TrainConfig.from_flat(**common))
    run = assemble(TrainConfig.from_flat(**common, quantize="8da4w", quantize_embeddings=True))
    m = run.model
    for _, layer in lora_layers(m):
        w = layer.base.weight
        assert isinstance(w, IntxUnpackedToInt8Tensor) and w.qdata.dtype == torch.int8 and w.block_size == (1, 32)
        assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32 and type(layer.lora_B) is torch.Tensor
    assert isinstance(m.lm_head.weight, IntxUnpackedToInt8Tensor)  # --quantize-embeddings: the head too
    emb = m.get_input_embeddings()
    assert isinstance(emb, QuantEmbedding) and emb.qdata.dtype == torch.uint8 and emb.qdata.shape[1] == 32  # int4 x2
    # the hash still names the float weights; the scheme is recorded beside it
    assert run.base_hash() == fp32.base_hash() == weights_hash(build_tiny()[0])
    assert quantization_of(m) == {"quantize": "8da4w", "group_size": 32, "quantize_embeddings": True}
    # without --quantize-embeddings the head and the table stay float
    plain = assemble(TrainConfig.from_flat(**common, quantize="8da8w")).model
    assert type(plain.lm_head.weight) is torch.nn.Parameter and isinstance(
        plain.get_input_embeddings(), torch.nn.Embedding
    )


@pytest.mark.parametrize("bits,group", [(8, 0), (8, 16), (4, 0), (4, 32)])
def test_quant_embedding_round_trips_and_exports_exactly(bits, group):
    """The table is looked up by gather + dequantize: within half a step of the float table, and the
    ExecuTorch program (portable kernels, no quantized-embedding kernel needed) gives the same numbers."""
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from executorch.runtime import Runtime

    from mobizo.quantize import QuantEmbedding

    torch.manual_seed(0)
    e = torch.nn.Embedding(50, 64)
    q = QuantEmbedding.from_float(e, bits, group)
    ids = torch.randint(0, 50, (3, 7))
    step = e.weight.abs().reshape(50, -1, group or 64).amax(-1).max() / (127 if bits == 8 else 7)
    assert (q(ids) - e(ids)).abs().max() <= step / 2 + 1e-6
    edge = to_edge_transform_and_lower(
        torch.export.export(q, (ids,), strict=False), compile_config=EdgeCompileConfig(_check_ir_validity=False)
    )
    program = Runtime.get().load_program(edge.to_executorch().buffer)
    method = program.load_method("forward")  # keep both alive: the output lives in the method's memory
    assert torch.equal(method.execute([ids])[0].clone(), q(ids))


def test_gguf_q8_0_trains_quantized_without_a_float_copy_on_disk(tiny_pair, tmp_path, common):
    """GGUF passthrough: the Q8_0 file is dequantized in memory at load and requantized with the scheme."""
    from _gguf import write_gguf

    src, tok = tiny_pair
    path = write_gguf(src, tok, tmp_path / "q8.gguf", qtype="Q8_0")
    before = set(tmp_path.iterdir())
    s = train(
        TrainConfig.from_flat(
            **{**common, "model": str(path)},
            quantize="8da4w",
            steps=3,
            eval_every=0,
            save_every=0,
            out=str(tmp_path / "r"),
        )
    )
    assert math.isfinite(s["final_loss"])
    assert set(tmp_path.iterdir()) - before == {tmp_path / "r"}  # no converted float checkpoint written
    assert all(p.stat().st_size < 100_000 for p in (tmp_path / "r").rglob("*.safetensors"))  # adapters only


# ------------------------------------------------------------------ ExecuTorch


def test_programs_lower_the_quantized_linears_to_xnnpack(programs):
    from mobizo.models import build_tiny

    for name, d in programs.items():
        m = json.loads((d / "manifest.json").read_text())
        want = {"8da8w": ("8da8w", 0, False), "8da4w-emb": ("8da4w", 32, True)}[name]
        assert (m["quantize"], m["group_size"], m["quantize_embeddings"]) == want
        for method, (ops, delegates) in _operators(d / "train.pte").items():
            # no quantize/dequantize op is left on portable kernels: XNNPACK runs the quantized linears
            assert not {o for o in ops if o.startswith(("quantized_decomposed", "torchao"))}, (name, method, ops)
            if method in ("train_step", "score"):
                assert delegates > 0
    # int4 head and table (float32 in the 8da8w program) shrink the whole program by well over 40% of
    # their float bytes (the graph itself, symbolic in T, is most of a tiny program's size)
    size = {n: json.loads((d / "manifest.json").read_text())["pte_bytes"] for n, d in programs.items()}
    tiny = build_tiny()[0]
    table_and_head = (tiny.get_input_embeddings().weight.numel() + tiny.lm_head.weight.numel()) * 4
    assert size["8da4w-emb"] < size["8da8w"] - 0.4 * table_and_head, (size, table_and_head)


def _synced_steps(common, program, q, steps=8):
    """Per step from the same B: the program's and eager ZOStep's losses and projected gradients."""
    from mobizo.data import Encoder, collate_choices, step_indices
    from mobizo.engines.executorch import ExecuTorchEngine
    from mobizo.mplora import lora_layers
    from mobizo.step import ZOStep

    eng = ExecuTorchEngine(program)
    run = assemble(TrainConfig.from_flat(**common, **q))
    model, tok, exs, enc = run.model, run.tokenizer, run.train, Encoder(run.tokenizer)
    step = ZOStep(model, run.zo_config(), shared_prompt=True)
    dl = dg = 0.0
    for s in range(1, steps + 1):
        state = eng.adapter_state()
        with torch.no_grad():
            for n, layer in lora_layers(model):
                layer.lora_B.copy_(state[n + ".lora_B"])
        idx = step_indices(len(exs), 4, s, 3)
        g = [[enc(exs[i].prompt, c) for c in exs[i].candidates] for i in idx]
        b = collate_choices(
            g, [exs[i].label for i in idx], 2, tok.pad_token_id, 32, length=32, answer_len=1, examples=4
        )
        res = eng.train_step(b, s, 1.0, 0.05)
        with torch.no_grad():
            losses, grads = step(
                b.input_ids, b.attention_mask, b.labels, torch.tensor(s), torch.tensor(1.0), torch.tensor(0.05), b.gold
            )
        dl = max(dl, (torch.tensor(res.losses) - losses).abs().max().item())
        dg = max(dg, (torch.tensor(res.projected_grads) - grads).abs().max().item())
    return dl, dg


def test_program_step_equals_the_eager_quantized_step(programs, common):
    """Same B, same batch: ExecuTorch's quantized step vs eager torchao's.

    Measured on tiny (8 steps): 8da8w |dL| <= 4e-5, 8da4w <= 5e-7 -- eager rounds a grouped int4
    weight's scales to bfloat16 as XNNPACK stores them (without that: ~1e-3). XNNPACK and torchao
    quantize activations identically except at exact rounding ties, which a random model's unit
    RMSNorm weights make frequent once the embedding table is quantized too (its rows are small
    integer multiples of a scale): 8da4w + embeddings |dL| <= 1.2e-3 (loss ~0.7), |dg| <= 0.02.
    Bounds: |dL| 1e-4 / 5e-3 (loss-relative 1.5e-4 / 7e-3), |dg| <= 2 |dL| / (2 eps) = 20 |dL|.
    """
    dl, dg = _synced_steps(common, programs["8da8w"], PROGRAMS["8da8w"])
    assert dl <= 1e-4 and dg <= 2e-3, (dl, dg)
    dl, dg = _synced_steps(common, programs["8da4w-emb"], PROGRAMS["8da4w-emb"])
    assert dl <= 5e-3 and dg <= 0.1, (dl, dg)


def test_program_follows_the_eager_quantized_trajectory(programs, tmp_path, common):
    """Free-running 12 steps (lr 0.1) through the trainer, eager vs ExecuTorch, each against the float32 run.

    The step itself agrees (above); free-running, dynamic activation quantization makes the loss a
    step function of B: one rounding tie that falls differently (XNNPACK vs torchao, or the shared-
    prompt vs per-candidate layout the two engines use) moves g by ~|dL|/(2 eps), and from then on the two
    runs are nearby random walks. Measured (12 steps): max |B_et - B_eager| 0.0057 (8da8w) and 0.014
    (8da4w + embeddings) with |B| 0.54, max per-step |dL| 2e-3 / 6e-3; quantizing itself moved B by
    0.0084 / 0.14 from the float32 run. Bounds: 5% of |B|, per-step |dL| <= 1e-2, and for 4 bits the
    ExecuTorch gap under 0.35x the gap quantization makes (8 bits barely changes the trajectory).
    """
    steps = dict(steps=12, eval_every=0, save_every=0, lr=0.1)

    def run(name, **kw):
        train(TrainConfig.from_flat(**{**common, **steps}, **kw, out=str(tmp_path / name)))
        recs = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()[1:]]
        b = load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
        return {k: v for k, v in b.items() if "lora_B" in k}, [r["loss"] for r in recs if "loss" in r]

    def gap(a, b):
        return max((a[k] - b[k]).abs().max().item() for k in a)

    b32, _ = run("fp32")
    for name, q in PROGRAMS.items():
        be, le = run(f"{name}-eager", **q)
        bx, lx = run(f"{name}-et", **q, engine="executorch", program=str(programs[name]))
        scale, et_gap, quant_gap = max(v.abs().max().item() for v in be.values()), gap(be, bx), gap(be, b32)
        assert scale > 0.1 and quant_gap > 1e-3, name  # the adapter moved; quantization changed the trajectory
        assert len(le) == len(lx) == 12 and max(abs(a - b) for a, b in zip(le, lx)) <= 1e-2, name
        assert et_gap <= 0.05 * scale, (name, et_gap, scale)
        if name == "8da4w-emb":
            assert et_gap <= 0.35 * quant_gap, (et_gap, quant_gap)


def test_a_program_of_another_scheme_is_refused(programs, tmp_path, run_cli):
    code, err = run_cli(
        [
            "train",
            "--model",
            "tiny",
            "--queries",
            2,
            "--batch-size",
            4,
            "--max-length",
            32,
            "--optimizer",
            "sgd",
            "--lr",
            1.0,
            "--eps",
            0.05,
            "--seed",
            3,
            "--eval-examples",
            16,
            "--eval-batch-size",
            8,
            "--quantize",
            "8da4w",
            "--engine",
            "executorch",
            "--program",
            programs["8da8w"],
            "--steps",
            1,
            "--out",
            tmp_path / "r",
            "--no-progress",
        ]
    )
    assert code == 2 and "program was built with quantize='8da8w', this run needs '8da4w'" in err
    assert len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["train", "--engine", "executorch", "--quantize", "int8"],
            "weight-only, which ExecuTorch's XNNPACK cannot run",
        ),
        (["export", "--quantize", "4w", "--out", "p"], "--quantize 4w is weight-only"),
        (["bundle", "--quantize", "4w", "--out", "b"], "--quantize 4w is weight-only"),
        (
            ["export", "--quantize", "8da4w", "--group-size", "48", "--out", "p"],
            "XNNPACK's 4-bit kernels need a multiple of 32",
        ),
        (
            ["export", "--quantize", "8da4w", "--group-size", "96", "--out", "p"],
            "--group-size 96 does not divide the 64 input features",
        ),
        (["train", "--quantize", "4w", "--group-size", "48"], "--group-size 48 does not divide the 64 input features"),
        (["train", "--quantize", "8da8w", "--group-size", "32"], "quantizes per output channel"),
        (["train", "--group-size", "32"], "--group-size applies to a 4-bit --quantize scheme"),
        (["eval", "--quantize-embeddings"], "--quantize-embeddings needs a --quantize scheme"),
        (["train", "--quantize", "2w"], "invalid choice"),
    ],
)
def test_bad_quantization_is_one_line_before_any_export(argv, message, run_cli):
    t = time.perf_counter()
    code, err = run_cli(argv + ["--model", "tiny", "--no-progress"] + (["--steps", "1"] if argv[0] == "train" else []))
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert time.perf_counter() - t < 20  # refused before tracing (an export takes a minute here)


def test_quantizing_twice_or_after_injection_is_refused(tiny_pair):
    import copy

    from mobizo.mplora import inject
    from mobizo.quantize import quantize_base

    model, other = copy.deepcopy(tiny_pair[0]), copy.deepcopy(tiny_pair[0])
    quantize_base(model, "8da8w")
    quantize_base(model, "8da8w")  # the same again: nothing to do
    with pytest.raises(MobizoError, match="already quantized"):
        quantize_base(model, "8da4w")
    inject(other, None, 4, 8.0, 0)
    with pytest.raises(MobizoError, match="before injecting"):
        quantize_base(other, "8da8w")


def test_eval_with_a_quantized_base(tmp_path, run_cli):
    code, err = run_cli(
        [
            "eval",
            "--model",
            "tiny",
            "--quantize",
            "8da4w",
            "--eval-examples",
            16,
            "--no-progress",
            "--json",
            tmp_path / "m.json",
        ]
    )
    assert code == 0, err
    assert json.loads((tmp_path / "m.json").read_text())["n"] == 16


def test_resume_keeps_the_scheme(tmp_path, run_cli):
    out = tmp_path / "r"
    base = ["train", "--model", "tiny", "--eval-every", 0, "--eval-examples", 8, "--out", out, "--no-progress"]
    base += ["--optimizer", "sgd"]  # a constant lr: --resume may extend --steps
    assert run_cli(base + ["--quantize", "8da4w", "--steps", 2])[0] == 0
    code, err = run_cli(base + ["--quantize", "8da8w", "--steps", 3, "--resume"])
    assert code == 2 and "used --quantize 8da4w, not 8da8w" in err
    assert run_cli(base + ["--steps", 3, "--resume"])[0] == 0  # not given: the run's scheme
    header = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert header["config"]["quantize"] == "8da4w" and header["config"]["group_size"] is None
