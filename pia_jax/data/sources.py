"""Video sources: CSV files that list videos and their captions.

Each source yields `Row(key, path, caption)`; a row whose video is missing keeps `path=None` so that preparation can
count it as skipped instead of failing.
"""

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@dataclass(frozen=True)
class Row:
    key: str  # unique within the source: the WebVid videoid or the CSV path
    path: str | None  # None where no video file was found
    caption: str


COLUMNS = {"webvid": ("videoid", "name", "page_dir"), "csv": ("path", "caption")}


def check_source(kind: str, csv_path, video_folder=None) -> None:
    """Raises ValueError (with what is wrong and what is expected) unless the CSV can be read, has the columns of
    its kind, and a webvid source's video folder exists. Cheap: reads the header only."""
    if kind not in COLUMNS:
        raise ValueError(f"unknown source kind {kind!r}; expected one of {list(COLUMNS)}")
    if kind == "webvid" and (video_folder is None or not Path(video_folder).is_dir()):
        raise ValueError(f"the video folder {video_folder} does not exist (--videos)")
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"cannot read the CSV {csv_path}: {e}") from None
    missing = [c for c in COLUMNS[kind] if c not in header]
    if missing:
        raise ValueError(f"{csv_path}: missing column(s) {missing}; a {kind} CSV needs {list(COLUMNS[kind])}, "
                         f"found {header}")


def _read_csv(csv_path, kind: str) -> Iterator[dict]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS[kind] if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing}; found {reader.fieldnames}")
        yield from reader


def webvid_rows(csv_path, video_folder) -> Iterator[Row]:
    """Rows of a WebVid-style CSV (`videoid`, `name` = caption, `page_dir`), as AnimateDiff and PIA read it.

    The video is `{video_folder}/{videoid}.mp4` (the reference's local layout) or
    `{video_folder}/{page_dir}/{videoid}.mp4` (its object-store layout); each row takes whichever exists.
    """
    folder = Path(video_folder)
    for r in _read_csv(csv_path, "webvid"):
        vid = r["videoid"]
        candidates = (folder / f"{vid}.mp4", folder / r["page_dir"] / f"{vid}.mp4")
        path = next((str(p) for p in candidates if p.is_file()), None)
        yield Row(key=vid, path=path, caption=r["name"])


def generic_rows(csv_path) -> Iterator[Row]:
    """Rows of a CSV with columns `path` and `caption`; relative paths are relative to the CSV's folder."""
    base = Path(csv_path).parent
    for r in _read_csv(csv_path, "csv"):
        path = base / r["path"]  # an absolute r["path"] replaces base
        yield Row(key=r["path"], path=str(path) if path.is_file() else None, caption=r["caption"])


def rows_from(kind: str, csv_path, video_folder=None) -> Iterator[Row]:
    """Rows of a source of the given kind: 'webvid' (needs video_folder) or 'csv'."""
    if kind == "webvid":
        if video_folder is None:
            raise ValueError("a webvid source needs the video folder")
        return webvid_rows(csv_path, video_folder)
    if kind == "csv":
        return generic_rows(csv_path)
    raise ValueError(f"unknown source kind {kind!r}; expected 'webvid' or 'csv'")
