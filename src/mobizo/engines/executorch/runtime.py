"""Drive ``train.pte`` through the stock ExecuTorch runtime (pip ``executorch``): no PyTorch model at run time.

One copy of the frozen weights: every method of ``train.pte`` (``train_step``, ``score``) has its
own XNNPACK delegates, and each delegate packs the weights it reads into its own buffers at load
time, so loading ``score`` next to ``train_step`` used to hold the packed base twice. The ``.pte``
stores each weight once (XNNPACK names constants by the sha256 of their bytes), and XNNPACK's
weights cache, keyed by those names, lets every delegate in the process use one packed copy. The
pip wheel builds that cache but leaves it off; the version-gated patch
:func:`mobizo.patches.share_packed_weights` turns it on (where it does not apply, ``score``'s
delegates pack their own copy when ``score`` first runs).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ... import patches
from ...errors import MobizoError
from ...util import file_sha256, quiet_stderr
from ...zo_optim import check_state
from .. import Shapes, StepOutput
from .manifest import MANIFEST, METHODS, PROGRAM, check_manifest, read_manifest

EAGER_METHODS = ("train_step", "get_adapter", "set_adapter")  # score: loaded on first use


def release_program_pages(path: Path) -> int:
    """Unlock and drop this process's resident pages of the read-only mappings of ``path``; returns
    the bytes of mappings released (0 where ``/proc/self/maps`` or the calls are missing).

    The Python runtime maps the ``.pte`` and *locks* every segment it loads (its data loader is built
    with ``UseMlockIgnoreErrors``): the whole constant segment, i.e. the embedding table the portable
    gather reads, stays resident and unreclaimable although a step reads only the rows of its
    tokens. The mappings are read-only views of the file (nothing in them is ever written), so the
    kernel re-reads any page that is touched again: after unlocking and ``MADV_DONTNEED`` only the
    pages the steps touch come back, and they stay reclaimable. (The native trainer maps without
    locking.) XNNPACK has copied the weights it packs at load time, so their pages are not needed."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
        libc = ctypes.CDLL(None, use_errno=True)
        munlock, madvise = libc.munlock, libc.madvise
    except (OSError, AttributeError):
        return 0
    target, released = str(Path(path).resolve()), 0
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[5].strip() != target or "w" in fields[1]:
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        addr, size = ctypes.c_void_p(start), ctypes.c_size_t(end - start)
        munlock(addr, size)
        if madvise(addr, size, 4) == 0:  # MADV_DONTNEED: clean file pages, re-read on the next touch
            released += end - start
    return released


class ExecuTorchEngine:
    """Drives ``train.pte`` through the ExecuTorch runtime; no PyTorch model is needed at run time."""

    name = "executorch"

    def __init__(
        self, program_dir: Path, expected: dict | None = None, verified: bool = False, fixed_length: bool = False
    ):
        """Load ``program_dir`` (``train.pte`` + ``manifest.json``). ``expected``: manifest fields
        (see :func:`.manifest.identity`) the program must have been built with; checked before loading.
        ``verified``: the caller has just checked the ``.pte``'s sha256 (skip reading it again).
        ``fixed_length``: pad every batch to the program's max_length even if it takes any length
        (a bundle: the native trainer runs its rows at that length, and the two must agree bitwise)."""
        self.dir = Path(program_dir)
        self.manifest = m = read_manifest(self.dir)
        pte = self.dir / PROGRAM
        if not pte.is_file():
            raise MobizoError(f"{self.dir} has no {PROGRAM}")
        size, digest = (m.pte_bytes, m.pte_sha256) if verified else file_sha256(pte)
        if size != m.pte_bytes or digest != m.pte_sha256:
            raise MobizoError(f"{pte} is truncated or corrupted (its sha256 does not match {MANIFEST}); re-export it")
        if expected is not None:
            check_manifest(m, expected)
        # The runtime's bindings module, which ``executorch.runtime`` wraps: importing that one
        # imports the whole exporter (``executorch.exir``, 134 MB resident) before it runs a thing.
        from executorch.extension.pybindings import _C

        self.shared_weights = patches.share_packed_weights()
        try:
            with quiet_stderr():
                # From the path, not from bytes: the runtime maps the file instead of keeping a
                # second copy of the whole program (weights included) in memory.
                self.program = _C._load_program(str(pte), program_verification=_C.Verification.InternalConsistency)
            names = {self.program.get_method_name(i) for i in range(self.program.num_methods())}
            missing = set(METHODS) - names
            if m.state_names:  # a stateful update rule reads and sets its state through these
                missing |= {"get_state", "set_state"} - names
            if missing:
                raise MobizoError(f"{pte} lacks the methods {sorted(missing)}")
            self.methods = {}
            for name in EAGER_METHODS:
                self._method(name)
        except MobizoError:
            raise
        except Exception as e:  # runtime errors surface as one line
            raise MobizoError(f"ExecuTorch cannot load {pte}: {e}") from e
        self.names = list(m.adapter_shapes)
        # a dynamic-length program takes each batch padded to its own longest row (up to max_length)
        self.shapes = Shapes(
            length=None if m.dynamic_length and not fixed_length else m.max_length,
            answer_len=m.answer_len,
            rows=m.batch_size,
            eval_rows=m.eval_rows,
            shared=m.shared_prompt,
            choices=m.choices if m.shared_prompt else None,
        )
        self.estimator = m.estimator
        self._scored = False  # score ran since the last train_step (see train_step)
        # Shared mutable buffers start uninitialised in the runtime: always load B explicitly.
        self._set_b([torch.zeros(*m.adapter_shapes[n]) for n in self.names])
        self.rule = m.zo_config().rule
        self.load_optimizer_state(None)  # a stateful rule starts from its initial state

    # -------------------------------------------------------------- engine interface

    def _method(self, name: str):
        """A loaded method; ``score`` is loaded on first use (without the shared weights cache its
        XNNPACK delegates would pack a second copy of the weights)."""
        if name not in self.methods:
            with quiet_stderr():
                self.methods[name] = self.program.load_method(name)
            release_program_pages(self.dir / PROGRAM)  # what loading locked (see release_program_pages)
        return self.methods[name]

    def _run(self, method: str, args):
        try:
            return self._method(method)(list(args))
        except Exception as e:
            raise MobizoError(f"ExecuTorch {method} failed: {e}") from e

    def _check(self, batch, rows: int) -> None:
        m = self.manifest
        if bool(getattr(batch, "shared", False)) != m.shared_prompt:
            layouts = ("one row per candidate", "one shared prompt row per example")
            raise MobizoError(
                f"batch has {layouts[bool(getattr(batch, 'shared', False))]}, the program takes "
                f"{layouts[m.shared_prompt]} (re-export it)"
            )
        rows_in, t = batch.input_ids.shape
        fits = t <= m.max_length if m.dynamic_length else t == m.max_length
        if rows_in != rows or not fits or batch.labels.shape[1] != m.label_width:
            raise MobizoError(
                f"batch of shape {tuple(batch.input_ids.shape)} (answer window {batch.labels.shape[1]}) does not match "
                f"the program's ({rows}, {'2..' if m.dynamic_length else ''}{m.max_length}) (answer window {m.label_width})"
            )

    @staticmethod
    def _inputs(batch):
        """input_ids, attention_mask; a one-token batch is left-padded to the program's shortest T (2)."""
        ids, mask = batch.input_ids, batch.attention_mask
        if ids.shape[1] < 2:
            pad = 2 - ids.shape[1]
            ids = torch.cat([torch.zeros(ids.shape[0], pad, dtype=ids.dtype), ids], dim=1)
            mask = torch.cat([torch.zeros(mask.shape[0], pad, dtype=mask.dtype), mask], dim=1)
        return ids.contiguous(), mask.contiguous()

    def train_step(self, batch, step: int, lr: float, eps: float) -> StepOutput:
        self._check(batch, self.manifest.rows)
        if self._scored:  # the pages an eval read (score's unpacked LM head: the whole matrix) are not
            release_program_pages(self.dir / PROGRAM)  # the step's: let them go before it adds its own
            self._scored = False
        args = [
            *self._inputs(batch),
            batch.labels,
            torch.tensor(step, dtype=torch.long),
            torch.tensor(lr, dtype=torch.float32),
            torch.tensor(eps, dtype=torch.float32),
        ]
        if self.manifest.objective != "answer":
            args.append(batch.gold)
        losses, grads, *extras = self._run("train_step", args)
        extra = {k: v.tolist() for k, v in zip(self.manifest.step_extras, extras)}  # HiZOO's curvature, for replay
        return StepOutput(
            loss=float(losses.mean()), projected_grads=grads.tolist(), losses=losses.tolist(), extra=extra
        )

    def score(self, batch):
        self._check(batch, self.manifest.eval_rows)
        sums, counts = self._run("score", [*self._inputs(batch), batch.labels])
        self._scored = True
        return sums, counts

    def score_choices(self, batch):
        """A shared-prompt program's ``score``: (eval_rows, choices) CE and counts."""
        return self.score(batch)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        out = self._run("get_adapter", [])
        state = {}
        for i, n in enumerate(self.names):
            state[f"{n}.lora_A"] = out[2 * i].clone()
            state[f"{n}.lora_B"] = out[2 * i + 1].clone()
        return state

    def _set_b(self, bs) -> None:
        self._run("set_adapter", [b.to(torch.float32).contiguous() for b in bs])

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        current = self.adapter_state()
        if set(state) != set(current):
            raise MobizoError("adapter does not fit this program (different adapted modules)")
        for k, v in state.items():
            if tuple(v.shape) != tuple(current[k].shape):
                raise MobizoError(
                    f"adapter tensor {k} has shape {tuple(v.shape)}, the program needs {tuple(current[k].shape)}"
                )
            if k.endswith("lora_A") and not torch.equal(v.to(torch.float32), current[k]):
                raise MobizoError(
                    f"adapter tensor {k} differs from the program's frozen A (different --seed or adapter)"
                )
        self._set_b([state[f"{n}.lora_B"] for n in self.names])

    # -------------------------------------------------------------- generation (prefill / decode)

    max_decode_rows = 1  # one KV cache: one sequence at a time

    @property
    def max_positions(self) -> int:
        """Positions of the program's KV cache: a prompt and its continuation must fit them."""
        return self.manifest.max_length

    def check_generates(self) -> None:
        """One line unless the program has ``prefill`` / ``decode`` (checked before any text is written)."""
        if not self.manifest.generate:
            raise MobizoError(
                f"the program in {self.dir} has no generation methods (exported by an earlier mobizo, or this "
                "model's generation could not be traced); re-export it"
            )

    def decoder(self, input_ids, attention_mask) -> ProgramDecoder:
        """Greedy/sampled decoding of one unpadded row through ``prefill`` / ``decode`` (see
        :mod:`mobizo.generation`), with the adapter as it is now."""
        self.check_generates()
        if input_ids.shape[0] != 1 or not bool(attention_mask.all()):
            raise MobizoError("the ExecuTorch program generates one unpadded sequence at a time")
        return ProgramDecoder(self, input_ids[0].tolist())

    def optimizer_state(self) -> dict | None:
        """The update rule's state ({``<layer>.zo_<s>``: tensor}, see :mod:`mobizo.zo_optim`); None if stateless."""
        names = self.manifest.state_names
        if not names:
            return None
        return {n: t.clone() for n, t in zip(names, self._run("get_state", []))}

    def load_optimizer_state(self, state) -> None:
        """Set the rule's state from a checkpoint's (checked), or its initial state (``None``)."""
        names = self.manifest.state_names
        if not names:
            return
        specs = {s["name"]: s for s in self.manifest.state}
        if state is None:
            state = {n: torch.full(s["shape"], float(s["init"])) for n, s in specs.items()}
        check_state(state, {n: tuple(s["shape"]) for n, s in specs.items()}, self.rule.name, str(self.dir))
        self._run("set_state", [state[n].to(torch.float32).contiguous() for n in names])


class ProgramDecoder:
    """One sequence through the program's ``prefill`` (chunks of ``prefill_chunk`` prompt tokens, the last
    right-padded) and ``decode`` (one token) methods; the interface of :class:`mobizo.engines.eager.KVDecoder`
    for one row."""

    def __init__(self, engine: ExecuTorchEngine, ids: list[int]):
        m = engine.manifest
        if not ids or len(ids) >= m.max_length:
            raise MobizoError(f"a prompt of {len(ids)} tokens does not fit the program's {m.max_length} positions")
        self.engine, self.position = engine, len(ids)
        chunk = m.prefill_chunk
        for start in range(0, len(ids), chunk):
            # a chunk (its right padding included) must stay inside the cache: near its end, the last chunk
            # starts earlier and writes again the keys and values of tokens already there
            start = min(start, m.max_length - chunk)
            part = ids[start : start + chunk]
            tokens = torch.tensor([part + [0] * (chunk - len(part))], dtype=torch.long)
            logits = engine._run("prefill", [tokens, torch.tensor(start), torch.tensor(len(part) - 1)])[0]
        self.logits = logits.reshape(1, -1).clone()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.position >= self.engine.manifest.max_length:
            raise MobizoError(f"the sequence reached the program's {self.engine.manifest.max_length} positions")
        token = tokens.reshape(1, 1).to(torch.long)
        logits = self.engine._run("decode", [token, torch.tensor(self.position), torch.tensor(0)])[0]
        self.position += 1
        self.logits = logits.reshape(1, -1).clone()
        return self.logits

    def keep(self, rows: list[int]) -> None:
        if list(rows) != [0]:
            raise MobizoError("the ExecuTorch program decodes one sequence")
