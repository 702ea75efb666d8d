"""Adapters in PEFT format and resumable checkpoints, written atomically.

* ``adapter/``: ``adapter_config.json`` (written by ``peft.LoraConfig``) and
  ``adapter_model.safetensors`` with PEFT's key names
  (``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``), so
  ``peft.PeftModel.from_pretrained(base, "adapter/")`` loads it. The
  safetensors metadata carries a sha256 of the tensors, checked on load.
* ``checkpoint/``: the same adapter plus ``state.json`` (step, run config) and,
  for the first-order baseline, ``optimizer.pt`` (loaded with weights_only).

Every directory is written to a temporary sibling, fsync'ed and renamed into
place, so a kill at any moment leaves either the old or the new version.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from .errors import MobizoError

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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(root))


def atomic_write_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmpdir)`` then swap ``tmpdir`` into ``target`` (old version kept until the swap)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; use the usual permissions
        write(tmp)
        _fsync_tree(tmp)
        old = target.parent / f".{target.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def resolve_dir(target: Path) -> Path | None:
    """``target``, or its ``.old`` twin if a kill struck between the two renames of a swap."""
    target = Path(target)
    if target.is_dir():
        return target
    old = target.parent / f".{target.name}.old"
    return old if old.is_dir() else None


# ---------------------------------------------------------------- PEFT adapters


def _peft_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{PEFT_PREFIX}{k}.weight": v.detach().contiguous().cpu() for k, v in state.items()}


def write_adapter(directory: Path, state: dict[str, torch.Tensor], rank: int, alpha: float, base_model: str) -> None:
    """Write a PEFT LoRA adapter (config + safetensors) into an existing directory."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    modules = sorted({k.rsplit(".", 1)[0] for k in state})
    LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=modules,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    ).save_pretrained(str(directory))
    tensors = _peft_tensors(state)
    save_file(tensors, str(Path(directory) / WEIGHTS), metadata={"format": "pt", "sha256": tensors_sha256(tensors)})


def save_adapter(directory: Path, state, rank: int, alpha: float, base_model: str) -> None:
    atomic_write_dir(Path(directory), lambda d: write_adapter(d, state, rank, alpha, base_model))


def read_adapter(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state keyed like :func:`mobizo.mplora.adapter_state`, adapter_config dict) from a PEFT adapter dir."""
    from safetensors import SafetensorError, safe_open

    d = Path(directory)
    if not d.is_dir():
        raise MobizoError(f"adapter directory {d} does not exist")
    cfg_path, w_path = d / CONFIG, d / WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise MobizoError(f"{d} is not a PEFT adapter directory (needs {CONFIG} and {WEIGHTS})")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MobizoError(f"{cfg_path}: malformed JSON ({e})") from e
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise MobizoError(f"{cfg_path}: not a LoRA adapter config")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool) or config[key] <= 0:
            raise MobizoError(f"{cfg_path}: missing or invalid {key!r}")
    try:
        with safe_open(str(w_path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise MobizoError(f"{w_path}: unreadable safetensors file ({e})") from e
    if "sha256" in meta and meta["sha256"] != tensors_sha256(tensors):
        raise MobizoError(f"{w_path}: checksum mismatch (the file is corrupted)")
    state = {}
    for k, v in tensors.items():
        if not (k.startswith(PEFT_PREFIX) and k.endswith(".weight") and (".lora_A" in k or ".lora_B" in k)):
            raise MobizoError(f"{w_path}: unexpected tensor {k!r} (only LoRA A/B weights are supported)")
        name = k[len(PEFT_PREFIX) : -len(".weight")]
        name = name.replace(".lora_A.default", ".lora_A").replace(".lora_B.default", ".lora_B")
        state[name] = v.to(torch.float32) if not v.is_floating_point() else v
    if not state:
        raise MobizoError(f"{w_path}: no LoRA tensors")
    return state, config


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(directory: Path, adapter_state, rank, alpha, base_model, state: dict, optimizer=None) -> None:
    def write(d: Path) -> None:
        write_adapter(d, adapter_state, rank, alpha, base_model)
        if optimizer is not None:
            torch.save(optimizer, d / "optimizer.pt")
        (d / STATE).write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8")

    atomic_write_dir(Path(directory), write)


def load_checkpoint(directory: Path):
    """(adapter state, adapter config, run state, optimizer state or None)."""
    d = resolve_dir(directory)
    if d is None:
        raise MobizoError(f"no checkpoint in {directory} to resume from")
    try:
        state = json.loads((d / STATE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MobizoError(f"{d / STATE}: unreadable checkpoint state ({e})") from e
    adapter, config = read_adapter(d)
    optimizer = None
    if (d / "optimizer.pt").is_file():
        optimizer = torch.load(d / "optimizer.pt", weights_only=True)
    return adapter, config, state, optimizer
