"""Evaluation: score candidates (classification / multiple choice) or answer loss, via an engine."""

from __future__ import annotations

import math

import torch

from .data import Encoder, collate
from .tasks.base import Example


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


def evaluate(engine, kind: str, examples: list[Example], encoder: Encoder, pad_id: int, max_length: int, batch_size: int = 32) -> dict:
    """Metrics for ``examples``: ``accuracy`` (candidate tasks) and ``loss`` (gold answer CE per token)."""
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
        }
    sums, counts = score_pairs(engine, encoder, [(e.prompt, e.answer) for e in examples], pad_id, max_length, batch_size)
    loss = float(sums.sum() / counts.sum().clamp(min=1))
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "n": len(examples)}
