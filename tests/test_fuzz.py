"""Fuzzing with hypothesis: malformed inputs get a clean MobizoError (one line from the CLI), never a
traceback, and whatever is accepted is read correctly (no silent wrong result).

Loaders are fuzzed directly (fast); the CLI in-process through `mobizo.cli.main(argv)` with the model
loading stubbed out (validation runs for real, the training itself is not the target here).
"""

from __future__ import annotations

import collections
import csv
import io
import json
import math
import os
import string
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mobizo.checkpoint import load_checkpoint, read_adapter, read_state, save_adapter, save_checkpoint
from mobizo.errors import MobizoError
from mobizo.tasks.custom import CustomClassification, label_index, render, template_fields
from mobizo.tasks.io import read_records

TRIED: collections.Counter = collections.Counter()
# CI: fixed (derandomized) examples, ~30 s in all. MOBIZO_FUZZ_SCALE=20 for a long, randomized session.
SCALE = float(os.environ.get("MOBIZO_FUZZ_SCALE", "1"))
_common = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=SCALE == 1, database=None)
FAST = settings(max_examples=int(150 * SCALE), **_common)
FEW = settings(max_examples=int(60 * SCALE), **_common)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print(
        "\nfuzz inputs tried: "
        + ", ".join(f"{k} {v}" for k, v in sorted(TRIED.items()))
        + f" (total {sum(TRIED.values())})"
    )


def _tmpdir():
    return tempfile.TemporaryDirectory(prefix="mobizo-fuzz-")


# ---------------------------------------------------------------- data files

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["bad", "good", " good", "1", "0", "2", "-1", "²", "١", "1.0", "True"]),
)
records = st.lists(
    st.dictionaries(
        st.sampled_from(["text", "label", "extra", "Text", ""]),
        st.one_of(scalars, st.lists(scalars, max_size=2)),
        max_size=4,
    ),
    max_size=6,
)


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _csv(rows) -> bytes:
    buf = io.StringIO()
    keys = sorted({k for r in rows for k in r})
    w = csv.writer(buf)
    w.writerow(keys)
    for r in rows:
        w.writerow([r.get(k, "") for k in keys])
    return buf.getvalue().encode()


def _mutate(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for pos, val, kind in edits:
        if kind == "cut":
            del b[pos % (len(b) + 1) :]
        elif not b:
            b.append(val)
        elif kind == "flip":
            b[pos % len(b)] = val
        else:
            b.insert(pos % (len(b) + 1), val)
    return bytes(b)


edits = st.lists(
    st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.sampled_from(["flip", "insert", "cut"])), max_size=3
)


def _expected_example(rec: dict, template: str, words: list[str]):
    """The oracle: what custom-cls must produce for one record (None: it must be an error)."""
    try:
        fields = template_fields(template)
        prompt = render(template, rec, "x")
        idx = label_index(rec["label"], words, "x")
    except (MobizoError, KeyError):
        return None
    return prompt, idx, fields


@FAST
@given(
    rows=records,
    fmt=st.sampled_from([".jsonl", ".json", ".csv"]),
    how=edits,
    raw=st.binary(max_size=64),
    use_raw=st.booleans(),
)
def test_fuzz_data_files(rows, fmt, how, raw, use_raw):
    TRIED["data files"] += 1
    data = raw if use_raw else _mutate(_csv(rows) if fmt == ".csv" else _jsonl(rows), how)
    with _tmpdir() as d:
        path = Path(d) / f"train{fmt}"
        path.write_bytes(data)
        try:
            got = read_records(path, "train")
        except MobizoError as e:
            assert "\n" not in str(e)
            return
        assert got and all(isinstance(r, dict) for r in got)
        if fmt != ".csv" and not how and not use_raw:  # untouched JSONL: exactly the records written
            assert got == json.loads(json.dumps(rows)) or any(
                isinstance(v, float) and math.isnan(v) for r in rows for v in r.values()
            )
        task = CustomClassification(data=str(path), template="Review: {text} Sentiment:", label_words="bad,good")
        try:
            examples = task.load_split("train")
        except MobizoError:
            return
        assert len(examples) == len(got)
        for ex, rec in zip(examples, got):
            expected = _expected_example(rec, task.template, task.words)
            assert expected is not None, f"accepted a record the oracle rejects: {rec!r}"
            assert (ex.prompt, ex.label) == expected[:2]
            assert ex.candidates == [" bad", " good"]


@FAST
@given(
    template=st.text(max_size=30)
    | st.sampled_from(
        [
            "{text}",
            "{text!r}",
            "{text:>{w}}",
            "{0}",
            "{}",
            "{text.x}",
            "{text[0]}",
            "{text:d}",
            "{{text}}",
            "a {label} {text}",
        ]
    ),
    words=st.text(max_size=20) | st.sampled_from(["bad,good", "a,a", "x", ",", "no, yes ,maybe", "\ud800,b"]),
    rec=st.dictionaries(st.sampled_from(["text", "label", "w"]), scalars, max_size=3),
)
def test_fuzz_templates_and_label_words(template, words, rec):
    TRIED["templates/label words"] += 1
    try:
        task = CustomClassification(data="unused", template=template, label_words=words)
    except MobizoError as e:
        assert "\n" not in str(e)
        return
    # accepted: fields are plain names and label words are non-empty, distinct, valid text
    assert all(f.isidentifier() for f in template_fields(task.template))
    assert (
        len(task.words) >= 2
        and len(set(task.words)) == len(task.words)
        and all(w.strip() == w and w for w in task.words)
    )
    for w in task.words:
        w.encode("utf-8")
    try:
        prompt = render(task.template, rec, "rec")
    except MobizoError:
        return
    prompt.encode("utf-8")
    for f in template_fields(task.template):
        assert rec[f] is not None and not isinstance(rec[f], (list, dict))
    try:
        idx = label_index(rec.get("label"), task.words, "rec")
    except MobizoError:
        return
    assert 0 <= idx < len(task.words)


@pytest.fixture(scope="module")
def encoder():
    from mobizo.data import Encoder
    from mobizo.models import tiny_tokenizer

    return Encoder(tiny_tokenizer())


@FAST
@given(prompt=st.text(max_size=40), answer=st.text(max_size=10))
def test_fuzz_encoder(encoder, prompt, answer):
    TRIED["prompt/answer texts"] += 1
    try:
        enc = encoder(prompt, answer)
    except MobizoError:
        return
    assert enc.prompt_ids and enc.answer_ids


# ---------------------------------------------------------------- adapters and checkpoints


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapter") / "a"
    g = torch.Generator().manual_seed(0)
    state = {
        f"model.layers.{i}.q_proj.lora_{w}": torch.randn(*((4, 16) if w == "A" else (16, 4)), generator=g)
        for i in range(2)
        for w in "AB"
    }
    save_adapter(d, state, 4, 8.0, "tiny")
    return d, state


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 2**70) | st.floats() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=8,
)


@FAST
@given(
    changes=st.dictionaries(
        st.sampled_from(
            [
                "r",
                "lora_alpha",
                "peft_type",
                "use_rslora",
                "use_dora",
                "rank_pattern",
                "bias",
                "target_modules",
                "fan_in_fan_out",
            ]
        ),
        json_values,
        max_size=3,
    ),
    drop=st.lists(st.sampled_from(["r", "lora_alpha", "peft_type"]), max_size=2),
    as_raw=st.booleans(),
    raw=st.binary(max_size=40),
)
def test_fuzz_adapter_config(adapter_dir, changes, drop, as_raw, raw):
    TRIED["adapter configs"] += 1
    src, state = adapter_dir
    with _tmpdir() as d:
        d = Path(d)
        (d / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
        cfg = json.loads((src / "adapter_config.json").read_text())
        cfg.update(changes)
        for k in drop:
            cfg.pop(k, None)
        (d / "adapter_config.json").write_bytes(raw if as_raw else json.dumps(cfg).encode())
        try:
            got, config = read_adapter(d)
        except MobizoError as e:
            assert "\n" not in str(e)
            return
        # accepted: it is the same plain-LoRA adapter, rank and alpha as saved
        assert int(config["r"]) == 4 and float(config["lora_alpha"]) == 8.0
        assert not config.get("use_rslora") and not config.get("use_dora") and not config.get("rank_pattern")
        assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


@FAST
@given(how=edits.filter(bool), raw=st.binary(max_size=200), use_raw=st.booleans())
def test_fuzz_adapter_weights(adapter_dir, how, raw, use_raw):
    TRIED["adapter safetensors"] += 1
    src, state = adapter_dir
    with _tmpdir() as d:
        d = Path(d)
        (d / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
        data = (src / "adapter_model.safetensors").read_bytes()
        (d / "adapter_model.safetensors").write_bytes(raw if use_raw else _mutate(data, how))
        try:
            got, _ = read_adapter(d)
        except MobizoError as e:
            assert "\n" not in str(e)
            return
        # accepted despite the change (e.g. a byte of header padding): the tensors are exactly right
        assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


@FAST
@given(
    state=json_values
    | st.dictionaries(
        st.sampled_from(["step", "config", "skipped_steps", "settings", "last_loss"]), json_values, max_size=5
    )
)
def test_fuzz_checkpoint_state(tmp_path_factory, state):
    TRIED["checkpoint state.json"] += 1
    with _tmpdir() as d:
        d = Path(d)
        try:
            text = json.dumps(state)
        except ValueError:
            return
        (d / "state.json").write_text(text)
        try:
            got = read_state(d, require_checksum=False)  # the schema checks behind the checksum
        except MobizoError as e:
            assert "\n" not in str(e)
            return
        assert isinstance(got["step"], int) and got["step"] >= 0 and isinstance(got.get("config", {}), dict)


@FEW
@given(how=edits.filter(bool), which=st.sampled_from(["state.json", "adapter_model.safetensors", "optimizer.pt"]))
def test_fuzz_checkpoint_files(adapter_dir, how, which):
    """A damaged file in a checkpoint: a clear error, or (harmless change) exactly the saved content."""
    TRIED["checkpoint files"] += 1
    _, state = adapter_dir
    opt = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(4)}},
        "param_groups": [{"lr": 0.1, "params": [0]}],
    }
    with _tmpdir() as d:
        ck = Path(d) / "checkpoint"
        save_checkpoint(ck, state, 4, 8.0, "tiny", {"step": 5, "config": {"seed": 1}, "skipped_steps": 1}, opt)
        f = ck / which
        f.write_bytes(_mutate(f.read_bytes(), how))
        try:
            adapter, _, st_, optimizer = load_checkpoint(ck)
        except MobizoError as e:
            assert "\n" not in str(e)
            return
        assert all(torch.equal(adapter[k], state[k]) for k in state) and adapter.keys() == state.keys()
        assert st_["step"] == 5 and st_["config"] == {"seed": 1}
        assert torch.equal(optimizer["state"][0]["exp_avg"], torch.ones(4))


@FAST
@given(
    lines=st.lists(
        st.one_of(
            json_values.map(json.dumps),
            st.text(max_size=30),
            st.fixed_dictionaries(
                {
                    "step": st.integers(-1, 4),
                    "projected_grads": st.lists(st.floats(), max_size=3),
                    "lr": st.floats(),
                    "skipped": json_values,
                }
            ).map(json.dumps),
        ),
        max_size=5,
    ),
    header=st.booleans(),
)
def test_fuzz_metrics_log(lines, header):
    from mobizo.replay import read_log

    TRIED["metrics logs"] += 1
    head = json.dumps({"mobizo_log": 1, "config": {"estimator": "prge", "queries": 2}, "layers": []})
    with _tmpdir() as d:
        path = Path(d) / "metrics.jsonl"
        path.write_text("\n".join(([head] if header else []) + lines) + "\n")
        try:
            _, recs = read_log(path)
        except MobizoError as e:
            assert "\n" not in str(e)
            return
        assert [r["step"] for r in recs] == list(range(1, len(recs) + 1))
        for r in recs:
            assert len(r["projected_grads"]) == 2
            if not r.get("skipped"):
                assert all(math.isfinite(g) for g in r["projected_grads"]) and r["lr"] > 0


# ---------------------------------------------------------------- the command line


class Accepted(BaseException):
    """Raised by the stubs: the arguments passed validation and mobizo would now load the model."""


NUMS = st.sampled_from(
    ["0", "1", "-1", "3", "2.5", "nan", "inf", "-inf", "1e309", "abc", "", "1e-3", "99999999999999999999999"]
)
FLAGS = {
    "train": [
        "--model",
        "--task",
        "--data",
        "--template",
        "--label-words",
        "--max-length",
        "--truncation",
        "--eval-examples",
        "--eval-batch-size",
        "--rank",
        "--alpha",
        "--target-modules",
        "--estimator",
        "--queries",
        "--batch-size",
        "--data-mode",
        "--lr",
        "--eps",
        "--weight-decay",
        "--max-grad",
        "--max-bad-steps",
        "--steps",
        "--seed",
        "--optimizer",
        "--train-examples",
        "--eval-every",
        "--save-every",
        "--engine",
        "--out",
    ],
    "eval": [
        "--model",
        "--task",
        "--data",
        "--template",
        "--label-words",
        "--max-length",
        "--eval-examples",
        "--adapter",
        "--seed",
        "--json",
    ],
    "replay": ["--log", "--out", "--model", "--steps"],
}
SWITCHES = ["--resume", "--overwrite", "--no-progress", "--train-a", "--trust-remote-code", "--bogus", "-q"]
WORDS = st.sampled_from(
    [
        "tiny",
        "synthetic",
        "custom-cls",
        "prge",
        "mezo",
        "fo",
        "sgd",
        "eager",
        "executorch",
        "left",
        "data.jsonl",
        "bad.csv",
        "missing",
        "run",
        "file.txt",
        "file.txt/sub",
        "{text}",
        "bad,good",
        "q_proj",
        "(",
        "adapter",
        "metrics.jsonl",
        "x\ud800",
    ]
) | st.text(max_size=8)


@st.composite
def argvs(draw):
    cmd = draw(st.sampled_from(sorted(FLAGS)))
    argv = [cmd]
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.integers(0, 4)) == 0:
            argv.append(draw(st.sampled_from(SWITCHES)))
        else:
            argv += [draw(st.sampled_from(FLAGS[cmd])), draw(NUMS | WORDS)]
    return argv


@pytest.fixture(scope="module")
def cli_sandbox(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "data.jsonl").write_text('{"text": "nice", "label": 1}\n{"text": "meh", "label": "bad"}\n')
    (d / "bad.csv").write_bytes(b"text,label\n\xff\xfe,1\n")
    (d / "file.txt").write_text("x")
    (d / "metrics.jsonl").write_text(
        json.dumps({"mobizo_log": 1, "config": {"estimator": "prge", "queries": 2}, "layers": []}) + "\n"
    )
    return d


@FAST
@given(argv=argvs())
def test_fuzz_cli(cli_sandbox, argv, monkeypatch_module, capsys):
    TRIED["CLI argument lists"] += 1
    from mobizo.cli import main

    os.chdir(cli_sandbox)
    capsys.readouterr()
    try:
        rc = main(argv)
    except Accepted:
        return  # valid input, about to load the model
    except SystemExit as e:  # argparse: usage errors (exit 2), --help / --version (exit 0)
        assert e.code in (0, 2)
        return
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, (argv, err)
    assert rc == 2 and len([x for x in err.splitlines() if x.startswith("mobizo: error:")]) == 1, (argv, rc, err)


@pytest.fixture(scope="module")
def monkeypatch_module():
    import mobizo.build
    import mobizo.models
    import mobizo.trainer

    mp = pytest.MonkeyPatch()

    def stop(*a, **k):
        raise Accepted()

    def assemble(cfg, need_train=True, **objects):
        cfg = cfg.validate().resolved()
        task = mobizo.build.load_task(cfg)
        task.load("validation", cfg.data.eval_examples, cfg.seed)
        # what was accepted is sane
        o = cfg.optim
        assert (
            o.steps >= 1 and o.lr > 0 and math.isfinite(o.lr) and o.eps > 0 and (o.max_grad is None or o.max_grad > 0)
        )
        assert math.isfinite(o.weight_decay) and o.weight_decay >= 0 and o.queries >= 1 and cfg.adapter.rank >= 1
        raise Accepted()

    mp.setattr(mobizo.models, "load_model", stop)
    mp.setattr(mobizo.build, "assemble", assemble)
    mp.setattr(mobizo.trainer, "assemble", assemble)
    cwd = os.getcwd()
    yield mp
    mp.undo()
    os.chdir(cwd)


@FEW
@given(
    targets=st.lists(
        st.text(alphabet=string.ascii_letters + "._*()[]|\\?+{}0123456789", max_size=12), min_size=1, max_size=3
    )
)
def test_fuzz_target_modules(targets):
    from mobizo.models import build_tiny
    from mobizo.mplora import inject

    TRIED["--target-modules patterns"] += 1
    model, _ = build_tiny()
    try:
        names = inject(model, targets, 2, 4.0, 0)
    except MobizoError as e:
        assert "\n" not in str(e)
        return
    assert names and all(isinstance(model.get_submodule(n).base, torch.nn.Linear) for n in names)
