"""The benchmark suite from fixture files in Hugging Face layouts: train + eval end to end for every task,
plus the metrics on hand-checkable cases and the bad-input errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mobizo import models
from mobizo.cli import main
from mobizo.config import TrainConfig
from mobizo.data import Encoder, collate
from mobizo.errors import MobizoError
from mobizo.evaluation import evaluate, score_pairs
from mobizo.tasks import get_task
from mobizo.trainer import train

_TOKENIZER = None


@pytest.fixture(scope="module", autouse=True)
def cached_tiny_tokenizer():
    """Training the tiny BPE tokenizer costs ~1 s; every run in this module shares one."""
    global _TOKENIZER
    real = models.tiny_tokenizer
    if _TOKENIZER is None:
        _TOKENIZER = real()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "tiny_tokenizer", lambda: _TOKENIZER)
        yield


@pytest.fixture(scope="module")
def tiny():
    return models.build_tiny()


# ---------------------------------------------------------------- fixture files in HF layouts


def write(path: Path, rows: list[dict], fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "json":
        path.with_suffix(".json").write_text(json.dumps(rows), encoding="utf-8")
    elif fmt == "csv":
        import csv

        with path.with_suffix(".csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()})
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path.with_suffix(".parquet"))
    else:
        raise AssertionError(fmt)


def save_to_disk(root: Path, splits: dict[str, list[dict]]) -> None:
    import datasets

    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(root))


FOODS = ["the soup", "a cake", "the bread", "an apple", "the rice", "a pie"]


def rows_for(task: str, n: int) -> list[dict]:
    """``n`` rows of ``task`` in its Hugging Face column layout."""
    out = []
    for i in range(n):
        food, y = FOODS[i % len(FOODS)], i % 2
        if task == "sst2":
            out.append({"sentence": f"{food} was {'good' if y else 'bad'} ", "label": y, "idx": i})
        elif task in ("rte", "cb"):
            out.append(
                {
                    "premise": f"I ate {food}.",
                    "hypothesis": f"Someone ate {food}.",
                    "label": i % (3 if task == "cb" else 2),
                    "idx": i,
                }
            )
        elif task == "boolq":
            out.append({"question": f"is {food} warm", "passage": f"{food} is warm.", "answer": bool(y)})
        elif task == "wic":
            out.append(
                {
                    "word": "bank",
                    "sentence1": "The bank was closed.",
                    "sentence2": f"We sat on the {'bank' if y else 'shore'}.",
                    "start1": 4,
                    "start2": 10,
                    "end1": 8,
                    "end2": 14,
                    "idx": i,
                    "label": y,
                }
            )
        elif task == "wsc":
            out.append(
                {
                    "text": f"Mark told Pete about {food} because he was hungry.",
                    "span1_index": 0,
                    "span2_index": 7,
                    "span1_text": "Mark" if y else "Pete",
                    "span2_text": "He",
                    "idx": i,
                    "label": y,
                }
            )
        elif task == "multirc":
            out.append(
                {
                    "paragraph": f"Sam cooked {food}.",
                    "question": "What did Sam cook?",
                    "answer": food if y else "nothing",
                    "idx": {"paragraph": 0, "question": 0, "answer": i},
                    "label": y,
                }
            )
        elif task == "mrpc":
            out.append({"sentence1": f"He ate {food}.", "sentence2": f"{food} was eaten by him.", "label": y, "idx": i})
        elif task == "qqp":
            out.append(
                {"question1": f"How is {food} made?", "question2": f"How do I make {food}?", "label": y, "idx": i}
            )
        elif task == "qnli":
            out.append({"question": f"Who ate {food}?", "sentence": f"Ann ate {food}.", "label": y, "idx": i})
        elif task == "wnli":
            out.append(
                {
                    "sentence1": f"The cat ate {food} because it was hungry.",
                    "sentence2": "The cat was hungry.",
                    "label": y,
                    "idx": i,
                }
            )
        elif task == "copa":
            out.append(
                {
                    "premise": f"I was hungry{'.' if y else ''}",
                    "choice1": f"I ate {food}.",
                    "choice2": "The sun rose.",
                    "question": "effect" if y else "cause",
                    "idx": i,
                    "label": y,
                }
            )
        elif task == "winogrande":
            out.append(
                {
                    "sentence": f"Ann gave {food} to Bea because _ was hungry.",
                    "option1": "Ann",
                    "option2": "Bea",
                    "answer": str(1 + y),
                }
            )
        elif task in ("arc-easy", "arc-challenge"):
            labels = ["A", "B", "C", "D"] if y else ["1", "2", "3"]
            out.append(
                {
                    "id": f"q{i}",
                    "question": f"Which one is food? ({i})",
                    "choices": {"text": [food, "a rock", "a cloud", "a car"][: len(labels)], "label": labels},
                    "answerKey": labels[i % len(labels)],
                }
            )
        elif task == "squad":
            out.append(
                {
                    "id": str(i),
                    "title": "Food",
                    "context": f"Ann ate {food} at noon.",
                    "question": "What did Ann eat?",
                    "answers": {"text": [food, food.split()[-1]], "answer_start": [8, 12]},
                }
            )
        elif task == "drop":
            out.append(
                {
                    "section_id": "s",
                    "query_id": str(i),
                    "passage": f"Ann ate {i + 2} apples.",
                    "question": "How many apples?",
                    "answers_spans": {"spans": [str(i + 2)], "types": ["number"]},
                }
            )
        else:
            raise AssertionError(task)
    return out


# task -> (file format, metric). Formats cover JSONL, JSON, CSV, Parquet and save_to_disk.
TASKS = {
    "sst2": ("csv", "accuracy"),
    "rte": ("jsonl", "accuracy"),
    "boolq": ("json", "accuracy"),
    "wic": ("parquet", "accuracy"),
    "wsc": ("jsonl", "accuracy"),
    "multirc": ("parquet", "accuracy"),
    "mrpc": ("csv", "accuracy"),
    "qqp": ("jsonl", "accuracy"),
    "qnli": ("jsonl", "accuracy"),
    "wnli": ("jsonl", "accuracy"),
    "cb": ("jsonl", "accuracy"),
    "copa": ("jsonl", "accuracy"),
    "winogrande": ("csv", "accuracy"),
    "arc-easy": ("parquet", "accuracy"),
    "arc-challenge": ("csv", "accuracy"),  # the choices struct as a JSON string
    "squad": ("disk", "f1"),
    "drop": ("jsonl", "f1"),
}


def make_data(root: Path, task: str, n_train: int = 6, n_val: int = 4) -> Path:
    fmt = TASKS[task][0]
    train_rows, val_rows = rows_for(task, n_train), rows_for(task, n_val)
    if fmt == "disk":
        save_to_disk(root, {"train": train_rows, "validation": val_rows})
    else:
        write(root / "train", train_rows, fmt)
        write(root / "validation", val_rows, fmt)
    return root


# ---------------------------------------------------------------- every task: train + eval end to end


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_trains_and_evaluates_end_to_end(task, tmp_path, capsys):
    data = make_data(tmp_path / "data", task)
    metric = TASKS[task][1]
    out = tmp_path / "run"
    cfg = TrainConfig.from_flat(
        model="tiny",
        task=task,
        data=str(data),
        steps=2,
        batch_size=2,
        queries=1,
        optimizer="sgd",
        lr=0.05,
        eps=0.05,
        eval_examples=4,
        eval_every=1,
        save_every=0,
        progress=False,
        out=str(out),
        max_length=96,
        max_new_tokens=6,
    )
    summary = train(cfg)
    assert summary["metric"] == metric
    value = summary[f"eval_{metric}"]
    assert 0.0 <= value <= 1.0 and summary["eval"]["n"] == 4
    assert math.isfinite(summary["eval_loss"])
    recs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "step" in r]
    assert [r["step"] for r in recs] == [1, 2] and all(f"eval_{metric}" in r for r in recs)
    # best/ is the step with the highest metric (the earlier one on ties; the start counts as step 0)
    evals = [(0, summary["eval_start"][metric])] + [(r["step"], r[f"eval_{metric}"]) for r in recs]
    best_step = max(evals, key=lambda e: (e[1], -e[0]))[0]
    assert summary["best"]["step"] == best_step and summary["best"]["metric"] == metric
    for d in ("adapter", "best"):
        assert (out / d / "adapter_config.json").is_file() and (out / d / "adapter_model.safetensors").is_file()

    # `mobizo eval` on the final adapter reproduces the training run's final eval; zero-shot also works
    capsys.readouterr()
    common = [
        "eval",
        "--task",
        task,
        "--data",
        str(data),
        "--eval-examples",
        "4",
        "--max-length",
        "96",
        "--max-new-tokens",
        "6",
    ]
    assert main(common + ["--adapter", str(out / "adapter"), "--json", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["metric"] == metric and m["task"] == task
    assert m[metric] == pytest.approx(value, abs=1e-9)
    assert m["loss"] == pytest.approx(summary["eval_loss"], rel=1e-4)
    assert main(common + ["--json", str(tmp_path / "z.json")]) == 0
    zero = json.loads((tmp_path / "z.json").read_text())
    assert zero["adapter"] is None and 0.0 <= zero[metric] <= 1.0
    printed = capsys.readouterr().out
    assert f"{task} (zero-shot): {metric}" in printed


# ---------------------------------------------------------------- templates and label parsing


def load_one(tmp_path, task, rows, fmt="jsonl", **options):
    write(tmp_path / "validation", rows, fmt)
    return get_task(task, data=str(tmp_path), **options).load("validation")


def test_templates_follow_mezo(tmp_path):
    ex = load_one(tmp_path / "a", "sst2", [{"sentence": "a fun ride ", "label": 1}])[0]
    assert (ex.prompt, ex.candidates, ex.answer) == ("a fun ride It was", [" terrible", " great"], " great")
    ex = load_one(tmp_path / "b", "rte", [{"premise": "P.", "hypothesis": "H.", "label": 1}])[0]
    assert ex.prompt == 'P.\nDoes this mean that "H." is true? Yes or No?\n'
    assert ex.candidates == ["Yes", "No"] and ex.answer == "No"  # no space after a newline
    ex = load_one(tmp_path / "c", "boolq", [{"question": "is it warm", "passage": "It is.", "label": 1}])[0]
    assert ex.prompt == "It is. Is it warm?\n" and ex.answer == "Yes"
    ex = load_one(
        tmp_path / "d",
        "copa",
        [
            {
                "premise": "The man fell.",
                "choice1": "He slipped.",
                "choice2": "I pushed him.",
                "question": "cause",
                "label": 1,
            }
        ],
    )[0]
    assert ex.prompt == "The man fell because" and ex.candidates == [" he slipped.", " I pushed him."] and ex.label == 1
    ex = load_one(
        tmp_path / "e",
        "winogrande",
        [{"sentence": "Ann helped Bea because _ was kind.", "option1": "Ann", "option2": "Bea", "answer": "1"}],
    )[0]
    assert (
        ex.prompt == "Ann helped Bea because"
        and ex.candidates == [" Ann was kind.", " Bea was kind."]
        and ex.label == 0
    )
    ex = load_one(
        tmp_path / "f",
        "squad",
        [
            {
                "title": "T",
                "context": "C.",
                "question": "Q? ",
                "answers": {"text": ["x  y", "x y", "z"], "answer_start": [0, 0, 0]},
            }
        ],
    )[0]
    assert ex.prompt == "Title: T\nContext: C.\nQuestion: Q?\nAnswer:"
    assert ex.target == " x y\n" and ex.answers == ["x y", "z"]
    ex = load_one(
        tmp_path / "g",
        "drop",
        [{"passage": "P", "question": "Q", "answers_spans": {"spans": ["3"], "types": ["number"]}}],
    )[0]
    assert ex.prompt == "Passage: P\nQuestion: Q\nAnswer:" and ex.answers == ["3"]


@pytest.mark.parametrize(
    "task,value,label",
    [
        ("rte", "not_entailment", 1),
        ("rte", "0", 0),
        ("cb", "neutral", 2),
        ("cb", 2.0, 2),
        ("boolq", "False", 0),
        ("boolq", True, 1),
        ("wic", "true", 1),
        ("sst2", "positive", 1),
    ],
)
def test_label_values_in_every_spelling(tmp_path, task, value, label):
    row = rows_for(task, 1)[0]
    row["answer" if task == "boolq" else "label"] = value
    assert load_one(tmp_path, task, [row])[0].label == label


def test_glue_column_names_for_rte_and_flattened_structs(tmp_path):
    ex = load_one(tmp_path / "a", "rte", [{"sentence1": "P.", "sentence2": "H.", "label": 0}])[0]
    assert ex.prompt.startswith("P.\n") and ex.label == 0
    rows = [{"question": "Q", "choices.text": ["a", "b"], "choices.label": ["A", "B"], "answerKey": "B"}]
    ex = load_one(tmp_path / "b", "arc-easy", rows)[0]
    assert ex.candidates == [" a", " b"] and ex.label == 1
    rows = [{"question": "Q", "choices": "{'text': ['a', 'b'], 'label': ['A', 'B']}", "answerKey": "A"}]  # pandas-style
    ex = load_one(tmp_path / "c", "arc-easy", rows, fmt="csv")[0]
    assert ex.candidates == [" a", " b"] and ex.label == 0
    rows = [{"question": "Q", "choices": "not a struct", "answerKey": "A"}]
    with pytest.raises(MobizoError, match="cannot parse"):
        load_one(tmp_path / "d", "arc-easy", rows, fmt="csv")


def test_label_words_override_and_sampling_is_seeded(tmp_path):
    write(tmp_path / "train", rows_for("sst2", 20), "jsonl")
    task = get_task("SST-2", data=str(tmp_path), label_words="bad,good")
    exs = task.load("train")
    assert exs[0].candidates == [" bad", " good"]
    a, b, c = task.load("train", 5, seed=0), task.load("train", 5, seed=0), task.load("train", 5, seed=1)
    assert [e.prompt for e in a] == [e.prompt for e in b] and len(a) == 5
    assert {e.prompt for e in a} <= {e.prompt for e in exs} and [e.prompt for e in a] != [e.prompt for e in c]
    with pytest.raises(MobizoError, match="3 classes"):
        get_task("cb", data=str(tmp_path), label_words="a,b")
    with pytest.raises(MobizoError, match="--template is for --task custom"):
        get_task("sst2", data=str(tmp_path), template="{sentence}")


# ---------------------------------------------------------------- eval modes on hand-checkable cases


class ScriptedEngine:
    """Scores each row from its answer length alone: 1 token costs 1.0 nats, n>1 tokens 0.5 nats each."""

    from mobizo.engines import Shapes

    shapes = Shapes()
    name = "scripted"

    def score(self, batch):
        counts = (batch.labels != -100).sum(-1)
        sums = torch.where(counts > 1, 0.5 * counts.double(), torch.ones_like(counts, dtype=torch.double))
        return sums, counts


def test_classification_sums_and_multiple_choice_averages(tiny):
    _, tok = tiny
    enc = Encoder(tok)
    # " Yes" is one token (CE 1.0); " Maybe" is five (CE 2.5 in total, 0.5 per token)
    assert len(enc("Q:", " Yes").answer_ids) == 1 and len(enc("Q:", " Maybe").answer_ids) == 5
    from mobizo.tasks import Example

    ex = [Example(prompt="Q:", candidates=[" Yes", " Maybe"], label=0)]
    cls = evaluate(ScriptedEngine(), "classification", ex, enc, tok.pad_token_id, 64)
    mc = evaluate(ScriptedEngine(), "multiple_choice", ex, enc, tok.pad_token_id, 64)
    assert cls["accuracy"] == 1.0 and mc["accuracy"] == 0.0  # sum picks " Yes"; the per-token mean picks " Maybe"
    assert cls["loss"] == pytest.approx(1.0)


def test_multi_token_label_word_is_scored_whole(tiny):
    """CB's "Maybe" is several tokens: its score is the sum of log p over all of them, as a direct forward gives."""
    model, tok = tiny
    enc = Encoder(tok)
    prompt = 'Suppose A. Can we infer that "B"? Yes, No, or Maybe?\n'
    e = enc(prompt, "Maybe")
    assert len(e.answer_ids) == 4 and tok.decode(e.answer_ids) == "Maybe"
    batch = collate([e, enc(prompt, "Yes")], tok.pad_token_id, 128)
    assert batch.labels[0].tolist() == e.answer_ids  # the whole word is in the answer window
    from mobizo.engines.eager import EagerEngine

    sums, counts = score_pairs(
        EagerEngine(model, None), enc, [(prompt, "Maybe"), (prompt, "Yes")], tok.pad_token_id, 128, 8
    )
    ids = torch.tensor([e.prompt_ids + e.answer_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    P = len(e.prompt_ids)
    manual = -sum(float(logp[P - 1 + j, t]) for j, t in enumerate(e.answer_ids))
    assert counts.tolist() == [4, 1] and float(sums[0]) == pytest.approx(manual, rel=1e-4)


# ---------------------------------------------------------------- bad input


def test_bad_input_gives_one_line_errors(tmp_path):
    d = tmp_path
    write(d / "m" / "train", [{"sentence": "x"}], "jsonl")
    cases = [
        (lambda: get_task("sst2", data=str(d / "nowhere")).load("train"), "does not exist"),
        (lambda: get_task("sst2", data=str(d / "m")).load("validation"), "no validation split"),
        (lambda: get_task("sst2", data=str(d / "m")).load("train"), "missing column 'label'"),
    ]
    write(d / "neg" / "validation", [{"sentence": "x", "label": -1}], "jsonl")
    cases.append((lambda: get_task("sst2", data=str(d / "neg")).load("validation"), "unlabelled test split"))
    write(d / "big" / "validation", [{"premise": "p", "hypothesis": "h", "label": 3}], "jsonl")
    cases.append((lambda: get_task("cb", data=str(d / "big")).load("validation"), "out of range"))
    write(d / "word" / "validation", [{"sentence": "x", "label": "banana"}], "jsonl")
    cases.append((lambda: get_task("sst2", data=str(d / "word")).load("validation"), "is not one of the classes"))
    (d / "empty").mkdir()
    (d / "empty" / "validation.jsonl").write_text("\n")
    cases.append((lambda: get_task("rte", data=str(d / "empty")).load("validation"), "empty file"))
    (d / "bin").mkdir()
    (d / "bin" / "validation.csv").write_bytes(b"sentence,label\n\xff\xfe bad,1\n")
    cases.append((lambda: get_task("sst2", data=str(d / "bin")).load("validation"), "not valid UTF-8"))
    write(d / "wg" / "validation", [{"sentence": "a _ b", "option1": "x", "option2": "y", "answer": ""}], "jsonl")
    cases.append((lambda: get_task("winogrande", data=str(d / "wg")).load("validation"), "unlabelled test split"))
    write(
        d / "arc" / "validation",
        [{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"}],
        "jsonl",
    )
    cases.append((lambda: get_task("arc-easy", data=str(d / "arc")).load("validation"), "answerKey 'E'"))
    write(
        d / "sq" / "validation",
        [{"context": "c", "question": "q", "answers": {"text": [], "answer_start": []}}],
        "jsonl",
    )
    cases.append((lambda: get_task("squad", data=str(d / "sq")).load("validation"), "no non-empty answer"))
    write(
        d / "cp" / "validation",
        [{"premise": "p", "choice1": "a", "choice2": "b", "question": "why", "label": 0}],
        "jsonl",
    )
    cases.append((lambda: get_task("copa", data=str(d / "cp")).load("validation"), "'cause' or 'effect'"))
    cases.append((lambda: get_task("nope"), "unknown task 'nope'"))
    for fn, message in cases:
        with pytest.raises(MobizoError, match=message) as info:
            fn()
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "text, message",
    [
        # a record with more fields than the header (an unquoted comma) used to be read with the extra dropped
        ("sentence,label\ngood,0\ngreat, fun movie,1\n", r"v\.csv:3: 3 fields, but the header has 2: sentence, label"),
        ("sentence,label\ngood,0\nbad\n", r"v\.csv:3: 1 field, but the header has 2"),
        # an unclosed quote used to swallow the rest of the file into one field ("missing column 'label'", on
        # record 1) or, closed by a later quote, merge the lines into one record
        ('sentence,label\n"good movie,1\nbad,0\nok,1\n', r"v\.csv:2: unclosed quote in the record on line 2 .*line 4"),
        ('sentence,label\nfine,1\n"good movie,1\nbad,0\n"ok",1\n', r"v\.csv:3: unclosed quote .* on to line 5"),
        ('sentence,label\n"a"b,1\n', r"v\.csv:2: malformed CSV: ',' expected after '\"'"),
    ],
)
def test_csv_errors_name_the_line_and_the_cause(tmp_path, text, message):
    from mobizo.tasks.io import read_records

    (tmp_path / "v.csv").write_text(text, encoding="utf-8")
    with pytest.raises(MobizoError, match=message) as info:
        read_records(tmp_path / "v.csv")
    assert "\n" not in str(info.value)


def test_csv_quoted_fields_may_span_lines(tmp_path):
    from mobizo.tasks.io import read_records

    (tmp_path / "v.csv").write_text('sentence,label\n"two\nlines, one field",1\n\nplain,0\n', encoding="utf-8")
    assert read_records(tmp_path / "v.csv") == [
        {"sentence": "two\nlines, one field", "label": "1"},
        {"sentence": "plain", "label": "0"},
    ]


def test_cli_reports_bad_data_in_one_line(tmp_path, capsys):
    write(tmp_path / "validation", [{"sentence": "x", "label": 7}], "jsonl")
    assert main(["eval", "--task", "sst2", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mobizo: error:") and "out of range" in err and "\n" not in err


def test_long_prompts_are_cut_from_the_left_and_counted(tmp_path, capsys):
    long = [{"sentence": " ".join(["the movie was good"] * 30), "label": 1}] * 3 + [{"sentence": "fun", "label": 1}]
    write(tmp_path / "d" / "train", long, "jsonl")
    write(tmp_path / "d" / "validation", long, "jsonl")
    cfg = TrainConfig.from_flat(
        task="sst2",
        data=str(tmp_path / "d"),
        steps=1,
        batch_size=2,
        queries=1,
        eval_examples=None,
        eval_every=0,
        save_every=0,
        progress=False,
        max_length=32,
    )
    summary = train(cfg)
    assert summary["truncated"] == {"train": 3, "validation": 3} and summary["eval"]["truncated"] == 3
    assert "3 of 4 train examples exceed --max-length 32" in capsys.readouterr().err
    with pytest.raises(MobizoError, match="longer than --max-length"):
        train(cfg.replace(truncation="error"))


# ---------------------------------------------------------------- generation: F1 / EM and greedy decoding


@pytest.mark.parametrize(
    "pred,gold,f1,em",
    [
        ("Denver Broncos", "Denver Broncos", 1.0, 1.0),
        ("the Denver Broncos!", "denver broncos", 1.0, 1.0),
        ("Broncos", "Denver Broncos", 2 / 3, 0.0),
        ("Denver Broncos won", "the Broncos", 0.5, 0.0),
        ("Carolina", "Denver Broncos", 0.0, 0.0),
        ("", "", 1.0, 1.0),
        ("", "Denver", 0.0, 0.0),
        ("x b b", "b b c", 2 / 3, 0.0),
        ("a b b", "b b c", 0.8, 0.0),
    ],
)
def test_squad_f1_and_exact_match(pred, gold, f1, em):
    from mobizo.evaluation import exact_match, normalize_answer, token_f1

    assert token_f1(pred, gold) == pytest.approx(f1) and exact_match(pred, gold) == em
    assert normalize_answer("  The  Cat, an apple. ") == "cat apple"


def test_answer_scores_take_the_best_accepted_answer():
    from mobizo.evaluation import answer_scores

    assert answer_scores("Broncos", ["Carolina Panthers", "Denver Broncos", "Broncos"]) == (1.0, 1.0)
    assert answer_scores("the Broncos team", ["Denver Broncos"]) == (pytest.approx(0.5), 0.0)


class ScriptedGenerator:
    """Emits a fixed token sequence per prompt, whatever the model would say; records each forward."""

    from mobizo.engines import Shapes

    shapes = Shapes()
    name = "scripted"

    def __init__(self, tok, enc, scripts: dict[str, list[int]]):
        self.vocab = len(tok)
        self.key = {tuple(enc.prompt_ids(p)): p for p in scripts}
        self.scripts, self.pos, self.shapes_seen = scripts, dict.fromkeys(scripts, 0), []

    def next_token_logits(self, input_ids, attention_mask):
        self.shapes_seen.append(tuple(input_ids.shape))
        assert (attention_mask[:, -1] == 1).all()  # left padding: every row ends with a real token
        out = torch.full((input_ids.shape[0], self.vocab), -1e9)
        for r in range(input_ids.shape[0]):
            real = input_ids[r][attention_mask[r].bool()].tolist()
            p = next(self.key[k] for k in self.key if tuple(real[: len(k)]) == k)
            out[r, self.scripts[p][self.pos[p]]] = 0.0
            self.pos[p] += 1
        return out

    def score(self, batch):
        counts = (batch.labels != -100).sum(-1)
        return counts.double(), counts


def test_greedy_generation_stops_at_newline_eos_or_budget(tiny):
    from mobizo.evaluation import evaluate, generate
    from mobizo.tasks import Example

    _, tok = tiny
    enc = Encoder(tok)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    scripts = {
        "Who won? Answer:": ids(" the Denver Broncos\nand more") + [tok.eos_token_id],  # stops at the newline
        "Who lost the game? Answer:": ids(" Broncos") + [tok.eos_token_id] + ids(" never"),  # stops at EOS
        "Why? Answer:": ids(" so" * 24),  # stops after max_new_tokens
    }
    prompts = list(scripts)
    engine = ScriptedGenerator(tok, enc, scripts)
    texts, truncated = generate(engine, enc, prompts, tok.pad_token_id, max_length=64, max_new_tokens=16, batch_size=8)
    assert texts == ["the Denver Broncos", "Broncos", ("so " * 16).strip()] and truncated == 0
    assert len(engine.shapes_seen) == 16 and engine.shapes_seen[0][0] == 3 and engine.shapes_seen[-1][0] == 1
    # through evaluate: F1/EM against all accepted answers
    exs = [
        Example(prompt=p, target=" x\n", answers=a)
        for p, a in zip(prompts, [["Denver Broncos"], ["Denver Broncos", "Carolina"], ["Carolina"]])
    ]
    preds: list[str] = []
    m = evaluate(
        ScriptedGenerator(tok, enc, scripts),
        "generation",
        exs,
        enc,
        tok.pad_token_id,
        64,
        8,
        max_new_tokens=16,
        predictions=preds,
    )
    assert preds[:2] == ["the Denver Broncos", "Broncos"]
    assert m["em"] == pytest.approx(1 / 3) and m["f1"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)
    with pytest.raises(MobizoError, match="cannot generate"):
        evaluate(ScriptedEngine(), "generation", exs, enc, tok.pad_token_id, 64)
    with pytest.raises(MobizoError, match="max-new-tokens"):
        generate(ScriptedGenerator(tok, enc, scripts), enc, prompts, tok.pad_token_id, max_length=6, max_new_tokens=6)


def test_squad_generation_end_to_end_after_learning_the_answer(tmp_path):
    """Train on " the soup\\n" (first-order, to be quick): greedy decoding then says "the soup" and stops."""
    rows = [
        {
            "title": "Food",
            "context": f"Ann ate the soup at {h}.",
            "question": "What did Ann eat?",
            "answers": {"text": ["the soup"], "answer_start": [8]},
        }
        for h in ("noon", "six", "ten", "one")
    ]
    write(tmp_path / "train", rows, "jsonl")
    write(tmp_path / "validation", rows, "parquet")
    summary = train(
        TrainConfig.from_flat(
            task="squad",
            data=str(tmp_path),
            estimator="fo",
            optimizer="adamw",
            lr=3e-2,
            steps=60,
            train_a=True,
            batch_size=2,
            eval_every=0,
            save_every=0,
            progress=False,
            max_length=64,
            max_new_tokens=12,
        )
    )
    assert summary["eval"]["f1"] == 1.0 and summary["eval"]["em"] == 1.0


def test_generation_truncates_long_prompts_from_the_left(tiny):
    from mobizo.evaluation import generate

    _, tok = tiny
    enc = Encoder(tok)
    long = "Q:" + " the movie was good" * 20
    scripts = {long: [tok.eos_token_id], "hi": [tok.eos_token_id]}
    engine = ScriptedGenerator(tok, enc, scripts)
    engine.key = {(): None}  # the long prompt loses its start: answer EOS for every row
    engine.scripts, engine.pos = {None: [tok.eos_token_id]}, {None: 0}
    engine.next_token_logits = lambda ids, mask: (
        engine.shapes_seen.append(tuple(ids.shape)),
        torch.nn.functional.one_hot(torch.full((ids.shape[0],), tok.eos_token_id), len(tok)).float(),
    )[1]
    texts, truncated = generate(engine, enc, [long, "hi"], tok.pad_token_id, max_length=24, max_new_tokens=8)
    assert truncated == 1 and texts == ["", ""] and engine.shapes_seen == [(2, 16)]


def test_eager_next_token_logits_ignore_left_padding(tiny):
    from mobizo.engines.eager import EagerEngine

    model, tok = tiny
    a, b = tok("the movie was good and")["input_ids"], tok("fun")["input_ids"]
    ids = torch.full((2, len(a)), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = torch.tensor(a), 1
    ids[1, -len(b) :], mask[1, -len(b) :] = torch.tensor(b), 1
    got = EagerEngine(model, None).next_token_logits(ids, mask)
    with torch.no_grad():
        for row, seq in enumerate((a, b)):
            want = model(input_ids=torch.tensor([seq])).logits[0, -1]
            assert torch.allclose(got[row], want, atol=1e-4)


# ---------------------------------------------------------------- leading spaces per tokenizer family


def sentencepiece_style_tokenizer():
    """A local SentencePiece-style tokenizer (``▁`` marks spaces, prepended at the start), with a
    learned ``"\\nYes"`` token that spans a prompt/answer boundary. Built offline."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers import models as tmodels
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tmodels.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(
        ["It was great. It was terrible. Yes No Maybe\nYes"] * 10,
        trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False),
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )


def test_encoder_leading_spaces_sentencepiece_and_byte_bpe(tiny):
    sp = sentencepiece_style_tokenizer()
    enc = Encoder(sp)
    e = enc("It was", " great")
    assert sp.convert_ids_to_tokens(e.answer_ids)[0] == "▁"  # the space before the word belongs to the answer
    assert e.prompt_ids + e.answer_ids == sp("It was great")["input_ids"]
    assert enc("It was ", " great").answer_ids == e.answer_ids[1:]  # prompt already ends in a space
    # "\nYes" is one token: the answer must not pick up the "▁" a standalone "Yes" gets
    e = enc("Yes or No?\n", "Yes")
    assert sp.convert_ids_to_tokens(sp("Yes", add_special_tokens=False)["input_ids"])[0].startswith("▁")
    assert not sp.convert_ids_to_tokens(e.answer_ids)[0].startswith("▁")
    assert sp.decode(e.prompt_ids + e.answer_ids, skip_special_tokens=True) == sp.decode(
        sp("Yes or No?\nYes")["input_ids"], skip_special_tokens=True
    )
    # byte-level BPE (the tiny model's): "Ġ" carries the space, no space after a newline
    _, tok = tiny
    enc = Encoder(tok)
    assert tok.convert_ids_to_tokens(enc("It was", " great").answer_ids) == ["Ġgreat"]
    assert tok.convert_ids_to_tokens(enc("Yes or No?\n", "Yes").answer_ids) == ["Yes"]


# ---------------------------------------------------------------- custom data


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CHATS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Name {food}."},
            {"role": "assistant", "content": food},
        ]
    }
    for food in FOODS
]


def test_custom_prompt_completion_trains_and_keeps_the_best_adapter(tmp_path):
    rows = [{"prompt": f"Q: what was {f}? A:", "completion": f" {f} was good"} for f in FOODS]
    write(tmp_path / "d" / "train", rows, "jsonl")
    write(tmp_path / "d" / "validation", rows[:4], "csv")
    out = tmp_path / "run"
    cfg = TrainConfig.from_flat(
        task="custom",
        data=str(tmp_path / "d"),
        steps=4,
        batch_size=2,
        queries=2,
        optimizer="sgd",
        lr=0.5,
        eps=0.05,
        eval_every=1,
        save_every=2,
        progress=False,
        out=str(out),
        max_length=48,
    )
    summary = train(cfg)
    assert summary["metric"] == "loss"
    recs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "step" in r]
    evals = [(0, summary["eval_start"]["loss"])] + [(r["step"], r["eval_loss"]) for r in recs]
    best = min(evals, key=lambda e: e[1])  # the start (step 0) is a candidate too
    assert summary["best"] == {"step": best[0], "metric": "loss", "value": best[1]}
    assert len({e[1] for e in evals}) > 1  # training moved the loss: "best" is a real choice
    assert (
        main(
            [
                "eval",
                "--task",
                "custom",
                "--data",
                str(tmp_path / "d"),
                "--max-length",
                "48",
                "--adapter",
                str(out / "best"),
                "--json",
                str(tmp_path / "b.json"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "b.json").read_text())["loss"] == pytest.approx(best[1], rel=1e-5)
    # a run stopped after step 2 and resumed to step 4 keeps the same best (remembered from metrics.jsonl)
    part = cfg.replace(steps=2, out=str(tmp_path / "part"))
    train(part)
    resumed = train(part.replace(steps=4, resume=True))
    assert resumed["best"] == summary["best"]
    part_recs = [
        r for r in map(json.loads, (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()) if "step" in r
    ]
    assert [r["eval_loss"] for r in part_recs] == [r["eval_loss"] for r in recs]


def test_custom_with_label_words_is_classification_and_template_alone_is_an_error(tmp_path):
    write(tmp_path / "validation", [{"text": "great fun", "label": "good"}, {"text": "dull", "label": 0}], "jsonl")
    task = get_task("custom", data=str(tmp_path), template="Review: {text} Sentiment:", label_words="bad,good")
    assert task.kind == "classification"
    exs = task.load("validation")
    assert [e.label for e in exs] == [1, 0] and exs[0].prompt == "Review: great fun Sentiment:"
    with pytest.raises(MobizoError, match="needs --label-words"):
        get_task("custom", data=str(tmp_path), template="{text}")


def test_custom_records_with_choices_are_multiple_choice(tmp_path, capsys):
    """``{"question", "choices", "answer"}`` records (answer as an index or the choice's text, any number of
    choices per question, an optional template over any field) train and evaluate as multiple choice."""
    rows = [
        {
            "question": f"Which one can you eat? ({i})",
            "choices": [FOODS[i % len(FOODS)], "a rock", "a cloud"][: 2 + i % 2],
            "answer": 0 if i % 3 else FOODS[i % len(FOODS)],
            "topic": "food",
        }
        for i in range(12)
    ]
    write(tmp_path / "d" / "train", rows, "jsonl")
    write(tmp_path / "d" / "validation", rows[:6], "json")
    task = get_task("custom", data=str(tmp_path / "d"))
    assert task.kind == "multiple_choice" and task.name == "custom-mc"
    exs = task.load("validation")
    assert exs[0].prompt == "Question: Which one can you eat? (0)\nAnswer:" and exs[0].candidates[:2] == [
        f" {FOODS[0]}",
        " a rock",
    ]
    assert [e.label for e in exs] == [0] * 6 and {len(e.candidates) for e in exs} == {2, 3}
    custom = get_task("custom", data=str(tmp_path / "d"), template="[{topic}] {question} ->").load("validation")
    assert custom[1].prompt == "[food] Which one can you eat? (1) ->"
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--task",
            "custom",
            "--data",
            tmp_path / "d",
            "--steps",
            2,
            "--batch-size",
            2,
            "-q",
            1,
            "--max-length",
            48,
            "--eval-every",
            0,
            "--out",
            out,
            "--no-progress",
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "accuracy" and summary["config"]["task"] == "custom"
    assert summary["config"]["objective"] == "auto" and summary["eval"]["n"] == 6
    # `mobizo predict --run` ranks each new record's own choices (the run's data tells it is multiple choice)
    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps({"question": "Which one?", "choices": ["a rock", FOODS[0], "a cloud"]}) + "\n")
    capsys.readouterr()
    assert main(["predict", "--run", out, "--input", new, "--json", "--no-progress"]) == 0
    (pred,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert pred["candidates"] == ["a rock", FOODS[0], "a cloud"] and len(pred["probabilities"]) == 3
    assert abs(sum(pred["probabilities"]) - 1) < 1e-6 and pred["label"] in pred["candidates"]
    new.write_text(json.dumps({"question": "Which one?"}) + "\n")
    assert main(["predict", "--run", out, "--input", new]) == 2
    assert "new.jsonl:1: 'choices' should be a list of at least two strings" in capsys.readouterr().err


@pytest.mark.parametrize(
    "row,message",
    [
        ({"question": "q", "choices": "a,b", "answer": 0}, "a list of at least two strings"),
        ({"question": "q", "choices": ["a"], "answer": 0}, "a list of at least two strings"),
        ({"question": "q", "choices": ["a", "a"], "answer": 0}, "non-empty and distinct"),
        ({"question": "q", "choices": ["a", "b"]}, "missing 'answer'"),
        ({"question": "q", "choices": ["a", "b"], "answer": "c"}, "not one of the choices"),
        ({"question": "q", "choices": ["a", "b"], "answer": 2}, "out of range"),
        ({"choices": ["a", "b"], "answer": 1}, "no field 'question'"),
    ],
)
def test_custom_bad_multiple_choice_records(tmp_path, row, message):
    write(tmp_path / "train", [row], "jsonl")
    with pytest.raises(MobizoError, match=message):
        get_task("custom", data=str(tmp_path)).load("train")


@pytest.mark.parametrize(
    "row,message",
    [
        ({"prompt": "a"}, "expected 'prompt' and 'completion'"),
        ({"prompt": "a", "completion": " "}, "empty 'completion'"),
        ({"prompt": 3, "completion": "x"}, "'prompt' should be a string"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "must be the assistant's"),
        ({"messages": [{"role": "user"}]}, "string 'role' and 'content'"),
        ({"messages": []}, "non-empty list"),
    ],
)
def test_custom_bad_records(tmp_path, row, message):
    write(tmp_path / "validation", [row], "jsonl")
    with pytest.raises(MobizoError, match=message):
        get_task("custom", data=str(tmp_path)).load("validation")


def test_chat_records_use_the_chat_template(tmp_path, tiny):
    import copy

    from mobizo.tasks.custom import render_chat

    _, tok = tiny
    write(tmp_path / "d" / "train", CHATS, "jsonl")
    write(tmp_path / "d" / "validation", CHATS[:3], "jsonl")
    # no chat template (the tiny tokenizer): a clear error before any training
    with pytest.raises(MobizoError, match="need a tokenizer with a chat template"):
        train(
            TrainConfig.from_flat(
                task="custom", data=str(tmp_path / "d"), steps=1, batch_size=2, queries=1, progress=False
            )
        )
    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = CHAT_TEMPLATE
    prompt, completion = render_chat(chat_tok, CHATS[0]["messages"])
    assert prompt == "<|system|>\nBe brief.</s>\n<|user|>\nName the soup.</s>\n<|assistant|>\n"
    assert completion == "the soup</s>\n"
    assert Encoder(chat_tok)(prompt, completion).answer_ids[-2] == tok.eos_token_id  # the reply ends with EOS
    # a local model directory whose tokenizer has the template: train + eval end to end
    model, _ = models.build_tiny()
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    chat_tok.save_pretrained(model_dir)
    summary = train(
        TrainConfig.from_flat(
            model=str(model_dir),
            task="custom",
            data=str(tmp_path / "d"),
            steps=2,
            batch_size=2,
            queries=1,
            eval_every=0,
            save_every=0,
            progress=False,
            max_length=64,
        )
    )
    assert summary["metric"] == "loss" and math.isfinite(summary["eval_loss"]) and summary["eval"]["n"] == 3
