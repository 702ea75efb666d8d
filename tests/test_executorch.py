"""The ZO step exported to ExecuTorch trains in the stock runtime and follows the eager trajectory."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mobizo.build import export
from mobizo.config import TrainConfig
from mobizo.errors import MobizoError
from mobizo.trainer import train


@pytest.fixture(scope="module")
def program(tmp_path_factory, tiny_flags):
    d = tmp_path_factory.mktemp("program")
    export(TrainConfig.from_flat(**tiny_flags()), str(d / "p"))
    return d / "p"


def _adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _losses(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "step" in r]  # the first line is the log header


def test_manifest_describes_the_program(program):
    m = json.loads((program / "manifest.json").read_text())
    assert m["estimator"] == "prge" and m["queries"] == 2 and m["batch_size"] == 4 and m["max_length"] == 32
    assert m["objective"] == "choice-sum" and m["choices"] == 2 and m["answer_len"] == 1
    assert m["versions"]["torch"] == torch.__version__ and m["versions"]["executorch"] == "1.5.1"
    assert len(m["base_weights_sha256"]) == 64 and len(m["target_modules"]) == 4
    assert (program / "train.pte").stat().st_size == m["pte_bytes"]
    # how long each stage took, recorded even though a test's stderr is no terminal (no status lines)
    stages = m["export_seconds"]
    assert list(stages) == ["tracing the step (torch.export)", "lowering to XNNPACK", "serializing the program"]
    assert all(s >= 0 for s in stages.values()) and stages["lowering to XNNPACK"] > 1


def test_parity_with_eager_over_50_steps_and_resume(program, tmp_path, tiny_flags, run_cli):
    steps = dict(steps=50, eval_every=25, save_every=10)
    s_eager = train(TrainConfig.from_flat(**tiny_flags(), **steps, out=str(tmp_path / "eager")))
    s_et = train(
        TrainConfig.from_flat(
            **tiny_flags(), **steps, engine="executorch", program=str(program), out=str(tmp_path / "et")
        )
    )
    le, lx = _losses(tmp_path / "eager"), _losses(tmp_path / "et")
    assert len(le) == len(lx) == 50
    for a, b in zip(le, lx):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
    ae, ax = _adapter(tmp_path / "eager"), _adapter(tmp_path / "et")
    assert ae.keys() == ax.keys()
    diff = max((ae[k] - ax[k]).abs().max().item() for k in ae)
    scale = max(ae[k].abs().max().item() for k in ae)
    assert diff <= 1e-4 and scale > 1e-2  # the adapter really moved
    assert abs(s_eager["eval"]["loss"] - s_et["eval"]["loss"]) <= 1e-4 * s_eager["eval"]["loss"]
    # interrupt the ExecuTorch run at step 20 (checkpoint), resume to 50: the same trajectory
    part = tmp_path / "et-part"
    train(
        TrainConfig.from_flat(
            **tiny_flags(steps=20, eval_every=0, save_every=10, engine="executorch"),
            program=str(program),
            out=str(part),
        )
    )
    code, err = run_cli(["train", "--out", part, "--resume", "--steps", 50, "--no-progress"])
    assert code == 0, err
    ar = _adapter(part)
    assert max((ar[k] - ax[k]).abs().max().item() for k in ar) <= 1e-6


def test_mismatched_and_corrupted_programs_are_refused(program, tmp_path, tiny_flags, run_cli):
    with pytest.raises(MobizoError, match="queries=2, this run needs 4"):
        train(TrainConfig.from_flat(**tiny_flags(queries=4), steps=1, engine="executorch", program=str(program)))
    with pytest.raises(MobizoError, match="max_length"):
        train(TrainConfig.from_flat(**tiny_flags(max_length=48), steps=1, engine="executorch", program=str(program)))
    bad = tmp_path / "bad"
    shutil.copytree(program, bad)
    data = (bad / "train.pte").read_bytes()
    (bad / "train.pte").write_bytes(data[: len(data) // 2])
    code, err = run_cli(
        [
            "train",
            "--engine",
            "executorch",
            "--program",
            bad,
            "--queries",
            2,
            "--batch-size",
            4,
            "--max-length",
            32,
            "--seed",
            3,
            "--steps",
            1,
            "--out",
            tmp_path / "o",
            "--no-progress",
        ]
    )
    assert code == 2 and "truncated or corrupted" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()  # nothing half-written
    (bad / "manifest.json").write_text("{not json")
    code, err = run_cli(["train", "--engine", "executorch", "--program", bad, "--steps", 1])
    assert code == 2 and "malformed manifest" in err


def test_adapter_read_out_and_load(program):
    from mobizo.engines.executorch import ExecuTorchEngine

    eng = ExecuTorchEngine(program)
    state = eng.adapter_state()
    assert all(torch.count_nonzero(v) == 0 for k, v in state.items() if k.endswith("lora_B"))
    key = next(k for k in state if k.endswith("lora_B"))
    state[key] = torch.full_like(state[key], 0.5)
    eng.load_adapter_state(state)
    assert torch.equal(eng.adapter_state()[key], state[key])
    wrong = dict(state)
    wrong[key] = torch.zeros(3, 3)
    with pytest.raises(MobizoError, match="shape"):
        eng.load_adapter_state(wrong)
    a_key = key.replace("lora_B", "lora_A")
    wrong = dict(state)
    wrong[a_key] = wrong[a_key] + 1
    with pytest.raises(MobizoError, match="frozen A"):
        eng.load_adapter_state(wrong)


def test_shared_prompt_program_follows_the_per_candidate_eager_trajectory(program):
    """The program scores one prompt row per example (one-token label words); eager ZOStep over one
    row per (example, candidate) takes the same steps."""
    from mobizo.data import Encoder, collate_choices, step_indices
    from mobizo.engines.executorch import ExecuTorchEngine
    from mobizo.models import build_tiny
    from mobizo.mplora import inject, lora_layers
    from mobizo.step import ZOConfig, ZOStep, choice_losses
    from mobizo.tasks import get_task

    m = json.loads((program / "manifest.json").read_text())
    assert m["shared_prompt"] is True and m["choices"] == 2 and m["answer_len"] == 1
    eng = ExecuTorchEngine(program)
    model, tok = build_tiny()
    inject(model, None, 8, 16.0, 3)
    step = ZOStep(model, ZOConfig("prge", 2, seed=3, objective="choice-sum", choices=2))
    exs, enc = get_task("synthetic").load("train"), Encoder(tok)

    def groups(idx):
        return [[enc(exs[i].prompt, c) for c in exs[i].candidates] for i in idx], [exs[i].label for i in idx]

    for s in range(1, 11):
        g, gold = groups(step_indices(len(exs), 4, s, 3))
        shared = collate_choices(g, gold, 2, tok.pad_token_id, 32, length=32, answer_len=1, examples=4)
        per_candidate = collate_choices(g, gold, 2, tok.pad_token_id, 32, shared=False)
        assert shared.shared and shared.rows == 4 and per_candidate.rows == 8
        res = eng.train_step(shared, s, 1.0, 0.05)
        with torch.no_grad():
            losses, _ = step(
                per_candidate.input_ids,
                per_candidate.attention_mask,
                per_candidate.labels,
                torch.tensor(s),
                torch.tensor(1.0),
                torch.tensor(0.05),
                per_candidate.gold,
            )
        torch.testing.assert_close(torch.tensor(res.losses), losses, rtol=1e-4, atol=1e-5)
    state = eng.adapter_state()
    for name, layer in lora_layers(model):
        assert (state[f"{name}.lora_B"] - layer.lora_B).abs().max() <= 1e-4  # as the 50-step eager parity
    assert max(v.abs().max() for k, v in state.items() if k.endswith("lora_B")) > 1e-3
    # score: (eval rows, choices) CE of the candidates after the prompt, as a forward over the rows gives
    rows = m["eval_rows"]  # score takes one copy of the step's batch (build.program_eval_rows)
    g, gold = groups(range(rows))
    batch = collate_choices(g, gold, 2, tok.pad_token_id, 32, length=32, answer_len=1, examples=rows)
    sums, counts = eng.score_choices(batch)
    with torch.no_grad():
        want, want_counts = choice_losses(model, batch.input_ids, batch.attention_mask, batch.labels)
    torch.testing.assert_close(sums, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(counts, want_counts)
    with pytest.raises(MobizoError, match="one shared prompt row per example"):
        eng.train_step(collate_choices(g[:4], gold[:4], 2, tok.pad_token_id, 32, shared=False), 11, 1.0, 0.05)


def test_the_program_generates_like_eager_with_the_adapter_as_it_is_now(program, tiny_flags):
    """prefill/decode read the same lora_B buffers as train_step: generate, train, generate again, and every
    greedy continuation equals the eager model's with the same adapter; training between generations
    follows the eager trajectory (the KV cache does not disturb it)."""
    from mobizo.build import assemble
    from mobizo.engines.eager import EagerEngine
    from mobizo.engines.executorch import ExecuTorchEngine
    from mobizo.generation import SamplingConfig, prompt_ids, stream
    from mobizo.mplora import adapter_state, load_adapter_state
    from mobizo.trainer import make_batch

    run = assemble(TrainConfig.from_flat(**tiny_flags()))
    et = ExecuTorchEngine(program)
    run.engine = et
    eager_zo = EagerEngine(run.model, "prge", run.zo_config())
    prompts = ["The movie was great . It was", "Dull and slow", "a"]

    greedy = SamplingConfig(max_new_tokens=12)

    def continuations(engine, config=greedy):
        out = []
        for p in prompts:
            tokens = []
            list(stream(engine, run.tokenizer, prompt_ids(run.tokenizer, p), config, tokens))
            out.append(tokens)
        return out

    seen = []
    for round_ in range(3):
        if round_ == 1:  # a large adapter, loaded into both: generation must change with B
            state = et.adapter_state()
            g = torch.Generator().manual_seed(0)
            for k in state:
                if k.endswith("lora_B"):
                    state[k] = torch.randn(state[k].shape, generator=g)
            et.load_adapter_state(state)
            load_adapter_state(run.model, state)
        for step in range(1, 4) if round_ == 2 else ():  # train between generations, eager in lockstep
            batch = make_batch(run, step)
            a, b = et.train_step(batch, step, 1.0, 0.05), eager_zo.train_step(batch, step, 1.0, 0.05)
            assert abs(a.loss - b.loss) <= 1e-4 * abs(b.loss)
        ours, theirs = continuations(et), continuations(EagerEngine(run.model, None))
        assert ours == theirs and all(len(t) == 12 for t in ours)
        seen.append(ours)
        sampled = SamplingConfig(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=7)
        assert continuations(et, sampled) == continuations(EagerEngine(run.model, None), sampled)
    assert seen[0] != seen[1] != seen[2]  # the text reflects the adapter of the moment
    ours = et.adapter_state()
    assert max((ours[k] - v).abs().max().item() for k, v in adapter_state(run.model).items()) <= 1e-5
