"""Text on the device: `mobizo-train generate` and `mobizo-train BUNDLE --data FILE.jsonl` with the C++
tokenizer library (pytorch-tokenizers), against the Python tokenizer, generation loop and trainer.

The binary is built once with the tokenizer library (the library itself once per machine: minutes on 2
cores, cached); each bundle is one export (~1 min).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mobizo.config import TrainConfig
from mobizo.tasks.synthetic import _review, make_split

pytestmark = pytest.mark.slow

STEPS = 12
TEMPLATE = "Review: {text} Sentiment:"


@pytest.fixture(scope="module")
def common(tiny_flags):
    """The tiny run on custom records: each bundle sets its own length, eval batches keep TrainConfig's
    default size, and a checkpoint every 5 steps."""
    return tiny_flags(task="custom", max_length=None, eval_batch_size=None, eval_examples=8, save_every=5)


@pytest.fixture(scope="module")
def binary():
    from mobizo.native import build, has_tokenizer

    exe = build()
    assert has_tokenizer(exe)
    return exe


def write_split(d: Path, split: str, rows: list[dict]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{split}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cls_rows(n: int, seed: int) -> list[dict]:
    """Reviews of the synthetic task as custom-cls records, their labels in every form parse_label takes."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        y = rng.randint(0, 1)
        label = [["bad", "good"][y], ["Bad", "GOOD"][y], y, str(y), bool(y)][i % 5]
        rows.append({"text": _review(rng, y), "label": label, "id": i})
    return rows


@pytest.fixture(scope="module")
def cls_bundle(tmp_path_factory, binary, common):
    """custom-cls with one-token label words (the shared-prompt layout), T = 48 (two prefill chunks of 32)."""
    from mobizo.bundle import make_bundle

    d = tmp_path_factory.mktemp("cls")
    write_split(d / "data", "train", cls_rows(10, 0))
    write_split(d / "data", "validation", cls_rows(8, 1))
    cfg = TrainConfig.from_flat(
        **common,
        data=str(d / "data"),
        template=TEMPLATE,
        label_words="bad,good",
        max_length=48,
        steps=STEPS,
    )
    return make_bundle(cfg, d / "bundle")


def native(binary, *args, stdin=None):
    return subprocess.run(
        [str(binary), *map(str, args)], capture_output=True, text=True, input=stdin, timeout=600, check=False
    )


def one_line_error(p) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mobizo-train: error: "), p.stderr
    return lines[0][len("mobizo-train: error: ") :]


@pytest.fixture(scope="module")
def cls_run(binary, cls_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("clsrun") / "run"
    p = native(binary, cls_bundle, "--out", out, "--quiet")
    assert p.returncode == 0, p.stderr
    return out


def trajectory(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()[1:]
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


# ---------------------------------------------------------------- the tokenizer


def test_tokenizer_ids_equal_python_on_the_synthetic_task(binary, cls_bundle):
    """Every (prompt, label word) of the synthetic task: the device's ids (pytorch-tokenizers over the
    bundle's tokenizer.json, mobizo.data.Encoder's split) and decoded text equal the Python tokenizer's;
    also for texts with runs of spaces, newlines, digits, contractions, non-ASCII and a special token."""
    from mobizo.data import Encoder
    from mobizo.models import tiny_tokenizer

    tok = tiny_tokenizer()
    enc = Encoder(tok)
    pairs = [(e.prompt, c) for e in make_split("train", 300) + make_split("validation", 100) for c in e.candidates]
    odd = [
        "  two  leading spaces",
        "tabs\tand\nnewlines\n\n",
        "digits 12345 and 3.14",
        "it's, they're, we'll",
        "café naïve 東京 🙂",
        "a <s> inside",
        "trailing space ",
    ]
    pairs += [(t, " good") for t in odd] + [(t, "\nYes") for t in odd]
    lines = "".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in pairs)
    lines += "".join(json.dumps({"prompt": t}) + "\n" for t in odd)
    p = native(binary, "tokenize", cls_bundle, "--input", "-", stdin=lines)
    assert p.returncode == 0, p.stderr
    got = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(got) == len(pairs) + len(odd)
    for (prompt, answer), have in zip(pairs, got):
        e = enc(prompt, answer)
        assert (have["prompt_ids"], have["answer_ids"]) == (e.prompt_ids, e.answer_ids), (prompt, answer)
        assert have["text"] == tok.decode(e.prompt_ids + e.answer_ids, skip_special_tokens=True)
    for text, have in zip(odd, got[len(pairs) :]):
        assert have["prompt_ids"] == enc.prompt_ids(text) and have["answer_ids"] == []
    spec = json.loads((cls_bundle / "run.json").read_text())["text"]
    assert spec["tokenizer"]["prefix"] == [tok.bos_token_id] and spec["tokenizer"]["suffix"] == []
    assert spec["checked"]["texts"] == 18 * 2  # every train + validation (prompt, candidate), checked at bundle time


def test_a_tokenizer_the_library_reads_otherwise_refuses_the_bundle(binary, cls_bundle, tmp_path, monkeypatch, common):
    """A tokenizer feature the C++ library does not have (here a Lowercase normalizer, which it skips) makes
    its ids differ on the bundle's own texts: `mobizo bundle` refuses with one line, and writes nothing."""
    from tokenizers import normalizers

    import mobizo.models
    from mobizo.bundle import make_bundle
    from mobizo.errors import MobizoError

    plain = mobizo.models.tiny_tokenizer

    def lowercasing():
        tok = plain()
        tok.backend_tokenizer.normalizer = normalizers.Lowercase()
        return tok

    monkeypatch.setattr(mobizo.models, "tiny_tokenizer", lowercasing)
    cfg = TrainConfig.from_flat(
        **common,
        data=str(cls_bundle.parent / "data"),
        template=TEMPLATE,
        label_words="bad,good",
        max_length=48,
        steps=STEPS,
    )
    out = tmp_path / "bundle"
    with pytest.raises(MobizoError) as e:
        make_bundle(cfg, out, program=cls_bundle)  # the program fits: no export
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(
        "the native tokenizer (pytorch-tokenizers 1.0.1) reads tiny's tokenizer otherwise than the Python one: "
        "prompt 'Review: "
    )
    assert msg.endswith("(mobizo bundle --no-tokenizer writes the bundle without text on the device)")
    assert not out.exists()


# ---------------------------------------------------------------- generation


def python_generate(run_dir: Path, bundle: Path, engine: str, prompts: list[str], **sampling):
    """(ids, text) per prompt from mobizo.generation.stream: the eager model or the ExecuTorch program with the
    native run's adapter."""
    from mobizo.api import _generator, _sampling
    from mobizo.generation import stream
    from mobizo.inference import prompt_token_ids

    cfg = _sampling(sampling.get("max_new_tokens", 128), 0.0, 1.0, 0, sampling.get("stop"))
    gen = _generator(run_dir, None, None, None, None, engine, bundle if engine == "executorch" else None, {})
    out = []
    for ids in prompt_token_ids(gen, prompts, None, cfg.max_new_tokens):
        tokens: list[int] = []
        text = "".join(stream(gen.engine, gen.tokenizer, ids, cfg, tokens))
        out.append((tokens, text))
    return out


PROMPTS = [
    "Review: the movie was great Sentiment:",
    (
        "Review: the plot was really dull and the acting was weak and the ending was so sad and the music was "
        "poor and the cast was bad and the story was boring Sentiment:"
    ),  # > 32 tokens: two prefill chunks
]


def test_greedy_generation_equals_python_eager_and_executorch(binary, cls_bundle, cls_run):
    """Greedy tokens and text of `mobizo-train generate RUN` (the run's final adapter, the prompt tokenized on
    the device) equal mobizo.generation.stream on the eager model and on the Python ExecuTorch engine."""
    from mobizo.models import tiny_tokenizer

    tok = tiny_tokenizer()
    n_prompt = [len(tok(p)["input_ids"]) for p in PROMPTS]
    assert n_prompt[1] > 32  # the prefill runs in chunks of 32
    new = 48 - max(n_prompt)
    p = native(
        binary, "generate", cls_run, *[a for x in PROMPTS for a in ("--prompt", x)], "--max-new-tokens", new, "--json"
    )
    assert p.returncode == 0, p.stderr
    got = [json.loads(line) for line in p.stdout.splitlines()]
    assert [g["prompt_tokens"] for g in got] == n_prompt
    eager = python_generate(cls_run, cls_bundle, "eager", PROMPTS, max_new_tokens=new)
    et = python_generate(cls_run, cls_bundle, "executorch", PROMPTS, max_new_tokens=new)
    for g, (e_ids, e_text), (x_ids, x_text) in zip(got, eager, et, strict=True):
        assert g["ids"] == x_ids == e_ids
        assert g["completion"] == x_text == e_text
        assert g["finish"] == ("eos" if len(g["ids"]) < new else "length") and g["tokens"] == len(g["ids"])
        assert len(g["ids"]) >= 4  # (the trained tiny model writes text, not an immediate EOS)
    # one thread (no thread pool: XNNPACK and the kernels on the calling thread) decodes the same tokens
    one = native(binary, "generate", cls_run, "--prompt", PROMPTS[1], "--max-new-tokens", new, "--json", "--threads", 1)
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["ids"] == got[1]["ids"]
    # the base model (a bare bundle: B = 0) continues differently from the trained adapter
    base = native(binary, "generate", cls_bundle, "--prompt", PROMPTS[0], "--max-new-tokens", new, "--json")
    assert base.returncode == 0, base.stderr
    assert json.loads(base.stdout)["ids"] != got[0]["ids"]


def test_streamed_output_equals_mobizo_generate(binary, cls_bundle, cls_run, run_cli):
    """stdout of `mobizo-train generate` with several prompts and a stop string is byte for byte what
    `mobizo generate --engine executorch` writes (headers, held-back stop text, newlines)."""
    import contextlib
    import io

    args = ["--prompt", PROMPTS[0], "--prompt", "Review: the film was", "--max-new-tokens", 12, "--stop", "the"]
    p = native(binary, "generate", cls_run, *args)
    assert p.returncode == 0, p.stderr
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code, err = run_cli(["generate", "--run", cls_run, "--engine", "executorch", "--program", cls_bundle, *args])
    assert code == 0, err
    assert p.stdout == out.getvalue()
    assert p.stdout.startswith("==> prompt 1 <==\n")


def test_sampling_is_reproducible_with_a_seed(binary, cls_run):
    def sample(seed, top_p=0.9):
        p = native(
            binary,
            *("generate", cls_run, "--prompt", PROMPTS[0], "--max-new-tokens", 16, "--temperature", 1.0),
            *("--top-p", top_p, "--seed", seed, "--json"),
        )
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)["ids"]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(1, top_p=1e-9) == sample(2, top_p=1e-9)  # a nucleus of one token: greedy


# ---------------------------------------------------------------- training on new records


def mc_rows(n: int, seed: int) -> list[dict]:
    """custom-mc records with 2 or 3 multi-token choices (per-candidate rows, filler rows for 2)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.choice([2, 3])
        choices = [f"{rng.randint(2, 99)} red apples and {j} pears" for j in range(k)]
        a = rng.randrange(k)
        rows.append(
            {"question": f"how many apples in basket {i}?", "choices": choices, "answer": [a, choices[a]][i % 2]}
        )
    return rows


def pc_rows(n: int, seed: int) -> list[dict]:
    """prompt/completion records, one prompt past --max-length (cut from the left) and spaces at the seam."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = " ".join(rng.choice(["good", "bad", "movie", "plot", "the"]) for _ in range(rng.randint(3, 9)))
        prompt = f"Summarize: {words}" + (" and more" * 12 if i == 3 else "") + (" " if i % 3 == 0 else "")
        rows.append({"prompt": prompt, "completion": f" {rng.choice(['fine', 'great', 'awful'])} review"})
    return rows


@pytest.mark.parametrize("kind", ["classification", "multiple_choice", "prompt_completion"])
def test_training_on_a_jsonl_equals_the_same_data_bundled_in_python(kind, binary, cls_bundle, tmp_path, common):
    """`mobizo-train BUNDLE --data train.jsonl` (records tokenized and collated on the device, batches in
    mobizo.data.step_indices' order for their number, over several epochs) trains bit for bit as the bundle
    that `mobizo bundle` wrote from the same file: the same losses, projected gradients and adapter."""
    from mobizo.bundle import make_bundle

    if kind == "classification":
        bundle = cls_bundle
        data = write_split(tmp_path / "new", "train", cls_rows(10, 0))
    else:
        rows, flat = (
            (mc_rows, dict(max_length=40))
            if kind == "multiple_choice"
            else (pc_rows, dict(max_length=24, batch_size=3))
        )
        data = write_split(tmp_path / "data", "train", rows(11, 5))
        write_split(tmp_path / "data", "validation", rows(6, 6))
        cfg = TrainConfig.from_flat(**{**common, **flat}, data=str(tmp_path / "data"), steps=STEPS)
        bundle = make_bundle(cfg, tmp_path / "bundle")
    spec = json.loads((bundle / "run.json").read_text())["text"]["data"]
    assert spec["records"] == kind
    ref, new = tmp_path / "ref", tmp_path / "new_run"
    p = native(binary, bundle, "--out", ref, "--quiet")
    assert p.returncode == 0, p.stderr
    p = native(binary, bundle, "--out", new, "--data", data, "--quiet")
    assert p.returncode == 0, p.stderr
    if kind == "prompt_completion":  # the long prompt is cut from the left, with a warning, as in Python
        assert "1 of 11 --data examples exceed --max-length 24" in p.stderr
    assert trajectory(new) == trajectory(ref)
    assert (new / "adapter" / "adapter_model.safetensors").read_bytes() == (
        ref / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    summary = json.loads((new / "summary.json").read_text())
    assert summary["data"]["examples"] == (10 if kind == "classification" else 11)
    assert summary["bundle"]["path"] == str(Path(bundle).resolve())


def test_data_resume_needs_the_same_file(binary, cls_bundle, tmp_path):
    data = write_split(tmp_path, "train", cls_rows(10, 0))
    other = write_split(tmp_path / "o", "train", cls_rows(9, 4))
    out = tmp_path / "run"
    assert native(binary, cls_bundle, "--out", out, "--data", data, "--steps", 5, "--quiet").returncode == 0
    msg = one_line_error(native(binary, cls_bundle, "--out", out, "--data", other, "--resume", "--quiet"))
    assert "trained on --data" in msg and "not on this --data file" in msg
    msg = one_line_error(native(binary, cls_bundle, "--out", out, "--resume", "--quiet"))
    assert msg.endswith("give the same --data")
    p = native(binary, cls_bundle, "--out", out, "--data", data, "--resume", "--quiet")
    assert p.returncode == 0, p.stderr
    uninterrupted = tmp_path / "whole"
    assert native(binary, cls_bundle, "--out", uninterrupted, "--data", data, "--quiet").returncode == 0
    assert trajectory(out) == trajectory(uninterrupted)


# ---------------------------------------------------------------- bad input: one line, exit 2


def test_bad_prompts_and_lengths(binary, cls_run):
    long = "Review: " + "the movie was good and " * 12 + "Sentiment:"
    msg = one_line_error(native(binary, "generate", cls_run, "--prompt", long))
    assert msg.startswith("the prompt is ") and msg.endswith(
        "the program holds 48 positions: it leaves no room to generate"
    )
    from mobizo.models import tiny_tokenizer

    n = len(tiny_tokenizer()(PROMPTS[0])["input_ids"])
    msg = one_line_error(
        native(binary, "generate", cls_run, "--prompt", PROMPTS[0], "--prompt", "hi", "--max-new-tokens", 40)
    )
    assert msg == (
        f"prompt 1: --max-new-tokens 40 after a {n}-token prompt goes past the 48 positions of the program "
        f"(use --max-new-tokens {48 - n} or less)"
    )
    for args, want in [
        (["--max-new-tokens", 0], "--max-new-tokens must be an integer >= 1, got 0"),
        (["--temperature", -1], "--temperature must be a finite number >= 0, got -1.0"),
        (["--top-p", 0], "--top-p must be in (0, 1], got 0.0"),
        (["--stop", ""], "--stop strings must not be empty"),
        ([], "nothing to generate from: give --prompt TEXT or --input FILE"),
    ]:
        assert one_line_error(native(binary, "generate", cls_run, *args)) == want
    assert p_ok(native(binary, "generate", cls_run, "--input", "-", "--max-new-tokens", 4, stdin="\n  \nhello\n"))
    msg = one_line_error(native(binary, "generate", cls_run, "--input", "-", stdin='{"text": "x"}\n'))
    assert msg == '<stdin>:1: no "prompt" field (a non-empty string)'


def p_ok(p) -> bool:
    assert p.returncode == 0, p.stderr
    return True


def test_bundles_without_generation_or_tokenizer_are_refused(binary, cls_bundle, cls_run, tmp_path):
    from mobizo.bundle import BundleData, read_bundle, write_bundle

    old = tmp_path / "old"  # a program exported before prefill/decode existed
    shutil.copytree(cls_bundle, old)
    m = json.loads((old / "manifest.json").read_text())
    m["generate"] = False
    (old / "manifest.json").write_text(json.dumps(m))
    msg = one_line_error(native(binary, "generate", old, "--prompt", "hi"))
    assert msg == (
        f"the program in {old} has no generation methods (exported by an earlier mobizo, or this model's "
        "generation could not be traced); re-export it"
    )
    b = read_bundle(cls_bundle)  # a bundle written without the tokenizer (mobizo bundle --no-tokenizer)
    run = b.run
    bare = write_bundle(
        tmp_path / "bare",
        cls_bundle,
        BundleData(*(b.arrays[k] for k in ("input_ids", "attention_mask", "labels", "real_rows", "gold"))),
        b.arrays["batches"],
        lr=run["lr"],
        eps=run["eps"],
        log_header=json.loads(run["log_header"]),
        adapter_config=run["adapter"]["config"],
        adapter_metadata=run["adapter"]["metadata"],
    )
    msg = one_line_error(native(binary, "generate", bare, "--prompt", "hi"))
    assert "carries no tokenizer" in msg
    data = write_split(tmp_path, "train", cls_rows(6, 0))
    assert "carries no tokenizer" in one_line_error(native(binary, bare, "--out", tmp_path / "r", "--data", data))
    # a run directory names its bundle (state.json): moved away, it is one line saying so
    state = json.loads((cls_run / "checkpoint" / "state.json").read_text())
    assert state["bundle"] == {"path": str(cls_bundle.resolve()), "pte_sha256": m["pte_sha256"]}
    gone = tmp_path / "gone"
    shutil.copytree(cls_bundle, gone)
    assert native(binary, gone, "--out", tmp_path / "short", "--steps", 1, "--quiet").returncode == 0
    shutil.rmtree(gone)
    msg = one_line_error(native(binary, "generate", tmp_path / "short", "--prompt", "hi"))
    assert msg.startswith(f"the bundle {tmp_path / 'short'} was trained on, {gone}, is missing (moved?)")
    assert "is neither a bundle" in one_line_error(native(binary, "generate", tmp_path, "--prompt", "hi"))


def test_a_binary_without_the_tokenizer_library_says_so(cls_bundle, tmp_path):
    from mobizo.native import build, has_tokenizer

    plain = build(tokenizer=False)
    assert not has_tokenizer(plain)
    msg = one_line_error(native(plain, "generate", cls_bundle, "--prompt", "hi"))
    assert msg.startswith("this mobizo-train was built without the tokenizer library (pytorch-tokenizers)")
    assert native(plain, cls_bundle, "--out", tmp_path / "run", "--steps", 2, "--quiet").returncode == 0


def test_format_1_bundle_still_trains(binary, cls_bundle, cls_run, tmp_path):
    old = tmp_path / "v1"
    shutil.copytree(cls_bundle, old)
    run = json.loads((old / "run.json").read_text())
    run["mobizo_bundle"] = 1
    del run["text"]
    (old / "run.json").write_text(json.dumps(run))
    (old / "tokenizer.json").unlink()
    out = tmp_path / "out"
    assert native(binary, old, "--out", out, "--quiet").returncode == 0
    assert trajectory(out) == trajectory(cls_run)


@pytest.mark.parametrize(
    "record, want",
    [
        ({"text": "fine"}, "record 3: missing 'label' field"),
        ({"label": "good"}, "record 3: no field 'text' required by the template (fields: label)"),
        ({"text": None, "label": 1}, "record 3: field 'text' is empty (null), expected text"),
        (
            {"text": "x", "label": "meh"},
            "record 3: label 'meh' is not one of the label words ['bad', 'good'] (nor a class index)",
        ),
        ({"text": "x", "label": 2}, "record 3: label 2 is out of range for 2 label words ['bad', 'good']"),
        (
            {"text": "x", "label": -1},
            "record 3: label -1 means 'no label' (an unlabelled test split?); use a labelled split",
        ),
        ("[1, 2]", "record 3 is list, expected a JSON object"),
        ("{broken", ":3: malformed JSON line"),
    ],
)
def test_bad_records_are_one_line(record, want, binary, cls_bundle, tmp_path):
    rows = [json.dumps(r) for r in cls_rows(2, 0)] + [record if isinstance(record, str) else json.dumps(record)]
    path = tmp_path / "new.jsonl"
    path.write_text("\n".join(rows) + "\n")
    msg = one_line_error(native(binary, cls_bundle, "--out", tmp_path / "run", "--data", path, "--quiet"))
    assert want in msg and msg.startswith(str(path)), msg
    assert not (tmp_path / "run").exists()  # checked before anything is written


def test_python_random_order_matches_step_indices(binary, cls_bundle, tmp_path):
    """The order on its own: 13 records, batch 4 (epoch boundaries inside batches): the device's run equals
    a bundle written here from the records collated in Python and batches.bin = mobizo.data.step_indices."""
    from mobizo.data import step_indices

    rows = [{"text": "good " * (i + 1), "label": i % 2} for i in range(13)]
    data = write_split(tmp_path, "train", rows)
    out = tmp_path / "run"
    p = native(binary, cls_bundle, "--out", out, "--data", data, "--steps", STEPS, "--quiet")
    assert p.returncode == 0, p.stderr
    # the same records bundled in Python, in step_indices' order, train identically (steps 1..STEPS)
    from mobizo.bundle import BundleData, read_bundle, write_bundle
    from mobizo.data import Encoder, collate_choices
    from mobizo.models import tiny_tokenizer

    tok = tiny_tokenizer()
    enc = Encoder(tok)
    b = read_bundle(cls_bundle)
    ids, masks, labels, gold = [], [], [], []
    for r in rows:
        prompt = TEMPLATE.format(text=r["text"])
        batch = collate_choices(
            [[enc(prompt, " bad"), enc(prompt, " good")]], [r["label"]], 2, tok.pad_token_id, 48, 48, 1, 1
        )
        ids.append(batch.input_ids), masks.append(batch.attention_mask), labels.append(batch.labels)
        gold.append(r["label"])
    order = torch.tensor([step_indices(13, 4, s, 3) for s in range(1, STEPS + 1)], dtype=torch.int32)
    run = b.run
    ref = write_bundle(
        tmp_path / "ref_bundle",
        cls_bundle,
        BundleData(
            torch.stack(ids),
            torch.stack(masks),
            torch.stack(labels),
            torch.ones(13, dtype=torch.long),
            torch.tensor(gold),
        ),
        order,
        lr=run["lr"],
        eps=run["eps"],
        log_header=json.loads(run["log_header"]),
        adapter_config=run["adapter"]["config"],
        adapter_metadata=run["adapter"]["metadata"],
    )
    p = native(binary, ref, "--out", tmp_path / "ref", "--quiet")
    assert p.returncode == 0, p.stderr
    assert trajectory(out) == trajectory(tmp_path / "ref")
