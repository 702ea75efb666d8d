"""Fast eval: greedy generation with a KV cache gives the uncached loop's texts; length-sorted batches
score like unsorted ones; metrics report examples/s."""

import torch

from mobizo.data import Encoder
from mobizo.engines.eager import EagerEngine
from mobizo.mplora import inject, lora_layers


def _engine(model):
    inject(model, ["q_proj", "v_proj"], 4, 8.0, 0)
    g = torch.Generator().manual_seed(2)
    for _, layer in lora_layers(model):
        layer.lora_B.copy_(0.2 * torch.randn(layer.lora_B.shape, generator=g))
    return EagerEngine(model, None)


PROMPTS = [
    "Q: what is the capital of France? A:",
    "hi",
    "Review: the movie was great, I loved it. Sentiment:",
    "Title: Food\nContext: Ann ate the soup at noon.\nQuestion: What did Ann eat?\nAnswer:",
    "x y z",
]


def test_kv_cache_generation_gives_the_uncached_texts(tiny):
    from mobizo.evaluation import generate

    model, tok = tiny
    engine, enc = _engine(model), Encoder(tok)
    for batch_size in (2, 8):
        cached, n1 = generate(engine, enc, PROMPTS, tok.pad_token_id, 64, max_new_tokens=12, batch_size=batch_size)
        plain, n2 = generate(
            engine, enc, PROMPTS, tok.pad_token_id, 64, max_new_tokens=12, batch_size=batch_size, use_cache=False
        )
        assert cached == plain and n1 == n2 == 0
    assert any(len(t) > 3 for t in cached)
    # truncated prompts (budget = max_length - max_new_tokens) too
    cached, n1 = generate(engine, enc, PROMPTS, tok.pad_token_id, 16, max_new_tokens=6, batch_size=3)
    plain, n2 = generate(engine, enc, PROMPTS, tok.pad_token_id, 16, max_new_tokens=6, batch_size=3, use_cache=False)
    assert cached == plain and n1 == n2 > 0


def test_kv_decoder_matches_full_forwards_after_dropping_rows(tiny):
    model, tok = tiny
    engine = _engine(model)
    seqs = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    T = max(map(len, seqs))
    ids = torch.full((3, T), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, T - len(s) :], mask[r, T - len(s) :] = torch.tensor(s), 1
    dec = engine.decoder(ids, mask)
    rows = [0, 1, 2]
    for n, keep in enumerate([None, [0, 2], None, [1]]):
        if keep is not None:
            dec.keep(keep)
            rows = [rows[k] for k in keep]
        nxt = [7 + n + r for r in rows]
        for r, t in zip(rows, nxt):
            seqs[r] = seqs[r] + [t]
        got = dec.step(torch.tensor(nxt))
        L = max(len(seqs[r]) for r in rows)
        full = torch.full((len(rows), L), tok.pad_token_id)
        fmask = torch.zeros_like(full)
        for i, r in enumerate(rows):
            full[i, L - len(seqs[r]) :], fmask[i, L - len(seqs[r]) :] = torch.tensor(seqs[r]), 1
        torch.testing.assert_close(got, engine.next_token_logits(full, fmask), rtol=1e-4, atol=1e-4)


def test_length_sorted_scoring_and_speed_metrics(tiny):
    from mobizo.evaluation import evaluate, score_pairs
    from mobizo.tasks import Example

    model, tok = tiny
    engine, enc = _engine(model), Encoder(tok)
    pairs = [(p, " good") for p in PROMPTS] * 3
    sums, counts = score_pairs(engine, enc, pairs, tok.pad_token_id, 64, batch_size=4)
    for i, pair in enumerate(pairs[:5]):
        s, c = score_pairs(engine, enc, [pair], tok.pad_token_id, 64, batch_size=1)
        torch.testing.assert_close(sums[i], s[0], rtol=1e-5, atol=1e-5)
        assert counts[i] == c[0]
    exs = [Example(prompt=p, target=" good") for p in PROMPTS]
    m = evaluate(engine, "lm", exs, enc, tok.pad_token_id, 64, batch_size=2, progress=False)
    assert m["n"] == 5 and m["examples_per_second"] > 0 and m["seconds"] > 0
