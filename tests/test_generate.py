"""Using a trained run: `mobizo generate` / `chat` / `predict`, run-directory defaults (eval too), the Python API
(mobizo.generate / stream / predict) and the one-line errors of bad input (docs/generate.md)."""

import io
import json
import os
import pty
import re
import select
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

import mobizo
from mobizo import TrainConfig
from mobizo.errors import MobizoError

SRC = Path(__file__).resolve().parents[1] / "src"
RUN = dict(
    model="tiny",
    task="synthetic",
    queries=2,
    batch_size=4,
    max_length=40,
    eval_every=3,
    eval_examples=16,
    eval_batch_size=8,
    optimizer="sgd",
    lr=4.0,
    eps=0.05,
    seed=3,
    progress=False,
)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
PROMPT = "Review: the movie was"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny synthetic run with best/ and adapter/ (evals at steps 3 and 6)."""
    out = tmp_path_factory.mktemp("gen") / "run"
    mobizo.train(config(steps=6, out=str(out)))
    return out


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    """A custom classification run (template and label words only its config knows)."""
    d = tmp_path_factory.mktemp("cls")
    words = {"yes": ["good", "great", "fine", "nice"], "no": ["bad", "awful", "dull", "poor"]}
    rows = [
        {"text": f"the {s} was {w}", "label": lab} for lab, ws in words.items() for w in ws for s in ("food", "room")
    ]
    (d / "data").mkdir()
    (d / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "data" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[::2]))
    cfg = {"task": "custom", "data": str(d / "data"), "template": "Text: {text} Answer:", "max_length": 24}
    mobizo.train(config(**cfg, label_words="no,yes", steps=4, eval_every=2, out=str(d / "r")))
    return d / "r"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tiny_pair):
    """The tiny model with a chat template, and a run trained on it."""
    model, tok = tiny_pair
    d = tmp_path_factory.mktemp("chat")
    model.save_pretrained(d / "model", safe_serialization=True)
    tok.chat_template = CHAT_TEMPLATE
    try:
        tok.save_pretrained(d / "model")
    finally:
        tok.chat_template = None
    mobizo.train(config(model=str(d / "model"), steps=2, out=str(d / "run")))
    return d / "model", d / "run"


def config(**fields) -> TrainConfig:
    """RUN with ``fields`` replaced."""
    return TrainConfig.from_flat(**{**RUN, **fields})


@pytest.fixture
def cli(capsys, run_cli):
    """``cli(*argv, stdin=None)``: (exit code, stdout, stderr) of `mobizo ARGV` run in-process."""

    def call(*argv, stdin: str | None = None):
        capsys.readouterr()
        old = sys.stdin
        if stdin is not None:
            sys.stdin = io.StringIO(stdin)
        try:
            code, err = run_cli(list(argv))
        finally:
            sys.stdin = old
        return code, capsys.readouterr().out, err

    return call


def error_line(err: str) -> str:
    """The one line of a refused command (nothing else on stderr)."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mobizo: error: "), err
    return lines[0][len("mobizo: error: ") :]


def with_adapter(adapter, model_name="tiny"):
    from mobizo.models import load_model

    model, tok = load_model(str(model_name))
    return mobizo.load_adapter(model, adapter), tok


@torch.no_grad()
def naive_greedy(model, tok, ids, n):
    """Greedy decoding the slow, obvious way: a whole forward per token, no cache, no stop strings."""
    seq, new = list(ids), []
    for _ in range(n):
        t = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
        if t == tok.eos_token_id:
            break
        seq.append(t)
        new.append(t)
    return tok.decode(new, skip_special_tokens=True), new


# ---------------------------------------------------------------- generate


def test_generate_is_the_greedy_text_of_the_run_s_best_adapter(run, cli):
    code, out, err = cli("generate", "--run", run, "--prompt", PROMPT, "--max-new-tokens", 16)
    assert code == 0, err
    assert f"adapter {run / 'best'} (the best periodic eval" in err
    model, tok = with_adapter(run / "best")
    want, new = naive_greedy(model, tok, tok(PROMPT)["input_ids"], 16)
    assert len(new) >= 8 and out == want + "\n"
    # --adapter-kind last: the final adapter; --json: one object per prompt
    code, out, err = cli(
        "generate",
        "--run",
        run,
        "--adapter-kind",
        "last",
        "--prompt",
        PROMPT,
        "--prompt",
        "hi",
        "--json",
        "--max-new-tokens",
        16,
    )
    assert code == 0 and f"adapter {run / 'adapter'} (the final adapter)" in err
    records = [json.loads(line) for line in out.splitlines()]
    model, tok = with_adapter(run / "adapter")
    for rec, prompt in zip(records, [PROMPT, "hi"]):
        text, new = naive_greedy(model, tok, tok(prompt)["input_ids"], 16)
        assert rec["prompt"] == prompt and rec["completion"] == text and rec["tokens"] == len(new)
        assert rec["finish"] == ("length" if len(new) == 16 else "eos") and rec["seconds"] >= 0
    assert len(records) == 2
    # the same prompts from a file (JSONL, plain text, stdin): the same texts, in a separated stream
    Path("p.jsonl").write_text(json.dumps({"prompt": PROMPT}) + "\n\n" + json.dumps({"prompt": "hi"}) + "\n")
    Path("p.txt").write_text(f"{PROMPT}\nhi\n")
    outs = []
    for source, stdin in (("p.jsonl", None), ("p.txt", None), ("-", f"{PROMPT}\n\nhi\n")):
        code, out, _ = cli(
            "generate", "--adapter", run / "adapter", "--input", source, "--max-new-tokens", 16, stdin=stdin
        )
        assert code == 0
        outs.append(out)
    assert outs[0] == outs[1] == outs[2]
    want = "".join(
        f"{'' if i == 0 else chr(10)}==> prompt {i + 1} <==\n{r['completion']}\n" for i, r in enumerate(records)
    )
    assert outs[0] == want


def test_generate_flushes_every_piece(run, monkeypatch):
    """The text reaches stdout as it is decoded: a flush after every piece, not once at the end."""
    from mobizo.cli import main

    class Recorder(io.StringIO):
        def __init__(self):
            super().__init__()
            self.flushed = []  # the length of the text at each flush

        def flush(self):
            self.flushed.append(len(self.getvalue()))

    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["generate", "--run", str(run), "--prompt", PROMPT, "--max-new-tokens", 40, "--no-progress"]) == 0
    text = out.getvalue()
    steps = sorted(set(out.flushed))
    assert len(text) > 40 and len(steps) >= 20 and steps[-1] == len(text)


def test_sampling_with_a_seed_is_reproducible_and_stop_strings_cut(run, cli):
    args = ["generate", "--run", run, "--prompt", PROMPT, "--max-new-tokens", 24, "--temperature", 1.0, "--top-p", 0.9]
    texts = [cli(*args, "--seed", s)[1] for s in (7, 7, 8)]
    assert texts[0] == texts[1] != texts[2]
    code, greedy, _ = cli("generate", "--run", run, "--prompt", PROMPT, "--max-new-tokens", 24)
    greedy = greedy[:-1]
    stop = greedy[6:8]
    assert code == 0 and len(greedy) > 10 and stop.strip()
    code, out, _ = cli(
        "generate",
        "--run",
        run,
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        24,
        "--stop",
        stop,
        "--stop",
        "never there",
        "--json",
    )
    rec = json.loads(out)
    assert code == 0 and rec["completion"] == greedy[: greedy.find(stop)] and rec["finish"] == "stop"


def test_a_chat_model_s_template_is_applied(chat_model, cli):
    model_dir, run_dir = chat_model
    code, out, err = cli("generate", "--run", run_dir, "--prompt", "hello", "--max-new-tokens", 12)
    assert code == 0, err
    model, tok = with_adapter(run_dir / "best", model_dir)
    rendered = "user: hello\nassistant:"
    assert (
        tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
        == rendered
    )
    assert out == naive_greedy(model, tok, tok(rendered)["input_ids"], 12)[0] + "\n"
    code, plain, _ = cli(
        "generate", "--run", run_dir, "--prompt", "hello", "--max-new-tokens", 12, "--no-chat-template"
    )
    assert code == 0 and plain == naive_greedy(model, tok, tok("hello")["input_ids"], 12)[0] + "\n" != out


def test_python_api_generate_stream_and_predict(run, tiny):
    text = mobizo.generate(PROMPT, run=run, max_new_tokens=16)
    model, tok = with_adapter(run / "best")
    assert text == naive_greedy(model, tok, tok(PROMPT)["input_ids"], 16)[0]
    assert mobizo.generate([PROMPT, "hi"], run=run, max_new_tokens=16)[0] == text
    pieces = list(mobizo.stream(PROMPT, run=run, max_new_tokens=16))
    assert len(pieces) > 1 and "".join(pieces) == text
    # a model object, its tokenizer and an adapter directory (the adapter is injected into the object)
    obj, tok = tiny
    assert mobizo.generate(PROMPT, model=obj, tokenizer=tok, adapter=run / "best", max_new_tokens=16) == text
    one = mobizo.predict("the plot was dull", run=run)
    both = mobizo.predict(["the plot was dull", {"text": "the cast was superb"}], run=run)
    assert both[0] == one and one["candidates"] == ["bad", "good"] and one["label"] in ("bad", "good")
    assert abs(sum(one["probabilities"]) - 1) < 1e-9 and one["label"] == one["candidates"][one["index"]]
    with pytest.raises(MobizoError, match="--stop strings must not be empty"):
        mobizo.generate(PROMPT, run=run, stop="")


# ---------------------------------------------------------------- predict


def test_predict_ranks_like_eval(cls_run, cli):
    """Probabilities sum to 1 and the chosen label is eval's prediction, for every validation input."""
    from mobizo.data import Encoder
    from mobizo.engines.eager import EagerEngine
    from mobizo.evaluation import evaluate
    from mobizo.tasks import get_task

    rows = [json.loads(line) for line in (cls_run.parent / "data" / "validation.jsonl").read_text().splitlines()]
    Path("in.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    code, out, err = cli("predict", "--run", cls_run, "--input", "in.jsonl", "--json")
    assert code == 0, err
    preds = [json.loads(line) for line in out.splitlines()]
    assert len(preds) == len(rows) and all(abs(sum(p["probabilities"]) - 1) < 1e-9 for p in preds)
    assert all(p["candidates"] == ["no", "yes"] for p in preds)
    # eval's own choice on the same examples (its scorer, its shared-prompt path) with the same adapter
    model, tok = with_adapter(cls_run / "best")
    task = get_task("custom", data=str(cls_run.parent / "data"), template="Text: {text} Answer:", label_words="no,yes")
    chosen: list[int] = []
    evaluate(
        EagerEngine(model, None),
        task.kind,
        task.load("validation"),
        Encoder(tok),
        tok.pad_token_id,
        24,
        predictions=chosen,
    )
    assert [p["index"] for p in preds] == chosen
    # plain text lines go into the template's single field; the text format is label<TAB>word=p ...
    Path("in.txt").write_text("".join(r["text"] + "\n" for r in rows))
    code, out, _ = cli("predict", "--adapter", cls_run, "--input", "in.txt")
    assert code == 0
    assert out.splitlines() == [
        f"{p['label']}\tno={p['probabilities'][0]:.4f} yes={p['probabilities'][1]:.4f}" for p in preds
    ]


def test_predict_multiple_choice_ranks_by_mean_log_prob(run, cli, tmp_path):
    """COPA (multi-token candidates, one row per candidate): the mean per-token log-prob, as eval ranks."""
    from mobizo.data import Encoder
    from mobizo.engines.eager import EagerEngine
    from mobizo.evaluation import evaluate
    from mobizo.tasks import get_task

    rows = [
        {
            "premise": "The man broke his toe.",
            "question": "cause",
            "choice1": "He dropped a hammer on his foot.",
            "choice2": "He got a hole in his sock.",
            "label": 0,
        },
        {
            "premise": "I tipped the bottle.",
            "question": "effect",
            "choice1": "The liquid in the bottle froze.",
            "choice2": "The liquid in the bottle poured out.",
            "label": 1,
        },
    ]
    (tmp_path / "copa").mkdir()
    (tmp_path / "copa" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    inputs = "".join(json.dumps({k: v for k, v in r.items() if k != "label"}) + "\n" for r in rows)
    code, out, err = cli(
        "predict", "--adapter", run / "best", "--task", "copa", "--model", "tiny", "--input", "-", stdin=inputs
    )
    assert code == 0, err
    lines = out.splitlines()
    model, tok = with_adapter(run / "best")
    chosen: list[int] = []
    exs = get_task("copa", data=str(tmp_path / "copa")).load("validation")
    evaluate(EagerEngine(model, None), "multiple_choice", exs, Encoder(tok), tok.pad_token_id, 128, predictions=chosen)
    for line, ex, pick in zip(lines, exs, chosen):
        label, probs = line.split("\t")
        assert label == ex.candidates[pick].strip() and probs.startswith("1=") and " 2=" in probs
    assert len(lines) == 2


# ---------------------------------------------------------------- run-directory defaults


def test_eval_of_a_run_evaluates_the_run_s_own_task(cls_run, cli):
    summary = json.loads((cls_run / "summary.json").read_text())
    code, _out, err = cli("eval", "--adapter", cls_run, "--json", "m.json", "--no-progress")
    assert code == 0, err
    m = json.loads(Path("m.json").read_text())
    assert m["task"] == "custom-cls" and m["adapter"] == str(cls_run / "best") and m["run"] == str(cls_run)
    assert m["accuracy"] == summary["best"]["value"] and m["n"] == summary["eval"]["n"]
    code, _, err = cli("eval", "--run", cls_run, "--adapter-kind", "last", "--json", "l.json", "--no-progress")
    assert code == 0 and json.loads(Path("l.json").read_text())["accuracy"] == summary["eval_accuracy"]
    assert f"adapter {cls_run / 'adapter'} (the final adapter)" in err
    # an adapter inside the run belongs to it; flags given override the run's values
    code, _, err = cli("eval", "--adapter", cls_run / "adapter", "--eval-examples", 3, "--json", "x.json")
    assert code == 0 and "warning" not in err
    x = json.loads(Path("x.json").read_text())
    assert x["task"] == "custom-cls" and x["n"] == 3
    # the Python API: the same
    assert mobizo.evaluate(adapter=cls_run, progress=False)["accuracy"] == m["accuracy"]


def test_a_bare_adapter_names_its_base_and_the_synthetic_task_is_said(run, cli, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(run / "adapter", bare)
    code, out, err = cli("eval", "--adapter", bare, "--eval-examples", 8, "--no-progress")
    assert code == 0 and out.startswith("synthetic (adapter ")
    assert err.splitlines() == [
        "mobizo: model tiny (the base model adapter_config.json names)",
        (
            f"mobizo: warning: --task not given and adapter {bare} is not in a run directory: evaluating the built-in "
            "synthetic task (give --task, or the run directory the adapter came from)"
        ),
    ]
    config = json.loads((bare / "adapter_config.json").read_text())
    (bare / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/gone/SmolLM2"}))
    code, out, err = cli("eval", "--adapter", bare)
    assert (
        code == 2
        and out == ""
        and error_line(err)
        == (
            f"adapter {bare} was trained on /gone/SmolLM2 (adapter_config.json base_model_name_or_path), which is not "
            "a model on this machine; give the base model with --model PATH"
        )
    )
    # an adapter of another model given --model: what it adapts that the model lacks, and its base
    from safetensors.torch import load_file, save_file

    moved = [m.replace("layers.1.", "layers.7.") for m in config["target_modules"]]
    (bare / "adapter_config.json").write_text(json.dumps({**config, "target_modules": moved}))
    w = load_file(str(bare / "adapter_model.safetensors"))
    w = {k.replace("layers.1.", "layers.7."): v for k, v in w.items()}
    save_file(w, str(bare / "adapter_model.safetensors"))
    code, out, err = cli("eval", "--model", "tiny", "--adapter", bare, "--task", "synthetic")
    assert code == 2 and error_line(err) == (
        f"adapter {bare} does not fit model tiny: it adapts 2 module(s) the model lacks "
        "(e.g. model.layers.7.self_attn.q_proj); it was trained on tiny: give that with --model"
    )


def test_a_run_whose_model_moved(tiny_dir, cli, tmp_path):
    shutil.copytree(tiny_dir, tmp_path / "m1")
    mobizo.train(config(model=str(tmp_path / "m1"), steps=1, eval_every=0, out=str(tmp_path / "r")))
    (tmp_path / "m1").rename(tmp_path / "m2")
    for argv in (["generate", "--prompt", "hi"], ["predict", "--input", "-"], ["eval"]):
        code, out, err = cli(*argv, "--run", tmp_path / "r", stdin="the plot was dull\n")
        assert (
            code == 2
            and out == ""
            and error_line(err)
            == (
                f"the run {tmp_path / 'r'} was trained on model {tmp_path / 'm1'}, which is not there any more; "
                "give its new path with --model PATH"
            )
        )
    code, out, err = cli(
        "generate", "--run", tmp_path / "r", "--model", tmp_path / "m2", "--prompt", "hi", "--max-new-tokens", 4
    )
    assert code == 0 and out.endswith("\n"), err


# ---------------------------------------------------------------- bad input


def test_bad_input_is_one_line_and_exit_2(run, cli, tmp_path, tiny_pair):
    long_prompt = " ".join(["movie"] * 600)
    n = len(tiny_pair[1](long_prompt)["input_ids"])
    assert n > 600
    Path("empty.txt").write_text("\n \n")
    Path("empty.jsonl").write_text("")
    Path("nofield.jsonl").write_text('{"text": "x"}\n')
    adapter_file = run / "adapter" / "adapter_model.safetensors"
    cases = [
        (
            ["generate", "--run", run, "--prompt", long_prompt],
            f"the prompt is {n} tokens, the model holds 512 positions: it leaves no room to generate",
        ),
        (
            ["generate", "--run", run, "--prompt", "hi", "--prompt", long_prompt, "--json"],
            f"prompt 2: the prompt is {n} tokens, the model holds 512 positions: it leaves no room to generate",
        ),
        (
            ["generate", "--run", run, "--prompt", PROMPT, "--max-new-tokens", 600],
            (
                "--max-new-tokens 600 after a 6-token prompt goes past the 512 positions of the model "
                "(use --max-new-tokens 506 or less)"
            ),
        ),
        (["generate", "--run", run, "--prompt", PROMPT, "--stop", ""], "--stop strings must not be empty"),
        (["generate", "--run", run], "nothing to generate from: give --prompt TEXT or --input FILE"),
        (["generate", "--run", run, "--input", "empty.txt"], "--input empty.txt: no inputs (the file is empty)"),
        (
            ["generate", "--run", run, "--input", "nofield.jsonl"],
            'nofield.jsonl:1: no "prompt" field (a non-empty string)',
        ),
        (["generate", "--run", run, "--input", "missing.txt"], "--input missing.txt does not exist"),
        (["predict", "--run", run, "--input", "empty.jsonl"], "--input empty.jsonl: no inputs (the file is empty)"),
        (
            ["predict", "--model", "tiny", "--task", "rte", "--input", "-"],
            "task rte reads the fields premise, hypothesis: give JSONL records with them, not plain text lines",
        ),
        (
            ["generate", "--run", run, "--engine", "executorch", "--prompt", "hi"],
            (
                f"run {run} has no program/ (it trained with --engine eager): give --program DIR (from 'mobizo export') "
                "or use --engine eager"
            ),
        ),
        (
            ["chat", "--run", run],
            (
                "the tokenizer of tiny has no chat template: mobizo chat needs a chat model "
                "(use mobizo generate to continue plain text)"
            ),
        ),
        (
            ["eval", "--adapter", adapter_file],
            (
                f"--adapter {adapter_file} is a file, not an adapter directory or a run directory (give the directory that "
                "holds adapter_config.json, or the run directory)"
            ),
        ),
        (
            ["generate", "--run", run / "adapter", "--prompt", "hi"],
            (f"--run {run / 'adapter'} is not a mobizo run directory (no .mobizo marker, checkpoint or summary)"),
        ),
        (
            ["generate", "--adapter", run / "adapter", "--adapter-kind", "best", "--prompt", "hi"],
            "--adapter-kind chooses among a run directory's adapters; --adapter names one",
        ),
        (
            ["eval", "--adapter", tmp_path],
            (
                f"--adapter {tmp_path} is neither an adapter directory "
                "(no adapter_config.json) nor a mobizo run directory"
            ),
        ),
    ]
    for argv, message in cases:
        code, out, err = cli(*argv, stdin="a line\n")
        assert code == 2 and out == "", (argv, code, out, err)
        assert error_line(err) == message, argv


def test_predict_refuses_a_run_that_is_not_classification(cli, tmp_path):
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "train.jsonl").write_text(json.dumps({"prompt": "Q: two? A:", "completion": " 2"}) + "\n")
    (tmp_path / "lm" / "validation.jsonl").write_text(json.dumps({"prompt": "Q: one? A:", "completion": " 1"}) + "\n")
    mobizo.train(
        config(task="custom", data=str(tmp_path / "lm"), batch_size=1, steps=1, eval_every=0, out=str(tmp_path / "r"))
    )
    code, out, err = cli("predict", "--run", tmp_path / "r", "--input", "-", stdin="Q: three? A:\n")
    assert (
        code == 2
        and out == ""
        and error_line(err)
        == (
            "mobizo predict ranks the candidates of a classification or multiple-choice task; task custom is lm "
            "(use mobizo generate)"
        )
    )


# ---------------------------------------------------------------- chat


def test_chat_drops_the_oldest_exchanges_to_fit_and_refuses_a_message_too_long(chat_model, capsys, monkeypatch):
    from mobizo.chat import fit, run_chat
    from mobizo.engines.eager import EagerEngine
    from mobizo.generation import SamplingConfig, chat_text
    from mobizo.inference import Generator

    model_dir, _ = chat_model
    model, tok = with_adapter(model_dir.parent / "run" / "best", model_dir)

    def ids(messages):
        return tok(chat_text(tok, messages))["input_ids"]

    convo = [{"role": r, "content": f"{r} says {i}"} for i in range(3) for r in ("user", "assistant")]
    convo.append({"role": "user", "content": "and now?"})
    last = len(ids(convo[-3:]))  # the last exchange and the new message
    kept = list(convo)
    got, dropped = fit(tok, [], kept, 4, last + 4)
    assert dropped == 2 and kept == convo[-3:] and got == ids(convo[-3:])
    kept = list(convo)  # not even the new message fits: the conversation is left as it was
    assert fit(tok, [], kept, 4, 5) == (None, len(ids(convo[-1:]))) and kept == convo

    said = ["the movie", "the plot was good", "word " * 40, "/reset", "the cast"]

    def user(i):
        return {"role": "user", "content": said[i]}

    r1 = naive_greedy(model, tok, ids([user(0)]), 8)[0]
    positions = len(ids([user(1)])) + 8  # the second message fits alone, not after the first exchange
    assert len(ids([user(0), {"role": "assistant", "content": r1}, user(1)])) + 8 > positions
    assert len(ids([user(0)])) + 8 <= positions and len(ids([user(4)])) + 8 <= positions

    class Short(EagerEngine):
        max_positions = positions  # a model of few positions

    lines = iter(said)

    def typed(prompt):
        print(prompt, end="")
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", typed)
    capsys.readouterr()
    gen = Generator(Short(model, None), tok, str(model_dir))
    assert run_chat(gen, SamplingConfig(max_new_tokens=8)) == 0
    out, err = capsys.readouterr()
    r2 = naive_greedy(model, tok, ids([user(1)]), 8)[0]
    r3 = naive_greedy(model, tok, ids([user(4)]), 8)[0]
    assert out == f"> {r1}\n> {r2}\n> > > {r3}\n> \n"
    where = f"the {positions} positions of the model"
    assert err.splitlines()[1:] == [
        f"mobizo: the conversation no longer fits {where}: dropped the oldest 1 exchange(s)",
        (
            f"mobizo: that message does not fit: {len(ids([user(2)]))} tokens with --max-new-tokens 8 go past "
            f"{where} (not sent: shorten it, lower --max-new-tokens or /reset)"
        ),
        "mobizo: conversation reset",
    ]


# ---------------------------------------------------------------- chat in a real pseudo-terminal


def _env():
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def plain(text: str) -> str:
    """Terminal output as text: no carriage returns, no escape sequences (readline's bracketed-paste mode)."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "")


class Terminal:
    """`mobizo ARGV` on a pseudo-terminal (stdin, stdout and stderr all the terminal, as for a user)."""

    def __init__(self, *argv):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: becomes mobizo
            # as a shell starts it: Ctrl-C's SIGINT neither ignored nor blocked, whatever this test process
            # inherited from the tests before it (an ignored or blocked signal survives exec)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            os.execve(sys.executable, [sys.executable, "-m", "mobizo", *map(str, argv)], _env())
        self.seen = ""

    def read_until(self, text: str, timeout: float = 180) -> str:
        """Everything up to and including the next ``text``."""
        end = time.monotonic() + timeout
        while text not in self.seen:
            left = end - time.monotonic()
            assert left > 0, f"no {text!r} in {self.seen!r}"
            if select.select([self.fd], [], [], left)[0]:
                try:
                    chunk = os.read(self.fd, 4096).decode("utf-8", "replace")
                except OSError:  # the child closed the terminal
                    chunk = ""
                if not chunk:
                    assert text in self.seen, f"exited before {text!r}: {self.seen!r}"
                self.seen += chunk
        head, _, self.seen = self.seen.partition(text)
        return head + text

    def send(self, data: str) -> None:
        os.write(self.fd, data.encode())

    def exit_code(self, timeout: float = 120, nudge: str | None = None) -> tuple[int, str]:
        """(exit code, what it wrote); ``nudge``: sent again every 10 s while it has not exited."""
        end, rest = time.monotonic() + timeout, self.seen
        next_nudge = time.monotonic() + 10
        while time.monotonic() < end:
            if nudge is not None and time.monotonic() > next_nudge:
                self.send(nudge)
                next_nudge += 10
            if select.select([self.fd], [], [], 0.2)[0]:
                try:
                    rest += os.read(self.fd, 4096).decode("utf-8", "replace")
                except OSError:
                    pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                while select.select([self.fd], [], [], 0.5)[0]:  # what it wrote just before it exited
                    try:
                        chunk = os.read(self.fd, 4096)
                    except OSError:
                        break
                    if not chunk:
                        break
                    rest += chunk.decode("utf-8", "replace")
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status), rest
        try:  # what the child did with its signals, for the message
            status = Path(f"/proc/{self.pid}/status").read_text()
            signals = " ".join(line for line in status.splitlines() if line.startswith(("SigBlk", "SigIgn", "SigCgt")))
        except OSError:
            signals = "?"
        os.kill(self.pid, 9)
        raise AssertionError(f"mobizo chat did not exit: {rest!r} ({signals})")


@pytest.mark.slow
def test_chat_in_a_terminal(chat_model):
    model_dir, run_dir = chat_model
    model, tok = with_adapter(run_dir / "best", model_dir)
    t = Terminal("chat", "--run", run_dir, "--max-new-tokens", 6, "--system", "be brief")
    banner = t.read_until("> ")
    assert f"mobizo: chat with {model_dir} with adapter {run_dir / 'best'}; /reset starts over" in banner
    t.send("hello\r")
    reply = plain(t.read_until("\r\n> "))  # the echoed line, the streamed reply, the next prompt
    text = "system: be brief\nuser: hello\nassistant:"
    want = naive_greedy(model, tok, tok(text)["input_ids"], 6)[0]
    assert want.strip() and reply == f"hello\n{want}\n> "
    # the second turn sees the first: the whole conversation, rendered with the template
    t.send("and?\r")
    reply = plain(t.read_until("\r\n> "))
    text += f" {want}\nuser: and?\nassistant:"
    assert reply == f"and?\n{naive_greedy(model, tok, tok(text)['input_ids'], 6)[0]}\n> "
    t.send("/reset\r")
    assert "mobizo: conversation reset" in t.read_until("> ")
    t.send("\x04")  # Ctrl-D
    code, rest = t.exit_code()
    assert code == 0 and "error" not in rest


@pytest.mark.slow
def test_chat_ctrl_c_exits_130_with_one_line(chat_model):
    _, run_dir = chat_model
    t = Terminal("chat", "--run", run_dir, "--max-new-tokens", 4, "--no-progress")
    t.read_until("> ")
    t.send("hel")
    t.read_until("hel")  # echoed: readline is reading (a signal before it waits on the terminal would go unseen
    time.sleep(0.5)  # until the next key: a race of the test's speed, not of a user's)
    t.send("\x03")  # Ctrl-C halfway through typing a line
    # on a loaded machine the signal can still beat readline to the terminal, and then waits for the next
    # key: pressed again, as a user would (one interrupt either way: Python folds pending SIGINTs into one)
    code, rest = t.exit_code(nudge="\x03")
    assert code == 130
    lines = rest.replace("\r", "").split("\n")
    # the message stands on a line of its own (the cut input line was ended first), once
    assert [plain(line) for line in lines].count("mobizo: interrupted") == 1 and "Traceback" not in rest


# ---------------------------------------------------------------- the ExecuTorch program


@pytest.fixture(scope="module")
def et_run(tmp_path_factory):
    """A run trained by its ExecuTorch program (exported into RUN/program: the one export of this module)."""
    out = tmp_path_factory.mktemp("et") / "run"
    mobizo.train(config(max_length=48, steps=3, engine="executorch", out=str(out)))
    return out


@pytest.mark.slow
def test_executorch_generates_the_eager_greedy_text(et_run, cli, tmp_path):
    prompts = ["--prompt", PROMPT, "--prompt", "the cast was"]
    code, eager, err = cli("generate", "--run", et_run, *prompts, "--max-new-tokens", 24, "--json")
    assert code == 0, err
    code, et, err = cli(
        "generate", "--run", et_run, *prompts, "--max-new-tokens", 24, "--json", "--engine", "executorch"
    )
    assert code == 0, err
    eager, et = [json.loads(x) for x in eager.splitlines()], [json.loads(x) for x in et.splitlines()]
    assert [r["completion"] for r in et] == [r["completion"] for r in eager] and all(r["tokens"] > 8 for r in et)
    # the adapter is loaded into the program: it generates what the eager model with the adapter does
    model, tok = with_adapter(et_run / "best")
    assert et[0]["completion"] == naive_greedy(model, tok, tok(PROMPT)["input_ids"], 24)[0]
    # the program's positions bound the generation
    code, out, err = cli(
        "generate", "--run", et_run, "--prompt", PROMPT, "--max-new-tokens", 60, "--engine", "executorch"
    )
    assert (
        code == 2
        and out == ""
        and error_line(err)
        == (
            "--max-new-tokens 60 after a 6-token prompt goes past the 48 positions of the program "
            "(use --max-new-tokens 42 or less)"
        )
    )
    # a program without generation methods (an earlier mobizo's) is refused before anything is written
    old = tmp_path / "old"
    shutil.copytree(et_run / "program", old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "generate": False}))
    code, out, err = cli("generate", "--run", et_run, "--program", old, "--engine", "executorch", "--prompt", PROMPT)
    assert (
        code == 2
        and out == ""
        and error_line(err)
        == (
            f"the program in {old} has no generation methods (exported by an earlier mobizo, or this model's "
            "generation could not be traced); re-export it"
        )
    )
