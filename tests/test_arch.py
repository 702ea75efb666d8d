"""Every supported model family trains: eager ZO, first-order, ExecuTorch ZO (eager parity), PEFT load.

One test per family on a tiny random config of its transformers class (hidden 32, one layer, two
for local/global attention, vocab 192, T=16), exported once (in background workers, see ``Exports``).
``MOBIZO_ARCH_REPORT=FILE`` writes each family's export time and ``.pte`` size as JSON (the numbers
of ``docs/architectures.md``).
"""

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers as tf

from mobizo.archs import ARCHS
from mobizo.checkpoint import read_adapter, save_adapter
from mobizo.errors import MobizoError
from mobizo.mplora import adapter_state, fan_in_fan_out, inject, load_adapter_state, lora_layers, make_trainable
from mobizo.step import AnswerLoss, ZOConfig, ZOStep, answer_losses

V, T, K, ROWS, Q = 192, 16, 2, 2, 2  # vocab, sequence, answer window, examples per step, queries
RANK, ALPHA, SEED, STEPS, LR, EPS = 4, 8.0, 7, 3, 0.2, 0.1  # lr/2eps ~ 1: float rounding of L+ - L- stays small
PAD = 4  # left padding of the second row


def _decoder(layers=1, **extra):
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **extra,
    )


LOCAL_GLOBAL = dict(layers=2, layer_types=["sliding_attention", "full_attention"])  # a local and a global layer
# family -> (config class, model class, config kwargs): each one exercises what its family is known for
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _decoder(tie_word_embeddings=True)),  # GQA, tied (SmolLM2)
    "mistral": ("MistralConfig", "MistralForCausalLM", _decoder(sliding_window=6)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _decoder()),  # q/k/v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", _decoder(head_dim=8)),  # QK-norm
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**_decoder(head_dim=8), "num_key_value_heads": 1}),  # MQA
    # soft-capping thresholds near the random model's scores (attention ~1e-3), so that tanh is not the identity
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        _decoder(
            head_dim=8, sliding_window=6, attn_logit_softcapping=0.005, final_logit_softcapping=0.5, **LOCAL_GLOBAL
        ),
    ),
    # one local (sliding-window, local RoPE base) layer: Gemma2 covers the local/global mix
    "gemma3_text": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        _decoder(head_dim=8, sliding_window=6, layer_types=["sliding_attention"]),
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _decoder()),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_inner=64, n_layer=1, n_head=4, n_positions=64)),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64),
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64
        ),
    ),
}
REPORT: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("MOBIZO_ARCH_REPORT")
    if path and REPORT:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(REPORT, f, indent=1)


def build(family: str):
    config_cls, model_cls, kwargs = FAMILIES[family]
    config = getattr(tf, config_cls)(vocab_size=V, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kwargs)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        model = getattr(tf, model_cls)(config)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def batch(step: int):
    """ROWS left-padded rows (the second one with PAD pads), answers = the last K tokens."""
    from mobizo.data import Batch

    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(3, V, (ROWS, T), generator=g)
    mask = torch.ones(ROWS, T, dtype=torch.long)
    ids[1, :PAD], mask[1, :PAD] = 0, 0
    return Batch(input_ids=ids, attention_mask=mask, labels=ids[:, T - K :].clone(), n_real=ROWS)


def _eager_steps(model):
    step = ZOStep(model, ZOConfig(queries=Q, seed=SEED))
    out = []
    with torch.no_grad():
        for s in range(1, STEPS + 1):
            b = batch(s)
            losses, _grads = step(
                b.input_ids, b.attention_mask, b.labels, torch.tensor(s), torch.tensor(LR), torch.tensor(EPS)
            )
            out.append(losses)
    return out


def adapted(family: str):
    """(base model, the same with MP-LoRA on the family's default targets, adapted names)."""
    base = build(family)
    model = copy.deepcopy(base)
    return base, model, inject(model, None, RANK, ALPHA, SEED)


def _ids_tokenizer():
    """Just what the generation loop asks of a tokenizer, for models without one: no EOS, ids as text."""

    class Ids:
        eos_token_id = None

        @staticmethod
        def decode(ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    return Ids()


def manifest(model, family: str):
    from mobizo.engines.executorch import manifest_for
    from mobizo.models import weights_hash

    return manifest_for(
        model, family, ZOConfig(queries=Q, seed=SEED), ROWS, T, K, ROWS, RANK, ALPHA, weights_hash(model)
    )


def export_family(family: str, out: Path) -> dict:
    """Export one family's step into ``out/program``; ``out/result.json``: the seconds it took, or the error."""
    from mobizo.engines.executorch import export_program

    try:
        _, model, _ = adapted(family)
        t0, c0 = time.perf_counter(), time.process_time()
        export_program(model, manifest(model, family), out / "program")
        result = {
            "export_s": time.perf_counter() - t0,
            "export_cpu_s": time.process_time() - c0,
            "b_restored": all(not layer.lora_B.any() for _, layer in lora_layers(model)),
        }
    except Exception as e:  # noqa: BLE001 - reported to the test that needs this program
        result = {"error": f"{type(e).__name__}: {e}"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.tmp").write_text(json.dumps(result))
    os.replace(out / "result.tmp", out / "result.json")
    return result


FAMILY_TEST = "test_family_trains_eagerly_in_executorch_and_loads_in_peft"
# Exports dominate this file's time and are single-threaded Python: with 2+ cores they run in
# background worker processes (one per core, at most 2) while the tests consume them in order.
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
EXPORT_WORKERS = int(os.environ.get("MOBIZO_TEST_EXPORT_WORKERS", min(2, CORES)))


class Exports:
    def __init__(self, families: list[str], root: Path):
        import mobizo

        self.root, self.procs = root, []
        n = EXPORT_WORKERS if len(families) > 1 else 0
        if n < 2:
            return  # export in the test process, when a test asks
        env = dict(os.environ)  # the workers import the same mobizo as this process
        env["PYTHONPATH"] = os.pathsep.join([str(Path(mobizo.__file__).parents[1]), env.get("PYTHONPATH", "")])
        for i in range(n):
            group = families[i::n]
            log = open(root / f"worker{i}.log", "wb")  # noqa: SIM115 - closed in close()
            proc = subprocess.Popen(
                [sys.executable, __file__, str(root), *group], env=env, stdout=log, stderr=subprocess.STDOUT
            )
            self.procs.append((proc, log))

    def result(self, family: str) -> dict:
        path = self.root / family / "result.json"
        if not self.procs:
            return export_family(family, self.root / family)
        while not path.exists():
            if all(p.poll() is not None for p, _ in self.procs) and not path.exists():
                logs = " | ".join(
                    (self.root / f"worker{i}.log").read_text(errors="replace")[-500:] for i in range(len(self.procs))
                )
                pytest.fail(f"the export worker died before exporting {family}: {logs}")
            time.sleep(0.2)
        return json.loads(path.read_text())

    def close(self) -> None:
        for proc, log in self.procs:
            if proc.poll() is None:
                proc.kill()  # only our own worker
            proc.wait()
            log.close()


@pytest.fixture(scope="module")
def exports(request, tmp_path_factory):
    families = [
        item.callspec.params["family"]
        for item in request.session.items
        if getattr(item, "originalname", None) == FAMILY_TEST
    ]
    ex = Exports(families, tmp_path_factory.mktemp("programs"))
    yield ex
    ex.close()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_eagerly_in_executorch_and_loads_in_peft(family, exports, tmp_path):
    from mobizo.engines.executorch import ExecuTorchEngine, identity

    base, model, names = adapted(family)
    arch = next(a for a in ARCHS if family in a.model_types)
    assert type(base).__name__ == arch.model_class  # the support table names the class the test builds
    assert names and all(n.rsplit(".", 1)[-1] in arch.targets for n in names)  # the family's default targets
    assert len(names) == len(arch.targets) * base.config.num_hidden_layers

    # ExecuTorch: the step exported once (B = 0, restored after tracing), trained in the runtime
    result = exports.result(family)
    assert "error" not in result, result.get("error")
    assert result["b_restored"]
    program = exports.root / family / "program"
    engine = ExecuTorchEngine(program, expected=identity(manifest(model, family)))  # same weights, same step
    et_losses = [torch.tensor(engine.train_step(batch(s), s, LR, EPS).losses) for s in range(1, STEPS + 1)]

    # eager ZO: finite losses, B moves, the same trajectory as the runtime
    eager_losses = _eager_steps(model)
    for s, (a, b) in enumerate(zip(eager_losses, et_losses), 1):
        assert torch.isfinite(a).all(), (s, a)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=0, msg=lambda m, s=s: f"step {s}: {m}")
    ours, theirs = adapter_state(model), engine.adapter_state()
    assert ours.keys() == theirs.keys()
    moved = max(ours[k].abs().max().item() for k in ours if k.endswith("lora_B"))
    assert moved > 1e-3
    diff = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert diff <= 1e-5, diff
    # eval (the program's score method) with the trained B
    b = batch(99)
    with torch.no_grad():
        sums, counts = answer_losses(model, b.input_ids, b.attention_mask, b.labels)
    et_sums, et_counts = engine.score(b)
    torch.testing.assert_close(et_sums, sums, rtol=1e-4, atol=1e-5)
    assert torch.equal(et_counts, counts)
    # left padding changes nothing (position ids from the mask: RoPE and learned positions alike)
    with torch.no_grad():
        alone, _ = answer_losses(model, b.input_ids[1:, PAD:], b.attention_mask[1:, PAD:], b.labels[1:])
    torch.testing.assert_close(alone[0], sums[1], rtol=1e-5, atol=1e-5)

    # generation in the same program (prefill/decode over its KV cache, with the trained B): the eager
    # model's greedy tokens, past the sliding window of the local-attention families
    from mobizo.engines.eager import EagerEngine
    from mobizo.generation import SamplingConfig, stream

    assert engine.manifest.generate
    prompt = torch.randint(3, V, (5,), generator=torch.Generator().manual_seed(5)).tolist()
    greedy = SamplingConfig(max_new_tokens=T - len(prompt))
    tokens = {}
    for name, e in (("eager", EagerEngine(model, None)), ("executorch", engine)):
        tokens[name] = []
        list(stream(e, _ids_tokenizer(), prompt, greedy, tokens[name]))
    assert tokens["executorch"] == tokens["eager"] and len(tokens["eager"]) == T - len(prompt), tokens

    # first-order baseline: B gets a finite, nonzero gradient
    fo = copy.deepcopy(model)
    params = make_trainable(fo)
    AnswerLoss(fo)(b.input_ids, b.attention_mask, b.labels).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert any(torch.count_nonzero(p.grad) for p in params)

    # PEFT: the runtime's adapter, saved in PEFT format, loads with `peft` and gives mobizo's logits
    from peft import PeftModel

    save_adapter(tmp_path / "adapter", theirs, RANK, ALPHA, family, fan_in_fan_out=fan_in_fan_out(model))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] == (family == "gpt2")
    state, config = read_adapter(tmp_path / "adapter")
    loaded = copy.deepcopy(base)  # what `mobizo eval --adapter` does
    inject(loaded, sorted({k.rsplit(".", 1)[0] for k in state}), int(config["r"]), float(config["lora_alpha"]), 0)
    load_adapter_state(loaded, state)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    ids = batch(100).input_ids
    with torch.no_grad():
        want, got, plain = peft_model(input_ids=ids).logits, loaded(input_ids=ids).logits, base(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - plain).abs().max() > 1e-4  # the adapter changes the model

    REPORT[family] = {
        "class": arch.model_class,
        "export_s": round(result["export_s"], 2),
        "export_cpu_s": round(result["export_cpu_s"], 2),
        "pte_bytes": (program / "train.pte").stat().st_size,
    }


# ---------------------------------------------------------------- outside the table


def _save_with_tokenizer(model, d):
    from mobizo.models import tiny_tokenizer

    model.save_pretrained(d, safe_serialization=True)
    tiny_tokenizer().save_pretrained(d)
    return d


def test_models_outside_the_table_are_refused_with_one_line_naming_the_class(tmp_path, run_cli):
    bert = tf.BertModel(
        tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    )
    with pytest.raises(MobizoError, match=r"^BertModel is not a causal language model \(it has no LM head\)"):
        inject(bert, None, RANK, ALPHA, 0)
    t5 = tf.T5ForConditionalGeneration(
        tf.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    )
    with pytest.raises(MobizoError, match="^T5ForConditionalGeneration is an encoder-decoder model"):
        inject(t5, ["q"], RANK, ALPHA, 0)
    # a causal LM with no default targets: the error says so and lists its layers; explicit targets work
    cfg = dict(
        vocab_size=1024,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    stablelm = tf.StableLmForCausalLM(tf.StableLmConfig(**cfg))
    with pytest.raises(MobizoError) as e:
        inject(copy.deepcopy(stablelm), None, RANK, ALPHA, 0)
    msg = str(e.value)
    assert msg.startswith("StableLmForCausalLM (model type 'stablelm') has no default --target-modules")
    assert "q_proj" in msg and "\n" not in msg
    assert len(inject(copy.deepcopy(stablelm), ["q_proj", "v_proj"], RANK, ALPHA, 0)) == 2
    # and through the command line: one line, nothing written
    d = _save_with_tokenizer(stablelm, tmp_path / "stablelm")
    code, err = run_cli(["train", "--model", d, "--steps", 1, "--no-progress", "--out", tmp_path / "o"])
    last = err.strip().splitlines()[-1]  # (transformers' weight-loading progress bar may come before it)
    assert code == 2 and last.startswith("mobizo: error: StableLmForCausalLM (model type 'stablelm') has no default")
    assert not (tmp_path / "o").exists()


@torch.library.custom_op("mobizo_test::opaque_act", mutates_args=())
def _opaque_act(x: torch.Tensor) -> torch.Tensor:  # no fake (meta) kernel: torch.export cannot trace it
    return torch.nn.functional.silu(x)


class OpaqueAct(torch.nn.Module):
    def forward(self, x):
        return _opaque_act(x)


class DataDependent(torch.nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x  # branches on a value: not exportable


@pytest.mark.slow  # traces and lowers
@pytest.mark.parametrize(
    "act,names", [(OpaqueAct, "at operator mobizo_test::opaque_act"), (DataDependent, "data-dependent")]
)
def test_export_failure_names_the_module_and_operator(tiny, tmp_path, capfd, act, names):
    from mobizo.engines.executorch import export_program, manifest_for

    model, _ = tiny
    model.model.layers[1].mlp.act_fn = act()
    inject(model, None, RANK, ALPHA, 0)
    manifest = manifest_for(model, "tiny", ZOConfig(queries=1), 1, 8, 1, 1, RANK, ALPHA, "x")
    capfd.readouterr()
    with pytest.raises(MobizoError) as e:
        export_program(model, manifest, tmp_path / "p")
    msg = str(e.value)
    assert msg.startswith(f"torch.export failed in model.layers.1.mlp.act_fn ({act.__name__})"), msg
    assert names in msg and "\n" not in msg
    assert "def forward" not in capfd.readouterr().err  # torch's partial-graph dump is not shown
    assert not (tmp_path / "p").exists()


def test_a_forward_without_logits_to_keep_or_position_ids_still_trains(tiny):
    """Remote-code style models whose forward takes only input_ids/attention_mask: logits are sliced after."""

    class Plain(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    model, _ = tiny
    inject(model, None, RANK, ALPHA, 0)
    plain = Plain(model)
    b = batch(1)
    ids, mask = b.input_ids % 500, torch.ones_like(b.attention_mask)  # unpadded: positions agree
    with torch.no_grad():
        want = answer_losses(model, ids, mask, b.labels % 500)
        got = answer_losses(plain, ids, mask, b.labels % 500)
        losses, _ = ZOStep(plain, ZOConfig(queries=Q))(
            ids, mask, b.labels % 500, torch.tensor(1), torch.tensor(LR), torch.tensor(EPS)
        )
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1]) and torch.isfinite(losses).all()


def test_gpt2_checkpoint_trains_from_the_cli_and_its_adapter_says_fan_in_fan_out(tmp_path, run_cli):
    config = tf.GPT2Config(vocab_size=1024, n_embd=32, n_inner=64, n_layer=1, n_head=4, n_positions=64)
    torch.manual_seed(0)
    d = _save_with_tokenizer(tf.GPT2LMHeadModel(config), tmp_path / "gpt2")
    out = tmp_path / "run"
    code, err = run_cli(
        [
            "train",
            "--model",
            d,
            "--queries",
            2,
            "--batch-size",
            2,
            "--steps",
            2,
            "--max-length",
            32,
            "--eval-examples",
            4,
            "--eval-every",
            0,
            "--no-progress",
            "--out",
            out,
        ]
    )
    assert code == 0, err
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["target_modules"] == ["transformer.h.0.attn.c_attn"]
    code, err = run_cli(["eval", "--model", d, "--adapter", out / "adapter", "--eval-examples", 4, "--max-length", 32])
    assert code == 0, err


if __name__ == "__main__":  # an export worker of `Exports`: ROOT FAMILY...
    import executorch.backends.xnnpack.partition.xnnpack_partitioner
    import executorch.exir  # noqa: F401 - not any one family's export time

    for fam in sys.argv[2:]:
        export_family(fam, Path(sys.argv[1]) / fam)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_candidate_logits_are_the_full_logits_columns(family):
    """The shared-prompt training step's LM head (the candidates' rows only) goes through each family's
    own forward: final norm, logit scaling and soft-capping give the same numbers as the full head."""
    from mobizo.step import candidate_logits, lm_logits, plain_head

    model = build(family)
    assert plain_head(model) is not None  # every family's head is a plain linear: the fast path runs
    b = batch(1)
    cands = torch.tensor([[5, 9, 7], [100, 3, 191]])
    with torch.no_grad():
        full = lm_logits(model, b.input_ids, b.attention_mask, torch.arange(T - 1, T))[:, -1]
        got = candidate_logits(model, b.input_ids, b.attention_mask, cands)
    torch.testing.assert_close(got, full.gather(1, cands), rtol=1e-5, atol=1e-5)
    assert model.get_output_embeddings() is plain_head(model)[2]  # the head is put back
