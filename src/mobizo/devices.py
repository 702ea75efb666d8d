"""Where the eager engine runs the model (``--device``) and in which dtype (``--dtype``).

Only the forward passes move: the noise z is made on the CPU (:mod:`mobizo.perturb`, the same bits
on every machine), B's update and the update rule's state are computed on the CPU in float32 from
the step's losses (:class:`mobizo.step.ZOStep`), and checkpoints and adapters hold float32 CPU
tensors. So a run's log replays to its adapter bit for bit on the CPU, and a run resumes on any
device. The frozen base (its weights and activations) may be bfloat16 or float16; the adapter path,
the losses and their differences stay float32 (:mod:`mobizo.mplora`, :mod:`mobizo.step`).
docs/devices.md has the why and the measurements.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

from .errors import MobizoError

DEVICES = ("cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cuda_available() -> bool:
    return torch.cuda.is_available()


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def best_device() -> str:
    """The default ``--device``: cuda if available, else mps if available, else cpu."""
    if cuda_available():
        return "cuda"
    if mps_available():
        return "mps"
    return "cpu"


def device_name(requested: str | None) -> str:
    """``--device`` as given, or the best available one when not given."""
    return best_device() if requested is None else requested


def check_available(name: str) -> None:
    """One line when ``--device name`` cannot run here."""
    if name not in DEVICES:
        raise MobizoError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda" and not cuda_available():
        why = (
            f"this torch ({torch.__version__}) is built without CUDA"
            if torch.version.cuda is None
            else "no CUDA device is visible (check the driver and CUDA_VISIBLE_DEVICES)"
        )
        raise MobizoError(f"--device cuda: CUDA is not available: {why}")
    if name == "mps" and not mps_available():
        where = "macOS on Apple silicon" if sys.platform != "darwin" else "Apple silicon and a torch built with MPS"
        raise MobizoError(f"--device mps: MPS is not available here (it needs {where}); use --device cpu")


def local_rank() -> int | None:
    """torchrun's LOCAL_RANK (this process's index on its machine), if set."""
    raw = os.environ.get("LOCAL_RANK")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise MobizoError(f"LOCAL_RANK={raw!r} is not an integer") from None


def resolve(requested: str | None) -> torch.device:
    """The torch device of ``--device`` (None: the best available), checked; under torchrun ``cuda`` is
    ``cuda:LOCAL_RANK`` (one GPU per process)."""
    name = device_name(requested)
    check_available(name)
    if name != "cuda":
        return torch.device(name)
    rank = local_rank()
    if rank is None:
        return torch.device("cuda")
    count = torch.cuda.device_count()
    if rank >= count:
        raise MobizoError(f"--device cuda: this is LOCAL_RANK {rank}, but only {count} CUDA device(s) are visible")
    return torch.device("cuda", rank)


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise MobizoError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _probes(dtype: torch.dtype, device: torch.device):
    """(name, thunk) of the ops a transformer's forward needs, each on a few elements in ``dtype``."""
    x = torch.linspace(-1, 1, 32, device=device).reshape(2, 4, 4).to(dtype)
    w = torch.linspace(-1, 1, 16, device=device).reshape(4, 4).to(dtype)
    ids = torch.tensor([[0, 3]], device=device)
    q = x.reshape(1, 2, 4, 4)
    return [
        ("linear (addmm)", lambda: torch.nn.functional.linear(x, w, w[0])),
        ("bmm", lambda: torch.bmm(x, x.transpose(1, 2))),
        ("embedding", lambda: torch.nn.functional.embedding(ids, w)),
        ("softmax", lambda: torch.softmax(x, -1)),
        ("rms_norm (pow, mean, rsqrt)", lambda: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)),
        ("layer_norm", lambda: torch.nn.functional.layer_norm(x, (4,), w[0], w[1])),
        ("silu", lambda: torch.nn.functional.silu(x)),
        ("gelu", lambda: torch.nn.functional.gelu(x, approximate="tanh")),
        ("cos/sin (rotary)", lambda: torch.cos(x) * torch.sin(x)),
        ("scaled_dot_product_attention", lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)),
        ("log_softmax", lambda: torch.log_softmax(x.float(), -1).to(dtype)),
    ]


@functools.cache
def _unsupported(device: torch.device, dtype: torch.dtype) -> tuple[str, str] | None:
    for name, run in _probes(dtype, device):
        try:
            run()
        except Exception as e:  # noqa: BLE001 - any failure: the op has no kernel for this dtype here
            text = " ".join(str(e).split())
            return name, f"{type(e).__name__}: {text[:160]}"
    return None


def check_dtype(device: torch.device, dtype_name: str) -> None:
    """Refuse ``--dtype`` up front when an op a forward needs has no kernel for it on ``device`` (a few-element
    probe of each, cached), instead of failing mid-run."""
    dtype = torch_dtype(dtype_name)
    if dtype == torch.float32:
        return
    bad = _unsupported(torch.device(device), dtype)
    if bad is not None:
        raise MobizoError(
            f"--dtype {dtype_name} is not supported on {device} by torch {torch.__version__}: "
            f"{bad[0]} failed ({bad[1]}); use --dtype float32"
        )


def check_cpu_float32(device: str | None, dtype: str, what: str) -> None:
    """The ExecuTorch engine, export and bundle run on the CPU in float32: refuse anything else (one line)."""
    if device not in (None, "cpu"):
        raise MobizoError(f"{what} runs on the CPU in float32: --device {device} applies to --engine eager only")
    if dtype != "float32":
        raise MobizoError(f"{what} runs on the CPU in float32: --dtype {dtype} applies to --engine eager only")


def backend_for(device: torch.device | str) -> str:
    """The torch.distributed backend of a run on ``device``: nccl for CUDA, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; ``t`` itself when it is already there (no op in an exported graph)."""
    return t if t.device == device else t.to(device)
