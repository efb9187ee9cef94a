"""Read documents from text files, JSONL and Parquet (one document per file, line or row)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from costmodels.errors import MeshplanError

TEXT_FIELDS = ("text", "content", "body")


def _text_of(record: object, where: str, field: str | None) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for key in (field,) if field else TEXT_FIELDS:
            if key in record and isinstance(record[key], str):
                return record[key]
    want = field or " / ".join(TEXT_FIELDS)
    raise MeshplanError(f"{where}: no string field {want!r}; pass --text-field NAME")


def read_jsonl(path: Path, field: str | None = None) -> Iterator[str]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MeshplanError(
                    f"{path}:{lineno}: not valid JSON ({exc.msg}); fix or remove the line"
                ) from None
            yield _text_of(record, f"{path}:{lineno}", field)


def read_parquet(path: Path, field: str | None = None) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for bad files
        raise MeshplanError(f"{path}: not a readable Parquet file ({exc})") from None
    names = table.column_names
    col = field or next((c for c in TEXT_FIELDS if c in names), None)
    if col is None or col not in names:
        raise MeshplanError(
            f"{path}: no text column (have {', '.join(names)}); pass --text-field NAME"
        )
    for value in table.column(col).to_pylist():
        if isinstance(value, str):
            yield value


def read_text(path: Path) -> Iterator[str]:
    try:
        yield path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return  # binary file in a folder of sources: skipped


def iter_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    raise MeshplanError(f"{path}: source not found; pass an existing file or folder")


def iter_documents(path: str | Path, field: str | None = None) -> Iterator[str]:
    """Documents under `path` (a file or a folder, read in sorted order)."""
    for f in iter_files(Path(path)):
        suffix = f.suffix.lower()
        if suffix == ".jsonl":
            yield from read_jsonl(f, field)
        elif suffix == ".parquet":
            yield from read_parquet(f, field)
        else:
            yield from read_text(f)
