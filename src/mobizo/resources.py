"""Resource checks before a run does any work: the batch against the data, the step's memory against
the memory available, ``--threads`` against the cores.

A run that cannot fit used to find out the hard way: ``--batch-size 1000000000`` spent minutes building
batches and allocating activations before ``MemoryError``, and ``--threads 100000`` died creating
threads. :func:`check_memory` estimates the peak of one training step (and of an eval batch) from the
model's config alone, so the check runs before the weights are loaded and before the run directory is
created (:func:`mobizo.build.assemble` calls it as soon as the config and tokenizer are read).

The estimate (:func:`forward_bytes`) counts the tensors alive at the peak of one forward over ``rows``
sequences of ``tokens`` tokens, in the model's float dtype:

* the residual stream, its normalised copy and the block's output: ``3 x hidden`` per token;
* plus the larger of the attention block (q, the rotary embedding's temporaries, k/v repeated to every
  head: ``5 x heads x head_dim + 2 x kv_heads x head_dim``) and the MLP (gate, up, the activation and the
  product: ``4 x intermediate``; ``2 x`` for a non-gated MLP) per token;
* the attention scores and probabilities, ``2 x rows x heads x tokens^2``, when the attention is eager;
  SDPA never materialises them, only the ``rows x tokens^2`` mask;
* the logits of the answer window and their log-softmax: ``2 x rows x answer x vocab``;

times :data:`SLACK` for the allocator and the step's small tensors (noise, B's copies, LoRA's ``xA``).
A ZO step runs its forwards under ``no_grad``: a layer's temporaries are freed before the next layer
runs, so the peak does not grow with the number of layers (measured on tiny: 2 -> 8 layers, +12%). The
first-order baseline keeps every layer's activations for the backward pass: ``layers x`` the per-layer
saved tensors. tests/test_resources.py measures the peak of the step on tiny against the estimate.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

from .errors import MobizoError

# model types whose MLP is one up projection and an activation (no gate)
NON_GATED = ("gpt2", "opt", "gpt_neox", "phi", "falcon", "bloom", "gptj")
# the allocator's overhead and the step's small tensors, over the tensors counted: with it, the measured
# peaks of steps on tiny are 0.86-1.15x the estimate (tests/test_resources.py)
SLACK = 1.3


@dataclass(frozen=True)
class Dims:
    """What the memory of a forward depends on, read off a transformers config."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated: bool = True  # SwiGLU / GeGLU MLP (gate and up projections), else one up projection
    eager_attention: bool = False  # scores materialised (rows x heads x T x T), not SDPA
    dtype_bytes: int = 4  # mobizo loads models in float32

    @classmethod
    def of(cls, config) -> Dims | None:
        """The dims of a transformers config (the text model's, for a multimodal one); None when it lacks them."""
        get_text = getattr(config, "get_text_config", None)
        c = get_text() if callable(get_text) else config
        hidden, layers = getattr(c, "hidden_size", None), getattr(c, "num_hidden_layers", None)
        heads, vocab = getattr(c, "num_attention_heads", None), getattr(c, "vocab_size", None)
        if not all(isinstance(v, int) and v > 0 for v in (hidden, layers, heads, vocab)):
            return None
        kv = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or hidden // heads
        inter = next(
            (v for v in (getattr(c, n, None) for n in ("intermediate_size", "ffn_dim", "n_inner")) if v), 4 * hidden
        )
        gated = getattr(c, "model_type", "") not in NON_GATED
        attn = getattr(c, "_attn_implementation", None) or "sdpa"  # transformers' default on CPU
        return cls(hidden, layers, heads, int(kv), int(head_dim), int(inter), vocab, gated, attn != "sdpa")


def forward_bytes(d: Dims, rows: int, tokens: int, answer: int, backward: bool = False) -> int:
    """Peak bytes of one forward over ``rows`` x ``tokens`` (see the module docstring); ``backward``: the
    first-order baseline's forward + backward, which keeps every layer's activations."""
    q_dim, kv_dim = d.heads * d.head_dim, d.kv_heads * d.head_dim
    stream = 3 * d.hidden
    attn = 5 * q_dim + 2 * kv_dim
    mlp = (4 if d.gated else 2) * d.intermediate
    per_token = stream + max(attn, mlp)
    square = rows * tokens * tokens * (2 * d.heads if d.eager_attention else 1)
    logits = 2 * rows * answer * d.vocab
    floats = rows * tokens * per_token + square + logits
    if backward:  # saved for the backward pass, in every layer: the linears' inputs, norms, attention, MLP
        saved = rows * tokens * (4 * d.hidden + 3 * q_dim + 2 * kv_dim + (3 if d.gated else 2) * d.intermediate)
        floats += d.layers * (saved + square) + logits
    return int(floats * d.dtype_bytes * SLACK)


def step_rows(estimator: str, queries: int, batch_size: int, data_mode: str, rows_per_example: int = 1) -> int:
    """Rows of the largest forward of one step, per the estimator's plan (:func:`mobizo.step.forward_plan`):
    prge runs 2q copies of the batch at once, prge-outer q, mezo and fo one; in ``split`` mode each
    direction's copy holds 1/q of the batch."""
    copies = {"prge": 2 * queries, "prge-outer": queries}.get(estimator, 1)
    per_copy = math.ceil(batch_size / queries) if data_mode == "split" and estimator != "fo" else batch_size
    return copies * per_copy * rows_per_example


def available_memory() -> int | None:
    """Bytes the system can give this process now without swapping (``psutil.virtual_memory().available``)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil missing or unable to tell: no check
        return None


def gib(n: float) -> str:
    """Bytes for a person: ``512 MiB``, ``2.7 GiB``, ``5792 TiB``."""
    if n >= 2**40:
        return f"{n / 2**40:.0f} TiB"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_memory(need: int, what: str, hint: str, available: int | None = None) -> None:
    """Refuse with one line when ``need`` bytes exceed the memory available."""
    free = available_memory() if available is None else available
    if free is not None and need > free:
        raise MobizoError(f"{what} needs about {gib(need)} of memory, and {gib(free)} is available ({hint})")


def cap_threads(threads: int | None) -> int | None:
    """``--threads`` capped at the CPUs this process may run on, with a warning (more threads than cores
    only wait on each other; a huge count exhausts memory creating them)."""
    from .threads import allowed_cpus

    cores = allowed_cpus()
    if threads is not None and threads > cores:
        print(
            f"mobizo: warning: --threads {threads} exceeds the {cores} CPUs this process may use; using {cores}",
            file=sys.stderr,
        )
        return cores
    return threads


def warn_batch(batch_size: int, examples: int) -> None:
    """A batch larger than the training set repeats examples within every step: more work, no better estimate."""
    if batch_size > examples:
        print(
            f"mobizo: warning: --batch-size {batch_size} exceeds the {examples} training examples: every step "
            f"repeats examples within its batch (use --batch-size {examples} or less)",
            file=sys.stderr,
        )
