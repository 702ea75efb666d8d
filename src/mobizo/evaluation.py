"""Evaluation through an engine, per task kind.

* ``classification``: accuracy of the label word with the highest summed log-prob;
* ``multiple_choice``: accuracy of the candidate with the highest mean log-prob per token;
* ``generation``: greedy decoding (stops at a newline, EOS or ``max_new_tokens``), scored by
  SQuAD-style token F1 and exact match against all accepted answers;
* ``lm``: cross-entropy (and perplexity) of the gold completion.

All kinds also report ``loss`` (the gold answer's CE per token), ``n`` and ``truncated``
(examples whose prompt lost tokens on the left to ``max_length``).
"""

from __future__ import annotations

import collections
import math
import re
import string

import torch

from .data import Encoder, collate, count_truncated
from .errors import MobizoError
from .tasks.base import Example

# The metric each kind is ranked by (best adapter, summaries) and whether higher is better.
MAIN_METRIC = {
    "classification": ("accuracy", True),
    "multiple_choice": ("accuracy", True),
    "generation": ("f1", True),
    "lm": ("loss", False),
}


def main_metric(kind: str) -> str:
    return MAIN_METRIC[kind][0]


def metric_score(kind: str, metrics: dict) -> float:
    """The main metric as a higher-is-better number (``-loss`` for ``lm``)."""
    name, higher = MAIN_METRIC[kind]
    value = float(metrics[name])
    return value if higher else -value


# ---------------------------------------------------------------- SQuAD-style answer metrics


_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD's)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(answer))


def token_f1(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def answer_scores(prediction: str, answers: list[str]) -> tuple[float, float]:
    """(F1, EM) of ``prediction`` against the best-matching accepted answer."""
    return max(token_f1(prediction, a) for a in answers), max(exact_match(prediction, a) for a in answers)


def _chunks(seq, n):
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def score_pairs(engine, encoder: Encoder, pairs: list[tuple[str, str]], pad_id: int, max_length: int, batch_size: int):
    """(sum of answer cross-entropy, answer token count) for each (prompt, answer) pair."""
    shapes = engine.shapes
    rows = shapes.eval_rows or batch_size
    sums, counts = [], []
    for chunk in _chunks(pairs, rows):
        batch = collate(
            [encoder(p, a) for p, a in chunk],
            pad_id,
            max_length,
            length=shapes.length,
            answer_len=shapes.answer_len,
            rows=shapes.eval_rows,
        )
        s, c = engine.score(batch)
        sums.append(s[: batch.n_real].double())
        counts.append(c[: batch.n_real].double())
    return torch.cat(sums), torch.cat(counts)


@torch.no_grad()
def generate(
    engine,
    encoder: Encoder,
    prompts: list[str],
    pad_id: int,
    max_length: int,
    max_new_tokens: int = 32,
    batch_size: int = 32,
) -> tuple[list[str], int]:
    """Greedy completions of ``prompts`` (cut at the first newline) and how many prompts were truncated.

    A prompt keeps its last ``max_length - max_new_tokens`` tokens. Rows stop at EOS, at a
    newline or after ``max_new_tokens`` tokens; finished rows leave the batch.
    """
    next_logits = getattr(engine, "next_token_logits", None)
    if next_logits is None:
        raise MobizoError(
            f"the {getattr(engine, 'name', '?')} engine cannot generate text; "
            "generation tasks evaluate with --engine eager"
        )
    if max_new_tokens < 1 or max_new_tokens >= max_length:
        raise MobizoError(
            f"--max-new-tokens must be between 1 and --max-length - 1 ({max_length - 1}), got {max_new_tokens}"
        )
    tok = encoder.tokenizer
    eos = tok.eos_token_id
    budget = max_length - max_new_tokens
    texts, truncated = [], 0
    for chunk in _chunks(prompts, batch_size):
        seqs = []
        for p in chunk:
            ids = encoder.prompt_ids(p)
            if len(ids) > budget:
                ids, truncated = ids[len(ids) - budget :], truncated + 1
            seqs.append(list(ids))
        new: list[list[int]] = [[] for _ in chunk]
        active = list(range(len(chunk)))
        for _ in range(max_new_tokens):
            T = max(len(seqs[i]) for i in active)
            ids = torch.full((len(active), T), pad_id, dtype=torch.long)
            mask = torch.zeros((len(active), T), dtype=torch.long)
            for r, i in enumerate(active):
                ids[r, T - len(seqs[i]) :] = torch.tensor(seqs[i])
                mask[r, T - len(seqs[i]) :] = 1
            choice = next_logits(ids, mask).argmax(-1).tolist()
            still = []
            for r, i in enumerate(active):
                t = int(choice[r])
                if eos is not None and t == eos:
                    continue
                new[i].append(t)
                seqs[i].append(t)
                if "\n" not in tok.decode(new[i], skip_special_tokens=True):
                    still.append(i)
            active = still
            if not active:
                break
        texts += [tok.decode(g, skip_special_tokens=True).split("\n")[0].strip() for g in new]
    return texts, truncated


def evaluate(
    engine,
    kind: str,
    examples: list[Example],
    encoder: Encoder,
    pad_id: int,
    max_length: int,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    predictions: list | None = None,
) -> dict:
    """Metrics for ``examples`` (see the module docstring). ``predictions``, if given, receives
    the generated texts of a generation task."""
    if not examples:
        raise MobizoError("nothing to evaluate: no examples")
    limit = min(max_length, engine.shapes.length) if engine.shapes.length else max_length
    if kind in ("classification", "multiple_choice"):
        pairs, owners = [], []
        for i, ex in enumerate(examples):
            for cand in ex.candidates:
                pairs.append((ex.prompt, cand))
                owners.append(i)
        sums, counts = score_pairs(engine, encoder, pairs, pad_id, max_length, batch_size)
        correct, gold_ce, gold_tokens, pos = 0, 0.0, 0.0, 0
        for ex in examples:
            n = len(ex.candidates)
            s, c = sums[pos : pos + n], counts[pos : pos + n]
            pos += n
            # classification: total log-prob of the label word; multiple choice: per-token mean
            scores = -s if kind == "classification" else -s / c.clamp(min=1)
            correct += int(int(torch.argmax(scores)) == ex.label)
            gold_ce += float(s[ex.label])
            gold_tokens += float(c[ex.label])
        return {
            "accuracy": correct / len(examples),
            "loss": gold_ce / max(gold_tokens, 1.0),
            "n": len(examples),
            "truncated": count_truncated(encoder, examples, limit),
        }
    pairs = [(e.prompt, e.answer) for e in examples]
    sums, counts = score_pairs(engine, encoder, pairs, pad_id, max_length, batch_size)
    loss = float(sums.sum() / counts.sum().clamp(min=1))
    if kind == "generation":
        texts, truncated = generate(
            engine, encoder, [e.prompt for e in examples], pad_id, max_length, max_new_tokens, batch_size
        )
        f1 = em = 0.0
        for ex, text in zip(examples, texts):
            f, e = answer_scores(text, ex.answers or [ex.answer.strip()])
            f1, em = f1 + f, em + e
        if predictions is not None:
            predictions.extend(texts)
        n = len(examples)
        return {"f1": f1 / n, "em": em / n, "loss": loss, "n": n, "truncated": truncated}
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "n": len(examples),
        "truncated": count_truncated(encoder, examples, limit),
    }
