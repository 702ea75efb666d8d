"""Reading local data files: JSONL / JSON, CSV, Parquet, or a ``datasets.save_to_disk`` folder."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import MobizoError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# Split names as Hugging Face datasets spell them, and common aliases.
SPLIT_ALIASES = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev", "test"),
}


def find_split(data: str | Path, split: str) -> Path:
    """The file (or saved-dataset folder) holding ``split`` under ``data``."""
    root = Path(data)
    if not root.exists():
        raise MobizoError(f"data path {root} does not exist")
    if root.is_file():
        return root
    names = SPLIT_ALIASES.get(split, (split,))
    for name in names:
        for suffix in SUFFIXES:
            if (root / f"{name}{suffix}").is_file():
                return root / f"{name}{suffix}"
        if (root / name / "dataset_info.json").is_file() or (root / name / "state.json").is_file():
            return root / name
    if (root / "dataset_dict.json").is_file():
        return root  # a DatasetDict saved with save_to_disk; read_records picks the split
    raise MobizoError(
        f"no {split} split in {root}: expected one of " + ", ".join(f"{n}{s}" for n in names[:2] for s in SUFFIXES)
    )


def read_records(path: str | Path, split: str | None = None) -> list[dict]:
    """All rows of a data file as dicts. Clear errors for empty/malformed/non-UTF-8 files."""
    path = Path(path)
    try:
        if path.is_dir():
            return _read_saved_dataset(path, split)
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            rows = _read_json(path)
        elif suffix == ".csv":
            rows = _read_csv(path)
        elif suffix == ".parquet":
            rows = _read_parquet(path)
        else:
            raise MobizoError(f"{path}: unsupported data file type {suffix!r} (use .jsonl, .json, .csv or .parquet)")
    except UnicodeDecodeError as e:
        raise MobizoError(f"{path}: not valid UTF-8 text (byte offset {e.start})") from e
    if not rows:
        raise MobizoError(f"{path}: no records (empty file)")
    return rows


def _read_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise MobizoError(f"{path}: malformed JSON: {e.msg} at line {e.lineno}") from e
        except RecursionError as e:
            raise MobizoError(f"{path}: JSON nested too deeply to read") from e
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise MobizoError(f"{path}:{lineno}: malformed JSON line: {e.msg}") from e
            except RecursionError as e:
                raise MobizoError(f"{path}:{lineno}: JSON line nested too deeply to read") from e
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise MobizoError(f"{path}: record {i} is {type(row).__name__}, expected a JSON object")
    return rows


def _read_csv(path: Path) -> list[dict]:
    """Rows of a CSV file with a header line. Each record must have the header's number of fields, and
    quotes are parsed strictly: an unclosed quote would otherwise swallow the lines after it into one
    field (and merge records). Errors name the line the bad record starts on."""
    import csv

    rows: list[dict] = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f, strict=True)
        header, start = None, 1  # start: the line the record being read begins on
        try:
            for fields in reader:
                line, start = start, reader.line_num + 1
                if not fields:  # a blank line (csv.DictReader skips them too)
                    continue
                if header is None:
                    header = fields
                    continue
                if len(fields) != len(header):
                    hint = " (a comma inside an unquoted field? quote the field)" if len(fields) > len(header) else ""
                    raise MobizoError(
                        f"{path}:{line}: {len(fields)} field{'s' * (len(fields) != 1)}, but the header has {len(header)}: "
                        f"{', '.join(header)}{hint}"
                    )
                rows.append(dict(zip(header, fields)))
        except csv.Error as e:
            end = reader.line_num
            if end > start or "end of data" in str(e) or "field larger" in str(e):
                raise MobizoError(
                    f"{path}:{start}: unclosed quote in the record on line {start} (its quoted field runs on to "
                    f'line {end}: {e}); close it, or write a quote inside a quoted field as ""'
                ) from e
            raise MobizoError(f"{path}:{start}: malformed CSV: {e}") from e
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for bad files
        raise MobizoError(f"{path}: cannot read Parquet: {e}") from e


def _read_saved_dataset(path: Path, split: str | None) -> list[dict]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover
        raise MobizoError("reading a save_to_disk folder needs the 'datasets' package") from e
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise MobizoError(f"{path}: cannot load saved dataset: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        names = [n for n in SPLIT_ALIASES.get(split or "train", (split,)) if n in ds]
        if not names:
            raise MobizoError(f"{path}: saved dataset has no {split} split (it has {', '.join(ds)})")
        ds = ds[names[0]]
    return ds.to_list()
