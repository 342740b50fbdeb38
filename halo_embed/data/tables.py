"""CSV / TSV files of pairs, read one way everywhere (``halo-embed score`` and ``finetune``).

The ``csv`` module does the parsing, so quoted fields may hold commas,
quotes and line breaks. Errors name the file and the line; a row that is not
valid UTF-8 is returned with its error instead of failing the whole file.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

__all__ = ["CAPTION_COLUMNS", "CSVRow", "IMAGE_COLUMNS", "MAX_FIELD_CHARS", "read_csv"]

#: Column names tried, in order, when none is given: open_clip's (``filepath``, ``title``) and the plain ones.
IMAGE_COLUMNS = ("filepath", "image")
CAPTION_COLUMNS = ("title", "caption")

#: Longest field accepted (csv's own default, 131,072 characters, is below some real captions files).
MAX_FIELD_CHARS = 16 * 1024 * 1024


@dataclass
class CSVRow:
    """One data row: ``line`` is the file's line number where the row starts (the header is line 1);
    ``error`` says why the row cannot be used (the caller names file and line)."""

    line: int
    values: dict[str, str] = field(default_factory=dict)
    error: str | None = None


def read_csv(path: str | os.PathLike, columns: Sequence[tuple[str | Sequence[str], str]],
             separator: str | None = None) -> tuple[list[CSVRow], list[str]]:
    """The rows of ``path`` with the required ``columns``.

    Args:
        path: the file (``.tsv`` / ``.tab``: tab-separated by default, else comma).
        columns: ``(column name or names, the option that sets it)`` pairs; of
            several names the first one (in the order given) that the header
            has is used; the option is quoted in the error when it has none.
        separator: the column separator, if not the extension's.

    Returns:
        One :class:`CSVRow` per data row (undecodable rows carry an ``error``),
        and the column name found for each entry of ``columns``.

    Raises:
        FileNotFoundError: no such file (or it is a folder).
        ValueError: an empty file, a missing column or a malformed row,
            naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{'not a file' if path.exists() else 'file not found'}: {path}")
    if separator is None:
        separator = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    csv.field_size_limit(max(csv.field_size_limit(), MAX_FIELD_CHARS))
    rows: list[CSVRow] = []
    # surrogateescape keeps a bad byte as a marker in its own row instead of failing the file
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
        reader = csv.reader(handle, delimiter=separator, strict=True)  # an unbalanced quote is an error
        try:
            header = next(reader, None)
            if header is None or not any(h.strip() for h in header):
                raise ValueError(f"{path} is empty: it needs a header row naming the columns")
            header = [h.strip() for h in header]
            repeated = sorted({h for h in header if h and header.count(h) > 1})
            if repeated:
                raise ValueError(f"{path} has the column {repeated[0]!r} more than once: which one is meant is "
                                 "unclear (rename it)")
            found = []
            for names, option in columns:
                names = (names,) if isinstance(names, str) else tuple(names)
                present = [name for name in names if name in header]
                if not present:
                    wanted = repr(names[0]) if len(names) == 1 else " or ".join(map(repr, names))
                    raise ValueError(f"{path} has no column {wanted} (columns: {header}); set {option}")
                if present[0] in found:
                    raise ValueError(f"{path}: column {present[0]!r} cannot serve twice ({option} and another "
                                     "role); name different columns")
                found.append(present[0])
            line = reader.line_num + 1
            for values in reader:
                start, line = line, reader.line_num + 1
                if not values or not any(v.strip() for v in values):
                    continue  # blank line
                row = CSVRow(start, dict(zip(header, values)))
                if len(values) != len(header):  # e.g. an unquoted comma in a caption
                    row.error = f"{len(values)} fields, the header has {len(header)} (quote fields with commas)"
                elif any(_undecodable(v) for v in values):
                    row.values = {k: v.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                                  for k, v in row.values.items()}
                    row.error = "not valid UTF-8"
                rows.append(row)
        except csv.Error as error:
            raise ValueError(f"{path}, line {reader.line_num}: {error}") from error
    return rows, found


def _undecodable(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)
