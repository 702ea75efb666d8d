"""Checkpoints as older mobizo wrote them (a helper module: tests import it; see docs/design.md)."""


def legacy_checkpoint(ck, native: bool = False) -> None:
    """Turn a checkpoint into format 1, as mobizo wrote it before ``SHA256SUMS``: the same files, ``state.json``
    without ``checkpoint_format`` and with the sha256 of its canonical JSON inside, no ``SHA256SUMS`` (what a run
    interrupted before the upgrade leaves behind). ``native``: ``state.json`` as mobizo-train wrote it (one line)."""
    import json

    from mobizo.checkpoint import SUMS, _state_sha256
    from mobizo.util import dumps

    path = ck / "state.json"
    state = json.loads(path.read_text())
    assert state.pop("checkpoint_format") == 2 and "sha256" not in state
    state["sha256"] = _state_sha256(state)
    path.write_text(json.dumps(state, sort_keys=True) + "\n" if native else dumps(state, indent=1, sort_keys=True))
    (ck / SUMS).unlink()
