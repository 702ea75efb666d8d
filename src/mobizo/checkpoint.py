"""Adapters in PEFT format and resumable checkpoints, written atomically.

* ``adapter/``: ``adapter_config.json`` (the fields of a ``peft.LoraConfig``) and
  ``adapter_model.safetensors`` with PEFT's key names
  (``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``), so
  ``peft.PeftModel.from_pretrained(base, "adapter/")`` loads it. The
  safetensors metadata carries a sha256 of the tensors, checked on load.
* ``checkpoint/``: the same adapter plus ``state.json`` (step, run config) and,
  for the first-order baseline, ``optimizer.pt`` (loaded with weights_only); ``SHA256SUMS``, written
  last, holds the sha256 of every other file's bytes (``sha256sum`` format: ``sha256sum -c SHA256SUMS``
  checks it too), and loading verifies them.

Checkpoint formats (``checkpoint_format`` in ``state.json``): 2 is the one written, described above. 1 (legacy,
before ``SHA256SUMS``; no ``checkpoint_format``) kept a sha256 of the canonical JSON of ``state.json``
(``json.dumps(state, sort_keys=True)``) inside it, which made the native trainer reproduce Python's
``json.dumps`` byte for byte; it is still read and resumed (:func:`_state_sha256`).

Every directory is written with :func:`mobizo.fsio.atomic_write_dir` (to a temporary sibling, fsync'ed
and renamed into place), so a kill at any moment leaves either the old or the new version; the scratch
entries a kill can leave behind, and how readers resolve them, are described in :mod:`mobizo.fsio`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import torch

from .errors import MobizoError
from .fsio import atomic_write_dir, resolve_dir
from .util import dumps, file_sha256

PEFT_PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
STATE = "state.json"


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- PEFT adapters

# PEFT LoRA options that change what an adapter computes and that mobizo does not implement:
# an adapter using them would be evaluated wrongly, so it is refused.
_UNSUPPORTED = {
    "use_rslora": False,
    "use_dora": False,
    "lora_bias": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layer_replication": None,
    "bias": "none",
}


_MOBIZO_META = ("sha256", "r", "lora_alpha", "writer")


def _peft_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{PEFT_PREFIX}{k}.weight": v.detach().contiguous().cpu() for k, v in state.items()}


def adapter_config(modules, rank: int, alpha: float, base_model: str, fan_in_fan_out: bool = False) -> dict:
    """``adapter_config.json`` of a mobizo adapter: a ``peft.LoraConfig`` (LoRA on ``modules``, no dropout
    or bias), its every field that is not PEFT's default spelled out, plus the options mobizo refuses at
    their defaults. Written without importing PEFT: importing it costs a run ~190 MiB resident
    (transformers, ``torch._dynamo``), which a run on an ExecuTorch program otherwise never pays;
    ``PeftModel.from_pretrained`` fills the rest with its defaults (tests/test_train.py pins the two equal)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(set(modules)),
        "lora_dropout": 0.0,
        "fan_in_fan_out": bool(fan_in_fan_out),
        "init_lora_weights": True,
        "inference_mode": False,
        **_UNSUPPORTED,
    }


def adapter_config_text(modules, rank: int, alpha: float, base_model: str, fan_in_fan_out: bool = False) -> str:
    """:func:`adapter_config` as the JSON text written (sorted keys, like PEFT's own files)."""
    return json.dumps(adapter_config(modules, rank, alpha, base_model, fan_in_fan_out), indent=2, sort_keys=True)


def adapter_metadata(rank: int, alpha: float) -> dict:
    """The safetensors metadata mobizo writes (plus ``sha256`` of the tensors, added by the writer)."""
    return {"format": "pt", "r": str(rank), "lora_alpha": repr(float(alpha)), "writer": "mobizo"}


def write_adapter(
    directory: Path,
    state: dict[str, torch.Tensor],
    rank: int,
    alpha: float,
    base_model: str,
    fan_in_fan_out: bool | None = None,
) -> None:
    """Write a PEFT LoRA adapter (config + safetensors) into an existing directory.

    ``fan_in_fan_out``: the adapted layers are ``Conv1D`` (GPT-2); None: read off ``base_model``'s
    config.json (:func:`mobizo.archs.adapter_fan_in_fan_out`). The tensors are the same either way.
    """
    from .archs import adapter_fan_in_fan_out

    if fan_in_fan_out is None:
        fan_in_fan_out = adapter_fan_in_fan_out(base_model)
    modules = sorted({k.rsplit(".", 1)[0] for k in state})
    (Path(directory) / CONFIG).write_text(
        adapter_config_text(modules, rank, alpha, base_model, fan_in_fan_out), encoding="utf-8"
    )
    tensors = _peft_tensors(state)
    meta = {"format": "pt", "sha256": tensors_sha256(tensors), **adapter_metadata(rank, alpha)}
    (Path(directory) / WEIGHTS).write_bytes(safetensors_bytes(tensors, meta))


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """``tensors`` and ``metadata`` as a safetensors file whose bytes depend on nothing else.

    safetensors serializes the metadata from a Rust ``HashMap``, whose iteration order is seeded at
    random per process: the same adapter written by two processes (a resumed run and an uninterrupted
    one) differed in the order of its metadata keys. The header is rewritten with the keys sorted; it
    keeps its length (the same keys and values), so the tensors' offsets and data stay as written."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > n:  # (cannot happen: the same JSON in another order; never write a wrong file)
        raise MobizoError(f"safetensors header of {len(text)} bytes does not fit the {n} written")
    return data[:8] + text.ljust(n, b" ") + data[8 + n :]


def save_adapter(
    directory: Path, state, rank: int, alpha: float, base_model: str, fan_in_fan_out: bool | None = None
) -> None:
    atomic_write_dir(Path(directory), lambda d: write_adapter(d, state, rank, alpha, base_model, fan_in_fan_out))


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_adapter_config(config, where: Path) -> None:
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise MobizoError(f"{where}: not a LoRA adapter config")
    r = config.get("r")
    if not _positive_number(r) or int(r) != r or r > 1 << 20:
        raise MobizoError(f"{where}: missing or invalid 'r' (a positive integer), got {r!r}")
    if not _positive_number(config.get("lora_alpha")):
        alpha = config.get("lora_alpha")
        raise MobizoError(f"{where}: missing or invalid 'lora_alpha' (a positive number), got {alpha!r}")
    for key, default in _UNSUPPORTED.items():
        if key in config and config[key] not in (default, None):
            raise MobizoError(f"{where}: {key}={config[key]!r} is not supported by mobizo (only plain LoRA)")
    # fan_in_fan_out only says the base layer stores its weight (in, out) (GPT-2's Conv1D): A and B
    # keep their (r, in) / (out, r) shapes, PEFT sets it per layer type on load, and so does mobizo.
    if not isinstance(config.get("fan_in_fan_out", False), (bool, type(None))):
        raise MobizoError(f"{where}: fan_in_fan_out={config['fan_in_fan_out']!r} is not a boolean")


def read_adapter(directory: str | Path, require_checksum: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(state keyed like :func:`mobizo.mplora.adapter_state`, adapter_config dict) from a PEFT adapter dir.

    Verifies the checksum mobizo writes (required with ``require_checksum``),
    that config and tensors agree (rank, alpha), shapes pair up and values are finite.
    """
    from safetensors import SafetensorError, safe_open

    d = resolve_dir(Path(directory))  # during a swap, the complete previous version
    if d is None:
        raise MobizoError(f"adapter directory {directory} does not exist")
    cfg_path, w_path = d / CONFIG, d / WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise MobizoError(f"{d} is not a PEFT adapter directory (needs {CONFIG} and {WEIGHTS})")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise MobizoError(f"{cfg_path}: malformed JSON ({_one_line(e)})") from e
    except OSError as e:
        raise MobizoError(f"{cfg_path}: unreadable ({e.strerror or e})") from e
    _check_adapter_config(config, cfg_path)
    try:
        with safe_open(str(w_path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError, MemoryError) as e:
        raise MobizoError(f"{w_path}: unreadable safetensors file ({_one_line(e)})") from e
    # Any of mobizo's metadata keys means mobizo wrote the file, so its checksum must be there too
    # (a corrupted header must not turn the check off).
    if "sha256" in meta or require_checksum or any(k in meta for k in _MOBIZO_META):
        if "sha256" not in meta:
            raise MobizoError(f"{w_path}: no checksum in the metadata (corrupted, or not written by mobizo)")
        if meta["sha256"] != tensors_sha256(tensors):
            raise MobizoError(f"{w_path}: checksum mismatch (the file is corrupted)")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    if "r" in meta and meta["r"] != str(r):
        raise MobizoError(f"{cfg_path}: r={r} but the weights were saved with r={meta['r']} (mismatched files)")
    if "lora_alpha" in meta and meta["lora_alpha"] != repr(alpha):
        raise MobizoError(
            f"{cfg_path}: lora_alpha={alpha} but the weights were saved with lora_alpha={meta['lora_alpha']} "
            "(mismatched files)"
        )
    state = {}
    for k, v in tensors.items():
        if not (k.startswith(PEFT_PREFIX) and k.endswith(".weight") and (".lora_A" in k or ".lora_B" in k)):
            raise MobizoError(f"{w_path}: unexpected tensor {k!r} (only LoRA A/B weights are supported)")
        name = k[len(PEFT_PREFIX) : -len(".weight")]
        name = name.replace(".lora_A.default", ".lora_A").replace(".lora_B.default", ".lora_B")
        if not name.endswith((".lora_A", ".lora_B")) or name in state:
            raise MobizoError(f"{w_path}: unexpected tensor {k!r} (only LoRA A/B weights are supported)")
        if v.dtype == torch.bool or v.is_complex():
            raise MobizoError(f"{w_path}: tensor {k!r} has dtype {v.dtype}, expected floating point")
        v = v if v.is_floating_point() else v.to(torch.float32)
        if v.dim() != 2:
            raise MobizoError(f"{w_path}: tensor {k!r} has shape {tuple(v.shape)}, expected a matrix")
        if not bool(torch.isfinite(v).all()):
            raise MobizoError(f"{w_path}: tensor {k!r} has non-finite values")
        state[name] = v
    if not state:
        raise MobizoError(f"{w_path}: no LoRA tensors")
    for name in {k.rsplit(".", 1)[0] for k in state}:
        a, b = state.get(f"{name}.lora_A"), state.get(f"{name}.lora_B")
        if a is None or b is None:
            raise MobizoError(f"{w_path}: {name} has only one of lora_A / lora_B")
        if a.shape[0] != r or b.shape[1] != r:
            raise MobizoError(
                f"{w_path}: {name} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                f"which do not match r={r} of {cfg_path.name}"
            )
    _check_targets(config.get("target_modules"), sorted({k.rsplit(".", 1)[0] for k in state}), cfg_path)
    return state, config


def _targets(modules: list[str]) -> str:
    """Module names as a short list: their last components (``q_proj, v_proj``), as PEFT users write them."""
    return ", ".join(sorted({m.rsplit(".", 1)[-1] for m in modules}))


def _check_targets(targets, modules: list[str], cfg_path: Path) -> None:
    """The adapter's tensors must sit on modules its config's ``target_modules`` name, as PEFT matches them
    (a list: the module's name or a ``.``-separated suffix of it; a string: a regex of the whole name;
    ``all-linear`` or none: any): PEFT ignores a tensor on a module its config does not target, so such
    an adapter would score differently in PEFT than in mobizo (mismatched files)."""
    if targets is None or targets == "all-linear":
        return
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except (re.error, RecursionError, OverflowError) as e:
            raise MobizoError(f"{cfg_path}: target_modules {targets!r} is not a valid regex ({_one_line(e)})") from e
        outside = [m for m in modules if not pattern.fullmatch(m)]
        named = repr(targets)
    elif isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        names = set(targets)
        outside = [m for m in modules if m not in names and not any(m.endswith("." + t) for t in names)]
        named = _targets(targets) if targets else "no modules"
    else:
        raise MobizoError(f"{cfg_path}: target_modules must be a list of module names or a regex, got {targets!r}")
    if outside:
        raise MobizoError(
            f"{cfg_path}: target_modules names {named}, but the weights adapt {_targets(outside)} "
            "(mismatched files: PEFT would ignore those tensors)"
        )


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ---------------------------------------------------------------- checkpoints

OPTIMIZER = "optimizer.pt"  # the first-order baseline's torch optimizer
ZO_STATE = "zo_state.safetensors"  # a stateful ZO update rule's buffers (mobizo.zo_optim), checksummed like adapters
ROLLBACK = "rollback.safetensors"  # the adapter and rule state of the last healthy point before this checkpoint
SUMS = "SHA256SUMS"  # sha256 of each file's bytes, as `sha256sum` writes them (format 2)
CHECKPOINT_FORMAT = 2
# the files a checkpoint may hold, each read by some loader: each one present must be listed in SHA256SUMS
CHECKPOINT_FILES = (STATE, CONFIG, WEIGHTS, ZO_STATE, ROLLBACK, OPTIMIZER)
_SUMS_LINE = re.compile(r"([0-9a-f]{64}) [ *]([^/\\\x00]+)")  # "<hex>  <name>" ("*": binary mode); a plain name


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def save_checkpoint(
    directory: Path,
    adapter_state,
    rank,
    alpha,
    base_model,
    state: dict,
    optimizer=None,
    fan_in_fan_out: bool | None = None,
    rollback: dict[str, torch.Tensor] | None = None,
) -> None:
    """Adapter + ``state.json`` (+ the optimizer's state: ``zo_state.safetensors`` for a ZO rule, ``optimizer.pt``
    for the first-order baseline, its presence or sha256 recorded in the state; + ``rollback.safetensors``: the
    tensors of an earlier healthy point a divergence rollback returns to, :mod:`mobizo.divergence`) + ``SHA256SUMS``
    over all of them, swapped in atomically."""

    def write(d: Path) -> None:
        write_adapter(d, adapter_state, rank, alpha, base_model, fan_in_fan_out)
        st = {k: v for k, v in state.items() if k != "sha256"}
        st["checkpoint_format"] = CHECKPOINT_FORMAT
        if rollback:
            _save_tensors(d / ROLLBACK, rollback)
        if _is_tensor_dict(optimizer):
            _save_tensors(d / ZO_STATE, optimizer)
            st["zo_state"] = True
        elif optimizer is not None:
            torch.save(optimizer, d / OPTIMIZER)
            st["optimizer_sha256"] = file_sha256(d / OPTIMIZER)[1]
        (d / STATE).write_text(dumps(st, indent=1, sort_keys=True), encoding="utf-8")
        write_sums(d)  # last: over the bytes as written (the directory swap makes the whole atomic)

    atomic_write_dir(Path(directory), write)


def sums_text(digests: dict[str, str]) -> str:
    """``SHA256SUMS``: one ``<hex>  <name>`` line per file, sorted by name (what ``sha256sum`` prints)."""
    return "".join(f"{digests[name]}  {name}\n" for name in sorted(digests))


def write_sums(d: Path) -> None:
    """``SHA256SUMS`` over every other file of the (scratch) checkpoint directory ``d``."""
    files = [p for p in Path(d).iterdir() if p.is_file() and p.name != SUMS]
    (Path(d) / SUMS).write_text(sums_text({p.name: file_sha256(p)[1] for p in files}), encoding="utf-8")


def read_sums(d: Path) -> dict[str, str] | None:
    """``{name: sha256}`` from a checkpoint's ``SHA256SUMS``; None when it has none (format 1)."""
    path = Path(d) / SUMS
    if not path.exists():
        return None
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MobizoError(f"{path}: unreadable ({_one_line(e)})") from e
    if not text.endswith("\n"):  # (also an empty file: a checkpoint always lists its files)
        raise MobizoError(f"{path}: truncated (the file is corrupted)")
    sums: dict[str, str] = {}
    for n, line in enumerate(text.split("\n")[:-1], 1):  # lines end at "\n" only, as for sha256sum
        m = _SUMS_LINE.fullmatch(line)
        if m is None or m.group(2) in sums:
            raise MobizoError(f"{path}: malformed line {n} (the file is corrupted)")
        sums[m.group(2)] = m.group(1)
    return sums


def _check_listed(d: Path, sums: dict[str, str], name: str) -> None:
    path = Path(d) / name
    if name not in sums:
        raise MobizoError(f"{Path(d) / SUMS}: {name} is not listed (the file is corrupted)")
    if not path.is_file():
        raise MobizoError(f"{path}: missing")
    if file_sha256(path)[1] != sums[name]:
        raise MobizoError(f"{path}: checksum mismatch (the file is corrupted)")


def verify_sums(d: Path, sums: dict[str, str]) -> None:
    """Every file ``SHA256SUMS`` lists is there with those bytes, and it lists every file a loader reads
    (``state.json`` and the adapter always, the others when present)."""
    d = Path(d)
    required = {STATE, CONFIG, WEIGHTS} | {n for n in CHECKPOINT_FILES if (d / n).exists()}
    for name in sorted(required | set(sums)):
        _check_listed(d, sums, name)


def _state_sha256(state: dict) -> str:
    """Legacy (checkpoint format 1): sha256 of the canonical JSON of a state (without its own ``sha256``)."""
    body = {k: v for k, v in state.items() if k != "sha256"}
    return hashlib.sha256(dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def read_state(d: Path, require_checksum: bool = True) -> dict:
    """A checkpoint's ``state.json``: checksum verified (its bytes against ``SHA256SUMS``; a format-1 checkpoint's
    embedded sha256), then validated (format, step, config, counters)."""
    path = Path(d) / STATE
    sums = read_sums(d)
    if sums is not None:
        _check_listed(d, sums, STATE)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise MobizoError(f"{path}: unreadable checkpoint state ({_one_line(e)})") from e
    if not isinstance(state, dict):
        raise MobizoError(f"{path}: checkpoint state is not a JSON object")
    fmt = state.get("checkpoint_format", 1)
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise MobizoError(f"{path}: invalid checkpoint_format {fmt!r} in the checkpoint state")
    if fmt > CHECKPOINT_FORMAT:
        raise MobizoError(
            f"{path}: checkpoint format {fmt} is newer than this mobizo reads ({CHECKPOINT_FORMAT}): upgrade mobizo"
        )
    if sums is None and fmt > 1:
        raise MobizoError(f"{Path(d) / SUMS}: missing")
    if sums is None and ("sha256" in state or require_checksum):  # legacy: format 1 checksummed its canonical JSON
        try:
            ok = state.get("sha256") == _state_sha256(state)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise MobizoError(f"{path}: checksum mismatch (the file is corrupted)")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise MobizoError(f"{path}: invalid step {step!r} in the checkpoint state")
    if not isinstance(state.get("config", {}), dict):
        raise MobizoError(f"{path}: invalid run config in the checkpoint state")
    settings = state.get("settings", {})
    if not isinstance(settings, dict) or not all(
        v is None or isinstance(v, (int, str))
        for v in settings.values()  # ints, bools, paths
    ):
        raise MobizoError(f"{path}: invalid settings in the checkpoint state")
    for key in ("skipped_steps",):
        v = state.get(key, 0)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= step:
            raise MobizoError(f"{path}: invalid {key} {v!r} in the checkpoint state")
    return state


def load_checkpoint(directory: Path):
    """(adapter state, adapter config, run state, optimizer state or None), every file verified."""
    d = resolve_dir(directory)
    if d is None:
        raise MobizoError(f"no checkpoint in {directory} to resume from")
    hint = " (rebuild the adapter from metrics.jsonl with `mobizo replay`, or start again with --overwrite)"
    try:
        state = read_state(d)
        adapter, config = read_adapter(d, require_checksum=True)  # a damaged file's own error first (truncated...)
        optimizer = None
        opt = d / OPTIMIZER
        if (d / ZO_STATE).is_file() or state.get("zo_state"):
            optimizer = _read_zo_state(d / ZO_STATE)
        sums = read_sums(d)
        if sums is not None:
            verify_sums(d, sums)  # every file's bytes, before optimizer.pt is unpickled
        if optimizer is None and (opt.is_file() or "optimizer_sha256" in state):
            if not opt.is_file():
                raise MobizoError(f"{opt}: missing")
            if state.get("optimizer_sha256") != file_sha256(opt)[1]:
                raise MobizoError(f"{opt}: checksum mismatch (the file is corrupted)")
            try:
                optimizer = torch.load(opt, weights_only=True)
            except Exception as e:  # unpickling errors come in many types
                raise MobizoError(f"{opt}: unreadable ({_one_line(e)})") from e
    except MobizoError as e:
        raise MobizoError(f"cannot resume: {e}{hint}") from e
    return adapter, config, state, optimizer


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt", "sha256": tensors_sha256(tensors)})


def read_rollback(directory: Path) -> dict[str, torch.Tensor]:
    """The rollback point's tensors a checkpoint holds (``state.json`` says so), checksum verified."""
    d = resolve_dir(directory)
    if d is None:
        raise MobizoError(f"no checkpoint in {directory}")
    return _read_zo_state(d / ROLLBACK)


def _read_zo_state(path: Path) -> dict[str, torch.Tensor]:
    """Tensors written by :func:`_save_tensors` (a ZO rule's state, a rollback point), checksum verified
    (shapes and values: the engine checks them)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise MobizoError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError, MemoryError) as e:
        raise MobizoError(f"{path}: unreadable safetensors file ({_one_line(e)})") from e
    if meta.get("sha256") != tensors_sha256(tensors):
        raise MobizoError(f"{path}: checksum mismatch (the file is corrupted)")
    return tensors
