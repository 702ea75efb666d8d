"""Build the word-sentiment task used by the real-model benchmarks (mobizo custom classification data).

Labelled words from two lexicons that PyPI packages ship (no other download):
``afinn`` (AFINN-en-165: integer valence -5..5) and ``vaderSentiment`` (vader_lexicon.txt: mean
human rating -4..4). A lowercase alphabetic word is positive (label 1) or negative (0) by the sign
of its AFINN score, or of its VADER mean when that is at least 1.0 in magnitude; words the two
lexicons disagree on are dropped. Balanced splits: 600 validation words (300/300) and the rest of
the positives with as many negatives for training.

    pip download --no-deps afinn vaderSentiment -d /tmp/lex && cd /tmp/lex && \
        unzip -o -q vaderSentiment-*.whl && tar xzf afinn-*.tar.gz
    python benchmarks/real/make_word_sentiment.py /tmp/lex data/word-sentiment

    mobizo train --task custom --data data/word-sentiment --template 'Word: {text}\nSentiment:' \
        --label-words negative,positive ...
"""

import argparse
import json
import random
import re
from pathlib import Path

TEMPLATE = "Word: {text}\\nSentiment:"
LABEL_WORDS = "negative,positive"


def build(lex: Path) -> dict[str, int]:
    ok = re.compile(r"[a-z][a-z\-]*[a-z]")
    words: dict[str, int | None] = {}
    for line in (next(lex.glob("afinn-*/afinn/data/AFINN-en-165.txt"))).read_text(encoding="utf-8").splitlines():
        w, s = line.rsplit("\t", 1)
        if ok.fullmatch(w):
            words[w] = 1 if int(s) > 0 else 0
    for line in (lex / "vaderSentiment" / "vader_lexicon.txt").read_text(encoding="utf-8").splitlines():
        w, s = line.split("\t")[:2]
        if ok.fullmatch(w) and abs(float(s)) >= 1.0:
            label = 1 if float(s) > 0 else 0
            if w in words and words[w] != label:
                words[w] = None
            else:
                words.setdefault(w, label)
    return {w: v for w, v in words.items() if v is not None}


def main(lex: str, out: str, n_val: int = 300, seed: int = 0) -> None:
    words = build(Path(lex))
    rng = random.Random(seed)
    pos = sorted(w for w, v in words.items() if v == 1)
    neg = sorted(w for w, v in words.items() if v == 0)
    rng.shuffle(pos)
    rng.shuffle(neg)
    val = pos[:n_val] + neg[:n_val]
    n_train = len(pos) - n_val
    train = pos[n_val:] + neg[n_val : n_val + n_train]
    rng.shuffle(val)
    rng.shuffle(train)
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", train), ("validation", val)):
        with open(d / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": w, "label": words[w]}) + "\n" for w in split)
    print(f"{len(train)} train, {len(val)} validation words in {d}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lex", help="folder with afinn-*/afinn/data/AFINN-en-165.txt and vaderSentiment/vader_lexicon.txt")
    ap.add_argument("out", help="task directory to write (train.jsonl, validation.jsonl)")
    args = ap.parse_args()
    main(args.lex, args.out)
