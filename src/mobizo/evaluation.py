"""Evaluation through an engine, per task kind.

* ``classification``: accuracy of the label word with the highest summed log-prob;
* ``multiple_choice``: accuracy of the candidate with the highest mean log-prob per token;
* ``generation``: greedy decoding (stops at a newline, EOS or ``max_new_tokens``), scored by
  SQuAD-style token F1 and exact match against all accepted answers;
* ``lm``: cross-entropy (and perplexity) of the gold completion.

All kinds also report ``loss`` (the gold answer's CE per token), ``n``, ``truncated``
(examples whose prompt lost tokens on the left to ``max_length``), ``seconds`` and
``examples_per_second``.

Speed: with an engine of free shapes (eager) examples are scored in order of length, so a batch
pads to its own longest row, not to the longest of the whole set; when every candidate is one
token (and the engine has ``score_choices``) classification and multiple choice score one prompt
row per example and read all candidates at its last position (exact, C times fewer rows); greedy
generation keeps a KV cache (``engine.decoder``) instead of re-running the whole sequence per token.
"""

from __future__ import annotations

import collections
import math
import re
import string
import time

import torch

from .data import IGNORE, Encoder, collate, collate_choices, count_truncated
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


def _by_length(engine, lengths: list[int]) -> list[int]:
    """Scoring order: longest first when the engine pads each batch to its own longest row, else as given."""
    if engine.shapes.length is not None:
        return list(range(len(lengths)))
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def _bar(total: int, progress: bool | None, desc: str):
    from .progress import bar

    return bar(total, desc, progress is None or progress, unit="ex")  # on an interactive terminal only


def score_pairs(
    engine,
    encoder: Encoder,
    pairs: list[tuple[str, str]],
    pad_id: int,
    max_length: int,
    batch_size: int,
    progress: bool | None = False,
    bar=None,
):
    """(sum of answer cross-entropy, answer token count) for each (prompt, answer) pair."""
    shapes = engine.shapes
    rows = shapes.eval_rows or batch_size
    encs = [encoder(p, a) for p, a in pairs]
    order = _by_length(engine, [len(e.prompt_ids) + len(e.answer_ids) for e in encs])
    sums = torch.zeros(len(pairs), dtype=torch.float64)
    counts = torch.zeros(len(pairs), dtype=torch.float64)
    own_bar = bar is None
    bar = _bar(len(pairs), progress, "eval") if own_bar else bar
    try:
        for chunk in _chunks(order, rows):
            batch = collate(
                [encs[i] for i in chunk],
                pad_id,
                max_length,
                length=shapes.length,
                answer_len=shapes.answer_len,
                rows=shapes.eval_rows,
            )
            s, c = engine.score(batch)
            sums[chunk] = s[: batch.n_real].double()
            counts[chunk] = c[: batch.n_real].double()
            if own_bar:
                bar.update(len(chunk))
    finally:
        if own_bar:
            bar.close()
    return sums, counts


def can_share_prompt(engine, encoder: Encoder, examples: list[Example]) -> bool:
    """Whether choice scoring can use one prompt row per example: every candidate is one token and the
    engine scores shared-prompt batches (``score_choices``; a fixed-shape program only if built so)."""
    if not hasattr(engine, "score_choices") or getattr(engine.shapes, "shared", None) is False:
        return False
    return all(len(encoder(ex.prompt, c).answer_ids) == 1 for ex in examples for c in ex.candidates)


def score_choices(
    engine,
    encoder: Encoder,
    examples: list[Example],
    pad_id: int,
    max_length: int,
    batch_size: int,
    progress: bool | None = False,
):
    """(examples, max candidates) CE sums and token counts (0 for a missing candidate), one prompt row
    per example (:func:`can_share_prompt` must hold)."""
    shapes = engine.shapes
    rows = shapes.eval_rows or batch_size
    n_choices = max(max(len(ex.candidates) for ex in examples), getattr(shapes, "choices", None) or 0)
    groups = [[encoder(ex.prompt, c) for c in ex.candidates] for ex in examples]
    order = _by_length(engine, [len(g[0].prompt_ids) for g in groups])
    sums = torch.zeros(len(examples), n_choices, dtype=torch.float64)
    counts = torch.zeros(len(examples), n_choices, dtype=torch.float64)
    with _bar(len(examples), progress, "eval") as bar:
        for chunk in _chunks(order, rows):
            batch = collate_choices(
                [groups[i] for i in chunk],
                [IGNORE if examples[i].label is None else examples[i].label for i in chunk],  # None: new inputs
                n_choices,
                pad_id,
                max_length,
                length=shapes.length,
                examples=shapes.eval_rows,
                shared=True,
            )
            s, c = engine.score_choices(batch)
            sums[chunk] = s[: len(chunk)].double()
            counts[chunk] = c[: len(chunk)].double()
            bar.update(len(chunk))
    return sums, counts


@torch.no_grad()
def generate(
    engine,
    encoder: Encoder,
    prompts: list[str],
    pad_id: int,
    max_length: int,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    use_cache: bool = True,
    progress: bool | None = False,
) -> tuple[list[str], int]:
    """Greedy completions of ``prompts`` (cut at the first newline) and how many prompts were truncated.

    A prompt keeps its last ``max_length - max_new_tokens`` tokens. Rows stop at EOS, at a
    newline or after ``max_new_tokens`` tokens; finished rows leave the batch. With ``use_cache``
    and an engine that has ``decoder`` (a KV cache), each step feeds one token per row; otherwise
    (``next_token_logits``) every step re-runs the whole sequences.
    """
    make_decoder = getattr(engine, "decoder", None) if use_cache else None
    next_logits = getattr(engine, "next_token_logits", None)
    if make_decoder is None and next_logits is None:
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
    seqs, truncated = [], 0
    for p in prompts:
        ids = encoder.prompt_ids(p)
        if len(ids) > budget:
            ids, truncated = ids[len(ids) - budget :], truncated + 1
        seqs.append(list(ids))
    order = _by_length(engine, [len(s) for s in seqs])
    batch_size = min(batch_size, getattr(engine, "max_decode_rows", None) or batch_size)
    new: list[list[int]] = [[] for _ in prompts]

    def left_pad(rows: list[int]):
        T = max(len(seqs[i]) for i in rows)
        ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, T - len(seqs[i]) :] = torch.tensor(seqs[i])
            mask[r, T - len(seqs[i]) :] = 1
        return ids, mask

    def advance(active: list[int], logits) -> list[int]:
        """Append each active row's greedy token; the rows still going."""
        choice = logits.argmax(-1).tolist()
        still = []
        for r, i in enumerate(active):
            t = int(choice[r])
            if eos is not None and t == eos:
                continue
            new[i].append(t)
            seqs[i].append(t)
            if "\n" not in tok.decode(new[i], skip_special_tokens=True):
                still.append(i)
        return still

    with _bar(len(prompts), progress, "generate") as bar:
        for chunk in _chunks(order, batch_size):
            active = list(chunk)
            if make_decoder is not None:
                dec = make_decoder(*left_pad(active))
                for n in range(max_new_tokens):
                    still = advance(active, dec.logits)
                    if not still or n == max_new_tokens - 1:
                        break
                    if len(still) < len(active):
                        dec.keep([active.index(i) for i in still])
                    active = still
                    dec.step(torch.tensor([seqs[i][-1] for i in active]))
            else:
                for _ in range(max_new_tokens):
                    active = advance(active, next_logits(*left_pad(active)))
                    if not active:
                        break
            bar.update(len(chunk))
    texts = [tok.decode(g, skip_special_tokens=True).split("\n")[0].strip() for g in new]
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
    progress: bool | None = None,
) -> dict:
    """Metrics for ``examples`` (see the module docstring). ``predictions``, if given, receives
    the generated texts of a generation task, the index of the chosen candidate of a classification or
    multiple-choice one. ``progress``: a progress bar on stderr (``None``: only
    on an interactive terminal)."""
    if not examples:
        raise MobizoError("nothing to evaluate: no examples")
    t0 = time.perf_counter()
    metrics = _evaluate(
        engine, kind, examples, encoder, pad_id, max_length, batch_size, max_new_tokens, predictions, progress
    )
    seconds = time.perf_counter() - t0
    metrics["seconds"] = seconds
    metrics["examples_per_second"] = len(examples) / seconds if seconds > 0 else float("inf")
    return metrics


def choice_scores(
    engine,
    kind: str,
    examples: list[Example],
    encoder: Encoder,
    pad_id: int,
    max_length: int,
    batch_size: int,
    progress: bool | None = False,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For each classification / multiple-choice example: (ranking scores, CE sums, token counts) of its
    candidates. The score eval ranks by: the summed log-prob of a label word (classification), the mean
    log-prob per token of a candidate (multiple choice). One prompt row per example when every candidate
    is one token (:func:`can_share_prompt`), else one row per candidate. ``mobizo predict`` reads the same."""
    if can_share_prompt(engine, encoder, examples):
        table, ctable = score_choices(engine, encoder, examples, pad_id, max_length, batch_size, progress)
        per_example = [
            (table[i, : len(ex.candidates)], ctable[i, : len(ex.candidates)]) for i, ex in enumerate(examples)
        ]
    else:
        pairs = [(ex.prompt, cand) for ex in examples for cand in ex.candidates]
        sums, counts = score_pairs(engine, encoder, pairs, pad_id, max_length, batch_size, progress)
        per_example, pos = [], 0
        for ex in examples:
            n = len(ex.candidates)
            per_example.append((sums[pos : pos + n], counts[pos : pos + n]))
            pos += n
    # classification: total log-prob of the label word; multiple choice: per-token mean
    return [((-s if kind == "classification" else -s / c.clamp(min=1)), s, c) for s, c in per_example]


def _evaluate(engine, kind, examples, encoder, pad_id, max_length, batch_size, max_new_tokens, predictions, progress):
    limit = min(max_length, engine.shapes.length) if engine.shapes.length else max_length
    if kind in ("classification", "multiple_choice"):
        correct, gold_ce, gold_tokens = 0, 0.0, 0.0
        for ex, (scores, s, c) in zip(
            examples, choice_scores(engine, kind, examples, encoder, pad_id, max_length, batch_size, progress)
        ):
            pick = int(torch.argmax(scores))
            if predictions is not None:
                predictions.append(pick)
            correct += int(pick == ex.label)
            gold_ce += float(s[ex.label])
            gold_tokens += float(c[ex.label])
        return {
            "accuracy": correct / len(examples),
            "loss": gold_ce / max(gold_tokens, 1.0),
            "n": len(examples),
            "truncated": count_truncated(encoder, examples, limit),
        }
    pairs = [(e.prompt, e.answer) for e in examples]
    sums, counts = score_pairs(engine, encoder, pairs, pad_id, max_length, batch_size, progress)
    loss = float(sums.sum() / counts.sum().clamp(min=1))
    if kind == "generation":
        texts, truncated = generate(
            engine,
            encoder,
            [e.prompt for e in examples],
            pad_id,
            max_length,
            max_new_tokens,
            batch_size,
            progress=progress,
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
