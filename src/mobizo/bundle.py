"""Training bundles: everything the native on-device trainer (``mobizo-train``) needs, no Python.

A bundle is a directory. It is also a valid ``--program`` directory for the Python ExecuTorch
engine (``ExecuTorchEngine(bundle_dir)`` loads it), because it holds the exported program as is:

================== ====================================================================================
file               content
================== ====================================================================================
``train.pte``      the exported training program (``mobizo export``), unchanged
``manifest.json``  its manifest, unchanged (shapes, q, seed, adapter shapes, sha256 of ``train.pte``)
``run.json``       the run: format version, settings, shapes, the arrays below, the log header, the adapter
``input_ids.bin``  int64 (N, R, T): every training example pre-collated, R rows each
``attention_mask.bin`` int64 (N, R, T)
``labels.bin``     int64 (N, R, K): the answer window, -100 where nothing is supervised
``real_rows.bin``  int64 (N,): rows of each example that are real (candidates); the rest are filler
``gold.bin``       int64 (N,): gold candidate index (choice objectives only)
``batches.bin``    int32 (S, B): example indices of step s (1-based) in row s-1 (= ``data.step_indices``)
``schedule.bin``   float64 (S, 2): lr, eps of every step (only when they vary; else ``run.json`` lr/eps)
``tokenizer.json`` the model's tokenizer (Hugging Face ``tokenizers`` format): text on the device (format 2)
================== ====================================================================================

N examples, R = rows per example (the number of candidates C for the choice objectives, else 1),
T = the program's sequence length, K = its answer window, S steps, B examples per step. Arrays are
raw little-endian, row-major, no header; ``run.json`` gives each one's file, dtype, shape and sha256.

``run.json``::

    {"mobizo_bundle": 2, "mobizo_version": "0.1.0",
     "pte_sha256": "<sha256 of train.pte, as in the manifest>",
     "examples": N, "rows_per_example": R, "length": T, "answer_len": K, "batch_size": B, "steps": S,
     "objective": "answer" | "choice-sum" | "choice-mean",
     "lr": 1.0, "eps": 0.05, "save_every": 100, "max_bad_steps": 3,
     "arrays": {"input_ids": {"file": "input_ids.bin", "dtype": "int64", "shape": [N, R, T], "sha256": "..."},
                "attention_mask": {...}, "labels": {...}, "real_rows": {...}, "gold": {...},
                "batches": {"file": "batches.bin", "dtype": "int32", "shape": [S, B], "sha256": "..."}},
     "log_header": "<first line of metrics.jsonl, verbatim: {\\"mobizo_log\\": 1, \\"config\\": ..., ...}>",
     "adapter": {"config": "<adapter_config.json text>",
                 "metadata": {"format": "pt", "r": "8", "lora_alpha": "16.0", "writer": "mobizo"}},
     "text": null | {  # format 2: what mobizo-train needs to tokenize (generate, --data), see text_spec
        "tokenizer": {"file": "tokenizer.json", "sha256": "...", "library": "pytorch-tokenizers 1.0.1",
                      "prefix": [1], "suffix": [], "eos": [2], "special": [0, 1, 2], "pad": 0},
        "chat": null | {"prefix": "...", "suffix": "..."} | {"unsupported": "<why>"},
        "data": null | {"records": "classification" | "multiple_choice" | "prompt_completion",
                        "template": "Review: {text} Sentiment:", "label_words": ["bad", "good"],
                        "max_length": 48, "truncation": "left", "seed": 3},
        "checked": {"texts": 8000}}}

Format 1 (no ``text``, no ``tokenizer.json``) is still read. ``text`` describes the tokenizer beyond
``tokenizer.json``: the special ids its post-processor puts around one sequence (``prefix``, ``suffix``:
``mobizo.data.Encoder``'s ids are ``prefix + ids + suffix``, a trailing EOS dropped), the EOS ids that end
generation, the special ids decoding skips, the pad id; the chat template as the text around one user
message, when it renders a message verbatim; and the task's record format for new training data on the
device (null for a task whose records are read by Python code: the benchmarks). Before a bundle with
``text`` is written, ``mobizo-train tokenize`` (the C++ tokenizer library) encodes and decodes every
training and validation text of the bundle, and any difference from the Python tokenizer refuses the
bundle (``--no-tokenizer`` writes it without ``text``).

Batches are pre-collated per example: sequences are left-padded to the fixed T, so an example's rows
do not depend on the other examples of its batch, and gathering rows gives exactly the batch
``trainer.make_batch`` builds (:func:`gather`; tested). The one exception is a filler row (an
example with fewer candidates than C): ``data.collate`` fills it with the next example's first row
(the first example's, for the last one) and supervises nothing; the gatherer does the same.

The log header is strict JSON (a non-finite setting such as ``max_grad`` = inf is written as null).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .data import IGNORE, Batch, collate, collate_choices, step_indices
from .divergence import POLICIES, constants
from .engines.executorch.manifest import MANIFEST, PROGRAM
from .errors import MobizoError
from .fsio import atomic_write_dir
from .rundir import MARKER, check_replaceable
from .schedule import lr_at
from .step import step_good
from .util import dumps

FORMAT = 2
FORMATS = (1, 2)  # read
TOKENIZER = "tokenizer.json"

RUN = "run.json"
ARRAYS = {  # name -> (file, dtype)
    "input_ids": ("input_ids.bin", "int64"),
    "attention_mask": ("attention_mask.bin", "int64"),
    "labels": ("labels.bin", "int64"),
    "real_rows": ("real_rows.bin", "int64"),
    "gold": ("gold.bin", "int64"),
    "batches": ("batches.bin", "int32"),
    "schedule": ("schedule.bin", "float64"),
}
BUNDLE_ENTRIES = (
    PROGRAM,
    MANIFEST,
    RUN,
    TOKENIZER,
    *(file for file, _ in ARRAYS.values()),
)  # what --overwrite may replace


@dataclass
class BundleData:
    """Pre-collated training examples (see the module docstring for the shapes)."""

    input_ids: torch.Tensor  # (N, R, T) int64
    attention_mask: torch.Tensor  # (N, R, T) int64
    labels: torch.Tensor  # (N, R, K) int64
    real_rows: torch.Tensor  # (N,) int64
    gold: torch.Tensor | None = None  # (N,) int64, choice objectives


def collate_examples(run, length: int, answer_len: int) -> BundleData:
    """Every training example of ``run`` (a :class:`mobizo.build.Run`) collated on its own to
    the program's fixed T = ``length`` and K = ``answer_len``."""
    max_length, pad = run.cfg.data.max_length, run.tokenizer.pad_token_id
    ids, masks, labels, real, gold = [], [], [], [], []
    for ex in run.train:
        if run.objective != "answer":
            encs = [run.encoder(ex.prompt, c) for c in ex.candidates]
            b = collate_choices(
                [encs], [ex.label], run.choices, pad, max_length, length=length, answer_len=answer_len, examples=1
            )
            real.append(1 if b.shared else len(encs))  # a shared-prompt example is one row (labels: candidates)
            gold.append(int(b.gold[0]))
        else:
            b = collate([run.encoder.example(ex)], pad, max_length, length=length, answer_len=answer_len, rows=1)
            real.append(1)
        ids.append(b.input_ids)
        masks.append(b.attention_mask)
        labels.append(b.labels)
    return BundleData(
        torch.stack(ids),
        torch.stack(masks),
        torch.stack(labels),
        torch.tensor(real, dtype=torch.long),
        torch.tensor(gold, dtype=torch.long) if run.objective != "answer" else None,
    )


def batch_indices(n: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """(steps, batch_size) int32: row s-1 holds the examples of step s (:func:`mobizo.data.step_indices`)."""
    rows = [step_indices(n, batch_size, s, seed) for s in range(1, steps + 1)]
    return torch.tensor(rows, dtype=torch.int32).reshape(steps, batch_size)


def adapter_files(
    modules: list[str], rank: int, alpha: float, base_model: str, fan_in_fan_out: bool = False
) -> tuple[str, dict]:
    """(adapter_config.json text, safetensors metadata without sha256) as ``checkpoint.write_adapter`` writes them."""
    from .checkpoint import adapter_config_text, adapter_metadata

    return adapter_config_text(modules, rank, alpha, base_model, fan_in_fan_out), adapter_metadata(rank, alpha)


def _array_bytes(t: torch.Tensor, dtype: str) -> bytes:
    return np.ascontiguousarray(t.detach().cpu().numpy().astype(np.dtype(dtype).newbyteorder("<"))).tobytes()


def write_bundle(
    out_dir: str | Path,
    program_dir: str | Path,
    data: BundleData,
    batches: torch.Tensor,
    *,
    lr: float | list[float],
    eps: float | list[float],
    log_header: dict,
    adapter_config: str,
    adapter_metadata: dict,
    save_every: int = 100,
    max_bad_steps: int = 3,
    divergence: str = "rollback",
    overwrite: bool = False,
    text: DeviceText | None = None,
) -> Path:
    """Write a bundle (format above) into ``out_dir``, atomically.

    ``program_dir`` holds ``train.pte`` + ``manifest.json`` (``mobizo export``); ``data`` the
    pre-collated examples (:func:`collate_examples`); ``batches`` the (steps, batch_size) example
    indices (:func:`batch_indices`); ``lr``/``eps`` a number, or one value per step; ``log_header``
    the first record of metrics.jsonl; ``adapter_config``/``adapter_metadata`` from :func:`adapter_files`;
    ``text``: the tokenizer for the device (:func:`device_text`), checked with ``mobizo-train tokenize``
    before the bundle is committed.
    """
    from .engines.executorch import read_manifest

    program_dir, out = Path(program_dir), Path(out_dir)
    manifest = read_manifest(program_dir)
    pte = program_dir / PROGRAM
    if not pte.is_file():
        raise MobizoError(f"{program_dir} has no {PROGRAM}")
    check_replaceable(out, "bundle", overwrite, entries=BUNDLE_ENTRIES, exclusive=True)
    N, R, T = data.input_ids.shape
    K = data.labels.shape[-1]
    steps, B = batches.shape
    objective = manifest.objective
    choice = objective != "answer"
    want_r = manifest.rows // manifest.batch_size
    if (T, K, B, R) != (manifest.max_length, manifest.label_width, manifest.batch_size, want_r):
        raise MobizoError(
            f"bundle data of shape T={T} K={K} batch={B} rows/example={R} does not fit the program "
            f"(T={manifest.max_length} K={manifest.label_width} batch={manifest.batch_size} "
            f"rows/example={want_r})"
        )
    if (
        tuple(data.attention_mask.shape) != (N, R, T)
        or tuple(data.labels.shape) != (N, R, K)
        or tuple(data.real_rows.shape) != (N,)
        or (choice and (data.gold is None or data.gold.shape != (N,)))
    ):
        raise MobizoError("inconsistent bundle arrays (input_ids, attention_mask, labels, real_rows, gold)")
    if N < 1 or (steps and (int(batches.min()) < 0 or int(batches.max()) >= N)):
        raise MobizoError("batch indices outside the examples (or no examples)")
    if int(data.real_rows.min()) < 1 or int(data.real_rows.max()) > R:
        raise MobizoError(f"real_rows must be within 1..{R}")
    if save_every < 0 or max_bad_steps < 1:
        raise MobizoError("save_every must be >= 0 and max_bad_steps >= 1")
    if divergence not in POLICIES:
        raise MobizoError(f"divergence must be one of {', '.join(POLICIES)}, got {divergence!r}")
    per_step = isinstance(lr, (list, tuple)) or isinstance(eps, (list, tuple))
    if per_step:
        lrs = list(lr) if isinstance(lr, (list, tuple)) else [lr] * steps
        epss = list(eps) if isinstance(eps, (list, tuple)) else [eps] * steps
        if len(lrs) != steps or len(epss) != steps:
            raise MobizoError(f"lr and eps need one value per step ({steps})")
        schedule = torch.tensor([lrs, epss], dtype=torch.float64).T.contiguous()
        values = lrs + epss
    else:
        values = [lr, eps]
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise MobizoError("lr and eps must be positive numbers")

    arrays = {
        "input_ids": data.input_ids,
        "attention_mask": data.attention_mask,
        "labels": data.labels,
        "real_rows": data.real_rows,
        "batches": batches,
    }
    if choice:
        arrays["gold"] = data.gold
    if per_step:
        arrays["schedule"] = schedule
    blobs, specs = {}, {}
    for name, t in arrays.items():
        file, dtype = ARRAYS[name]
        blobs[file] = _array_bytes(t, dtype)
        specs[name] = {
            "file": file,
            "dtype": dtype,
            "shape": list(t.shape),
            "sha256": hashlib.sha256(blobs[file]).hexdigest(),
        }
    header_line = dumps(log_header)
    run = {
        "mobizo_bundle": FORMAT,
        "mobizo_version": __version__,
        "pte_sha256": manifest.pte_sha256,
        "examples": N,
        "rows_per_example": R,
        "length": T,
        "answer_len": K,
        "batch_size": B,
        "steps": steps,
        "objective": objective,
        "lr": float(lrs[0] if per_step else lr),
        "eps": float(epss[0] if per_step else eps),
        "save_every": int(save_every),
        "max_bad_steps": int(max_bad_steps),
        # what the native trainer does when the loss diverges (mobizo.divergence: the policy and its constants)
        "divergence": {"policy": divergence, **constants()},
        "arrays": specs,
        "log_header": header_line,
        "adapter": {"config": adapter_config, "metadata": adapter_metadata},
        "text": text.spec if text is not None else None,
    }

    def write(d: Path) -> None:
        shutil.copyfile(pte, d / PROGRAM)
        shutil.copyfile(program_dir / MANIFEST, d / MANIFEST)
        for file, blob in blobs.items():
            (d / file).write_bytes(blob)
        (d / RUN).write_text(dumps(run, indent=1), encoding="utf-8")
        if text is not None:
            (d / TOKENIZER).write_text(text.tokenizer_json, encoding="utf-8")
            text.check(d)  # before the bundle exists: a tokenizer the device reads otherwise refuses it
        (d / MARKER).write_text(dumps({"mobizo": __version__, "kind": "bundle"}) + "\n", encoding="utf-8")

    atomic_write_dir(out, write)
    return out


def make_bundle(
    cfg, out_dir: str | Path, program: str | Path | None = None, overwrite: bool = False, tokenizer: bool = True
) -> Path:
    """``mobizo bundle``: a bundle for training ``cfg`` (a :class:`mobizo.TrainConfig`) natively.

    Exports the program (or checks that ``program``, a ``mobizo export`` directory, fits ``cfg``),
    collates ``cfg``'s training data and writes the batches of steps 1..``--steps``. ``tokenizer``:
    carry the tokenizer for text on the device (generation, ``--data``), checked against the native
    tokenizer library (mobizo-train is built first, with it, if needed).
    """
    from .build import assemble, export_program, manifest_for_run
    from .devices import check_cpu_float32
    from .engines.executorch import check_manifest, identity, read_manifest
    from .rundir import log_header

    if cfg.optim.lr == "auto":
        raise MobizoError(
            "--lr auto probes learning rates with the Python engines: run `mobizo train --lr auto`, "
            "then bundle with the lr it chose (its summary.json: lr_probe)"
        )
    check_cpu_float32(cfg.engine.device, cfg.engine.dtype, "mobizo bundle")
    # the native trainer pads every batch to --max-length: a program for exactly that length exports quicker
    cfg = cfg.replace(engine="executorch", program=None, fixed_length=True).validate().resolved()
    out = Path(out_dir)
    check_replaceable(out, "bundle", overwrite, entries=BUNDLE_ENTRIES, exclusive=True)  # before any work
    binary = None
    if tokenizer:  # before the export: a build that cannot happen fails in seconds, not after minutes
        from .native import build

        try:
            binary = build()
        except MobizoError as e:
            raise MobizoError(f"{e} (mobizo bundle --no-tokenizer writes a bundle without text on the device)") from e
    run = assemble(cfg)
    cfg = run.cfg  # as assemble resolved it (--threads capped, --max-length)
    manifest = manifest_for_run(run)
    with tempfile.TemporaryDirectory(prefix="mobizo-bundle-") as tmp:
        if program is None:
            program = Path(tmp) / "program"
            manifest = export_program(run, program)
        else:
            check_manifest(read_manifest(Path(program)), identity(manifest))
        o, a = cfg.optim, cfg.adapter
        data = collate_examples(run, manifest.max_length, manifest.answer_len)
        batches = batch_indices(len(run.train), o.batch_size, o.steps, cfg.seed)
        config, meta = adapter_files(manifest.target_modules, a.rank, a.alpha, cfg.model, run.fan_in_fan_out())
        # the per-step lr of --lr-schedule / --warmup-steps goes into schedule.bin (a constant lr stays in run.json)
        lr = (
            o.lr
            if o.lr_schedule == "constant" and not o.warmup_steps
            else [lr_at(s, o.lr, o.steps, o.lr_schedule, o.warmup_steps) for s in range(1, o.steps + 1)]
        )
        return write_bundle(
            out,
            program,
            data,
            batches,
            lr=lr,
            eps=o.eps,
            log_header=log_header(cfg.trajectory(), run.targets),
            adapter_config=config,
            adapter_metadata=meta,
            save_every=cfg.run.save_every,
            max_bad_steps=o.max_bad_steps,
            divergence=cfg.run.divergence,
            overwrite=overwrite,
            text=device_text(run, binary) if tokenizer else None,
        )


# ---------------------------------------------------------------- text on the device (run.json "text")

CHAT_PROBE = "MOBIZOMESSAGE0"  # stands for the user's message while the chat template is rendered
CHAT_CHECKS = ("Hello", "two\nlines", " spaced out ", "{braces} <angles> 'quotes'")


@dataclass
class DeviceText:
    """run.json's ``text`` section, ``tokenizer.json``'s text and the check that the device reads them the same."""

    spec: dict
    tokenizer_json: str
    check: object  # callable(bundle_dir): raises MobizoError on the first text tokenized otherwise


def record_format(run) -> dict | None:
    """How the device reads new training records of ``run``'s task (see the module docstring), or None."""
    from .tasks.custom import CustomClassification, CustomLM, CustomMultipleChoice
    from .tasks.synthetic import LABEL_WORDS, TEMPLATE, SyntheticTask

    task, d = run.task, run.cfg.data
    if isinstance(task, SyntheticTask):
        spec = {"records": "classification", "template": TEMPLATE, "label_words": list(LABEL_WORDS)}
    elif isinstance(task, CustomClassification):
        spec = {"records": "classification", "template": task.template, "label_words": list(task.words)}
    elif isinstance(task, CustomMultipleChoice):
        spec = {"records": "multiple_choice", "template": task.template}
    elif isinstance(task, CustomLM):
        spec = {"records": "prompt_completion"}
    else:
        return None
    return {**spec, "max_length": d.max_length, "truncation": d.truncation, "seed": run.cfg.seed}


def _chat_spec(tokenizer) -> dict | None:
    """The chat template as ``prefix + message + suffix`` (what mobizo.generation.chat_text renders for one
    user message), checked on a few messages; ``{"unsupported": why}`` when it does not render them verbatim."""
    from .generation import chat_text, has_chat_template

    if not has_chat_template(tokenizer):
        return None
    try:
        text = chat_text(tokenizer, [{"role": "user", "content": CHAT_PROBE}])
    except MobizoError as e:
        return {"unsupported": str(e)}
    if text.count(CHAT_PROBE) != 1:
        return {"unsupported": "it does not write a user message once, verbatim"}
    prefix, suffix = text.split(CHAT_PROBE)
    for msg in CHAT_CHECKS:
        if chat_text(tokenizer, [{"role": "user", "content": msg}]) != prefix + msg + suffix:
            return {"unsupported": "it changes the text of a user message"}
    return {"prefix": prefix, "suffix": suffix}


def device_text(run, binary: Path) -> DeviceText:
    """The tokenizer of ``run`` for the device, and the check of it with the native library (``binary``:
    mobizo-train built with it): every training and validation text (prompt + each candidate or answer) must
    give the Python ids (:class:`mobizo.data.Encoder`) and decode to the Python text, and with a chat template,
    the first prompts wrapped in it must give :func:`mobizo.generation.prompt_ids`'s ids."""
    import subprocess

    from .generation import prompt_ids
    from .native import TOKENIZERS_VERSION, has_tokenizer

    tok, enc = run.tokenizer, run.encoder
    backend = getattr(tok, "backend_tokenizer", None)
    no = "mobizo bundle --no-tokenizer writes the bundle without text on the device"
    if backend is None:
        raise MobizoError(f"the tokenizer of {run.cfg.model} is not a Hugging Face 'tokenizers' tokenizer ({no})")
    if not has_tokenizer(binary):
        raise MobizoError(f"{binary} was built without the tokenizer library ({no})")
    tokenizer_json = backend.to_str()
    with_special, plain = enc._ids("a", True), enc._ids("a", False)
    at = next((i for i in range(len(with_special) - len(plain) + 1) if with_special[i : i + len(plain)] == plain), None)
    if not plain or at is None:
        raise MobizoError(f"the post-processor of {run.cfg.model}'s tokenizer rewrites a text's ids ({no})")
    eos = tok.eos_token_id
    chat = _chat_spec(tok)
    spec = {
        "tokenizer": {
            "file": TOKENIZER,
            "sha256": hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest(),
            "library": f"pytorch-tokenizers {TOKENIZERS_VERSION}",
            "prefix": with_special[:at],
            "suffix": with_special[at + len(plain) :],
            "eos": sorted(set(eos)) if isinstance(eos, (list, tuple)) else ([] if eos is None else [int(eos)]),
            # what decode(skip_special_tokens=True) skips: every added token marked special, not only the named ones
            "special": sorted(
                {int(i) for i, t in tok.added_tokens_decoder.items() if t.special} | set(tok.all_special_ids)
            ),
            "pad": int(tok.pad_token_id),
        },
        "chat": chat,
        "data": record_format(run),
    }

    # what the device must reproduce: (probe, Python's ids and text)
    probes, expected, seen = [], [], set()
    for ex in run.train + run.validation:
        for answer in ex.candidates or [ex.answer]:
            if (ex.prompt, answer) in seen:
                continue
            seen.add((ex.prompt, answer))
            e = enc(ex.prompt, answer)
            probes.append({"prompt": ex.prompt, "answer": answer})
            expected.append(
                (e.prompt_ids, e.answer_ids, tok.decode(e.prompt_ids + e.answer_ids, skip_special_tokens=True))
            )
    if chat is not None and "prefix" in chat:
        for ex in run.train[:64]:
            ids = prompt_ids(tok, ex.prompt, chat=True)
            probes.append({"prompt": chat["prefix"] + ex.prompt + chat["suffix"]})
            expected.append((ids, [], tok.decode(ids, skip_special_tokens=True)))
    spec["checked"] = {"texts": len(probes)}

    def check(bundle_dir: Path) -> None:
        lines = "".join(json.dumps(p) + "\n" for p in probes)
        r = subprocess.run(
            [str(binary), "tokenize", str(bundle_dir), "--input", "-"], input=lines, capture_output=True, text=True
        )
        if r.returncode != 0:
            msg = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
            raise MobizoError(f"the native tokenizer cannot run: {msg} ({no})")
        got = [json.loads(line) for line in r.stdout.splitlines()]
        for probe, want, have in zip(probes, expected, got):
            what = (
                "prompt "
                + repr(probe["prompt"][:60])
                + (f" with answer {probe['answer']!r}" if "answer" in probe else "")
            )
            if "error" in have or (have["prompt_ids"], have["answer_ids"]) != (want[0], want[1]):
                found = have.get("error") or f"ids {have['prompt_ids']} + {have['answer_ids']}"
                raise MobizoError(
                    f"the native tokenizer (pytorch-tokenizers {TOKENIZERS_VERSION}) reads {run.cfg.model}'s "
                    f"tokenizer otherwise than the Python one: {what} gives {found}, not {want[0]} + {want[1]} ({no})"
                )
            if have["text"] != want[2]:
                raise MobizoError(
                    f"the native tokenizer (pytorch-tokenizers {TOKENIZERS_VERSION}) decodes {what} to "
                    f"{have['text']!r}, the Python tokenizer to {want[2]!r} ({no})"
                )
        if len(got) != len(probes):
            raise MobizoError(f"the native tokenizer answered {len(got)} of {len(probes)} texts ({no})")

    return DeviceText(spec, tokenizer_json, check)


# ---------------------------------------------------------------- reading a bundle (Python twin of the C++ side)


@dataclass
class Bundle:
    dir: Path
    run: dict
    arrays: dict[str, torch.Tensor]

    @property
    def steps(self) -> int:
        return int(self.run["steps"])

    def lr_eps(self, step: int) -> tuple[float, float]:
        if "schedule" in self.arrays:
            lr, eps = self.arrays["schedule"][step - 1].tolist()
            return lr, eps
        return self.run["lr"], self.run["eps"]


def read_bundle(bundle_dir: str | Path) -> Bundle:
    """Load and verify a bundle's ``run.json`` and arrays (sizes and sha256)."""
    d = Path(bundle_dir)
    path = d / RUN
    if not path.is_file():
        raise MobizoError(f"bundle {d} is missing {RUN}")
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MobizoError(f"{path}: malformed JSON ({e})") from e
    if not isinstance(run, dict) or run.get("mobizo_bundle") not in FORMATS:
        raise MobizoError(f"{path} is not a mobizo bundle (format {' or '.join(map(str, FORMATS))})")
    arrays = {}
    for name, spec in run["arrays"].items():
        f = d / spec["file"]
        if not f.is_file():
            raise MobizoError(f"bundle {d} is missing {spec['file']}")
        blob = f.read_bytes()
        if hashlib.sha256(blob).hexdigest() != spec["sha256"]:
            raise MobizoError(f"{f} is truncated or corrupted (its sha256 does not match {RUN})")
        a = np.frombuffer(blob, dtype=np.dtype(spec["dtype"]).newbyteorder("<")).reshape(spec["shape"])
        arrays[name] = torch.from_numpy(a.astype(np.dtype(spec["dtype"])))
    return Bundle(d, run, arrays)


def gather(bundle: Bundle, step: int) -> Batch:
    """The batch of 1-based ``step``: what ``trainer.make_batch`` builds, from the pre-collated rows."""
    a = bundle.arrays
    idx = a["batches"][step - 1].long()
    B = idx.shape[0]
    _N, R, T = a["input_ids"].shape
    ids, mask, labels = a["input_ids"][idx].clone(), a["attention_mask"][idx].clone(), a["labels"][idx].clone()
    real = a["real_rows"][idx]
    for b in range(B):  # filler rows: the next example's first row, nothing supervised (data.collate)
        nxt = (b + 1) % B
        for r in range(int(real[b]), R):
            ids[b, r], mask[b, r] = ids[nxt, 0], mask[nxt, 0]
            labels[b, r] = IGNORE
    gold = a["gold"][idx].clone() if "gold" in a else None
    return Batch(
        ids.reshape(B * R, T),
        mask.reshape(B * R, T),
        labels.reshape(B * R, -1),
        int(real.sum()),
        gold=gold,
        shared=gold is not None and R == 1,
    )  # one prompt row per example: the shared-prompt layout


def train_python(bundle_dir: str | Path, steps: int | None = None):
    """Drive the bundle through the Python ExecuTorch engine (the reference ``mobizo-train`` must match).

    Returns (metrics records as ``mobizo train`` logs them, raw (2, q) losses per step, final adapter state).
    """
    from .engines.executorch import ExecuTorchEngine

    bundle = read_bundle(bundle_dir)
    engine = ExecuTorchEngine(bundle.dir, fixed_length=True)  # the rows as the native trainer runs them
    max_grad = engine.manifest.max_grad
    records, raw = [], []
    for step in range(1, (bundle.steps if steps is None else steps) + 1):
        lr, eps = bundle.lr_eps(step)
        res = engine.train_step(gather(bundle, step), step, lr, eps)
        rec = {"step": step, "loss": res.loss, "projected_grads": res.projected_grads, "lr": lr, "eps": eps}
        if not step_good(res, max_grad):
            rec["skipped"] = True
        records.append(rec)
        raw.append(res.losses)
    return records, raw, engine.adapter_state()
