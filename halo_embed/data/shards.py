"""Image-caption pairs in webdataset tar shards and parquet files (the layouts of open_clip_train,
img2dataset and DataComp), read one *unit* at a time.

A shard is a tar file of samples; a sample is the files that share a key
(``000123.jpg``, ``000123.txt``, ``000123.json``). The image is the first of
``jpg``, ``png``, ``webp`` (open_clip_train's ``jpg;png;webp``), the caption
``txt``. A parquet file holds one row per pair: a key column, an image column
(encoded bytes, a ``{"bytes", "path"}`` struct as Hugging Face writes it, or
a path) and a caption column. A *unit* is one shard or one parquet row group:
the granularity at which work is split across processes and machines, and at
which an interrupted run resumes.

Nothing here raises for bad data: a truncated or corrupt tar, a sample
without an image or caption, an image that does not decode come back as
errors, counted per unit.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from ..io import is_remote

__all__ = ["CAPTION_KEY", "IMAGE_KEYS", "RawPair", "Unit", "UnitReport", "expand_shards", "input_kind", "list_units",
           "parquet_columns", "read_unit", "write_shard"]

#: open_clip_train's image and caption keys (``--wds-image-key jpg;png;webp``, ``--wds-caption-key txt``)
IMAGE_KEYS = ("jpg", "png", "webp")
CAPTION_KEY = "txt"
#: parquet columns tried in order when none is named
PARQUET_KEY_COLUMNS = ("key", "uid", "__key__", "id")
PARQUET_IMAGE_COLUMNS = ("jpg", "image", "img", "image_bytes", "filepath", "image_path", "path", "url_local")
PARQUET_TEXT_COLUMNS = ("txt", "caption", "text", "title")


def expand_shards(spec: str, what: str = "--train-data") -> list[str]:
    """The shards of a webdataset spec, in order: ``::``-separated parts (open_clip_train), each
    brace-expanded (``shards/{00000..00009}.tar``) and, for local paths, glob-expanded (``shards/*.tar``).
    URLs (``s3://``, ``https://``, ``pipe:``) pass as they are.

    Raises:
        ValueError: the spec matches nothing, or names a local shard that does not exist.
    """
    from braceexpand import braceexpand

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{what} must name shards, got {spec!r}")
    urls, missing = [], []
    for part in spec.split("::"):
        for url in braceexpand(part.strip()):
            if is_remote(url):
                urls.append(url)
            elif any(c in url for c in "*?["):
                urls.extend(sorted(p for p in glob.glob(url) if Path(p).is_file()))
            elif Path(url).is_file():
                urls.append(url)
            else:
                missing.append(url)
    if not urls:
        raise ValueError(f"{what} {spec!r} matches no file")
    if missing:
        raise ValueError(f"{what} {spec!r}: {len(missing)} of its {len(urls) + len(missing)} shards do not exist, "
                         f"e.g. {missing[0]}")
    return urls


def input_kind(spec: str) -> str:
    """``webdataset`` (``.tar`` shards, brace patterns, ``::`` lists), ``parquet`` (``.parquet`` files or a
    folder of them) or ``csv``."""
    path = Path(spec)
    if spec.endswith(".parquet") or (path.is_dir() and any(path.glob("*.parquet"))):
        return "parquet"
    if "::" in spec or "{" in spec or spec.endswith(".tar") or spec.endswith(".tar.gz"):
        return "webdataset"
    if any(c in spec for c in "*?[") and spec.rstrip("*").endswith((".tar", "/")):
        return "webdataset"
    return "csv"


@dataclass(frozen=True)
class Unit:
    """One shard, or one row group of a parquet file."""

    path: str
    row_group: int | None = None

    def __str__(self) -> str:
        return self.path if self.row_group is None else f"{self.path} (row group {self.row_group})"


@dataclass
class RawPair:
    """One sample as stored: ``image`` is encoded bytes or a path (``None`` when missing), ``error`` says why
    the sample cannot be scored (``None`` when it can)."""

    key: str
    image: bytes | str | None
    text: str | None
    error: str | None = None
    files: dict[str, bytes] = field(default_factory=dict)  # a shard sample's files, for resharding


@dataclass
class UnitReport:
    """What reading a unit found: its samples and the errors that are not one sample's (a corrupt tar); the
    scorer fills in ``broken``, the samples it could not score (an image that does not decode included)."""

    samples: int = 0
    broken: int = 0
    errors: list[str] = field(default_factory=list)


def list_units(spec: str, kind: str, what: str = "--pairs") -> list[Unit]:
    """Every unit of a webdataset spec or parquet input (a file, a folder of ``*.parquet``, a glob or a
    brace pattern), in order.

    Raises:
        ValueError: nothing matches, or a parquet file cannot be opened (named).
    """
    if kind == "webdataset":
        return [Unit(url) for url in expand_shards(spec, what)]
    if kind != "parquet":
        raise ValueError(f"units are read from webdataset or parquet inputs, got {kind!r}")
    import pyarrow.parquet as pq

    path = Path(spec)
    files = sorted(str(p) for p in path.glob("*.parquet")) if path.is_dir() else expand_shards(spec, what)
    if not files:
        raise ValueError(f"{what} {spec!r} holds no .parquet file")
    units = []
    for name in files:
        try:
            groups = pq.ParquetFile(name).metadata.num_row_groups
        except Exception as error:  # pyarrow raises its own ArrowInvalid / OSError for a damaged file
            raise ValueError(f"{what}: {name} is not a readable parquet file ({error})") from None
        units.extend(Unit(name, group) for group in range(groups))
    return units


def _tar_samples(unit: Unit, report: UnitReport, keep_files: bool) -> Iterator[RawPair]:
    import webdataset as wds

    def record(error: Exception) -> bool:  # webdataset's handler: note it, go on with the next file
        report.errors.append(f"{unit.path}: {error.args[0] if error.args else type(error).__name__}")
        return True

    for sample in wds.tariterators.tarfile_samples([{"url": unit.path}], handler=record):
        key = str(sample.get("__key__"))
        files = {k: v for k, v in sample.items() if not k.startswith("__")}
        image = next((files[k] for k in IMAGE_KEYS if k in files), None)
        raw = files.get(CAPTION_KEY)
        error = text = None
        if image is None:
            error = f"no image ({'/'.join(IMAGE_KEYS)}) in the sample"
        if raw is None:
            error = error or f"no caption ({CAPTION_KEY}) in the sample"
        else:
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                error = error or "the caption is not UTF-8"
            if text == "":
                error = error or "empty caption"
        yield RawPair(key, image, text, error, files if keep_files else {})
    # (a compressed shard ends in its compressor's trailer: gzip already reports a cut stream)
    damage = _tar_end_damage(unit.path) if unit.path.endswith(".tar") and not is_remote(unit.path) else None
    if damage:
        report.errors.append(f"{unit.path}: {damage}")


def _tar_end_damage(path: str) -> str | None:
    """Why a local tar is cut short, or ``None``: Python's tarfile ends a stream quietly at a missing header,
    so a shard truncated between two members would pass as a shorter one. A whole tar is a multiple of
    512 bytes and ends with two zero blocks."""
    size = os.path.getsize(path)
    if size % 512:
        return f"truncated tar ({size} bytes, not whole 512-byte blocks): samples after the damage are lost"
    with open(path, "rb") as handle:
        handle.seek(max(0, size - 1024))
        if handle.read(1024).strip(b"\0"):
            return "truncated tar (no end-of-archive blocks): samples after the damage are lost"
    return None


def _column(names: Sequence[str], given: str | None, candidates: Sequence[str], what: str, where: str) -> str | None:
    if given is not None:
        if given not in names:
            raise ValueError(f"{where} has no column {given!r} ({what}; columns: {list(names)})")
        return given
    return next((c for c in candidates if c in names), None)


def parquet_columns(path: str, key_column: str | None, image_column: str | None,
                    text_column: str | None) -> tuple[str | None, str, str]:
    """``(key, image, caption)`` column names of a parquet file (the key may be missing: row numbers then).

    Raises:
        ValueError: a named column is missing, or no image / caption column is found.
    """
    import pyarrow.parquet as pq

    names = pq.ParquetFile(path).schema_arrow.names
    key = _column(names, key_column, PARQUET_KEY_COLUMNS, "--key-column", path)
    image = _column(names, image_column, PARQUET_IMAGE_COLUMNS, "--image-column", path)
    text = _column(names, text_column, PARQUET_TEXT_COLUMNS, "--text-column", path)
    for found, flag, candidates in ((image, "--image-column", PARQUET_IMAGE_COLUMNS),
                                    (text, "--text-column", PARQUET_TEXT_COLUMNS)):
        if found is None:
            raise ValueError(f"{path} has none of the columns {list(candidates)}: name one with {flag} "
                             f"(columns: {names})")
    return key, image, text


def _parquet_samples(unit: Unit, columns: tuple[str | None, str, str]) -> Iterator[RawPair]:
    import pyarrow.parquet as pq

    key_column, image_column, text_column = columns
    wanted = [c for c in (key_column, image_column, text_column) if c is not None]
    table = pq.ParquetFile(unit.path).read_row_group(unit.row_group, columns=wanted)
    root = Path(unit.path).parent
    keys = table.column(key_column).to_pylist() if key_column else None
    images, texts = table.column(image_column), table.column(text_column).to_pylist()
    for row in range(table.num_rows):
        key = str(keys[row]) if keys is not None else f"{Path(unit.path).stem}:{unit.row_group}:{row}"
        image = images[row].as_py()
        if isinstance(image, dict):  # Hugging Face's Image feature: {"bytes": ..., "path": ...}
            image = image.get("bytes") or image.get("path")
        if isinstance(image, str) and image and not os.path.isabs(image):
            image = str(root / image)
        text = texts[row]
        error = None
        if not image:
            error = "no image in the row"
        elif not isinstance(text, str) or not text.strip():
            error = "empty caption"
        yield RawPair(key, image or None, text.strip() if isinstance(text, str) else None, error)


def read_unit(unit: Unit, report: UnitReport, columns: tuple[str | None, str, str] | None = None,
              keep_files: bool = False) -> Iterator[RawPair]:
    """The samples of a unit in stored order; ``report`` counts them and collects the unit's own errors
    (a truncated or unreadable tar goes on with the samples read before the damage).

    Args:
        columns: a parquet unit's ``(key, image, caption)`` columns (:func:`parquet_columns`).
        keep_files: a shard sample keeps all its files (:attr:`RawPair.files`), to be written elsewhere.
    """
    if unit.row_group is None:
        samples = _tar_samples(unit, report, keep_files)
    else:
        try:
            samples = _parquet_samples(unit, columns)
            first = next(samples, None)
        except Exception as error:  # a damaged row group: the unit's error, the other units go on
            report.errors.append(f"{unit}: {error}")
            return
        if first is None:
            return
        samples = _chain(first, samples)
    for sample in samples:
        report.samples += 1
        yield sample


def _chain(first: RawPair, rest: Iterator[RawPair]) -> Iterator[RawPair]:
    yield first
    yield from rest


def write_shard(path: str | os.PathLike, samples: Iterator[tuple[str, dict[str, bytes]]]) -> int:
    """Write ``(key, {extension: bytes})`` samples as one webdataset tar, atomically (a crash leaves no
    half shard); returns the samples written."""
    import webdataset as wds

    from ..io import atomic_path

    count = 0
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as stream:
            writer = wds.TarWriter(stream, mtime=0)  # the same samples give the same bytes
            for key, files in samples:
                writer.write({"__key__": key, **files})
                count += 1
            writer.close()
    return count
