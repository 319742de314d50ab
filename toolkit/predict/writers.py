"""Output of `tk infer`: table, csv, jsonl and json rows written as they come, and what
``--resume`` reads back."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from toolkit.errors import TkError

FORMATS = ("table", "csv", "jsonl", "json")

if TYPE_CHECKING:
    from toolkit.predict.runner import Prediction


class RowWriter:
    """Writes rows to a text stream as they come, flushing each."""

    def __init__(self, stream: IO[str], classes: Sequence[str], topk: int):
        self.stream = stream
        self.classes = list(classes)
        self.topk = topk

    def begin(self, *, append: bool = False) -> None:  # noqa: B027 - optional hook
        pass

    def write(self, row: Prediction) -> None:
        raise NotImplementedError

    def end(self) -> None:
        self.stream.flush()


class JsonlWriter(RowWriter):
    def write(self, row: Prediction) -> None:
        self.stream.write(json.dumps(row.to_dict(), ensure_ascii=False) + "\n")
        self.stream.flush()


class JsonWriter(RowWriter):
    """A JSON array, streamed: ``[`` first, one row per line, ``]`` at the end."""

    def begin(self, *, append: bool = False) -> None:
        self.stream.write("[")
        self.first = True

    def write(self, row: Prediction) -> None:
        self.stream.write(("\n" if self.first else ",\n")
                          + json.dumps(row.to_dict(), ensure_ascii=False))
        self.first = False
        self.stream.flush()

    def end(self) -> None:
        self.stream.write("\n]\n" if not self.first else "]\n")
        self.stream.flush()


def csv_header(topk: int) -> list[str]:
    """``path,label,score`` then ``label_2,score_2``... up to ``topk``, then ``error``."""
    cols = ["path", "label", "score"]
    for k in range(2, topk + 1):
        cols += [f"label_{k}", f"score_{k}"]
    return [*cols, "error"]


class CsvWriter(RowWriter):
    def begin(self, *, append: bool = False) -> None:
        self.csv = csv.writer(self.stream, lineterminator="\n")
        if not append:
            self.csv.writerow(csv_header(self.topk))
            self.stream.flush()

    def write(self, row: Prediction) -> None:
        cells: list[Any] = [row.path, row.label or "", "" if row.score is None else row.score]
        for k in range(1, self.topk):
            if k < len(row.topk):
                cells += [row.topk[k][0], row.topk[k][1]]
            else:
                cells += ["", ""]
        self.csv.writerow([*cells, row.error or ""])
        self.stream.flush()


class TableWriter(RowWriter):
    """For people: ``LABEL  SCORE  PATH`` (errors: ``ERROR  -  PATH  reason``)."""

    def begin(self, *, append: bool = False) -> None:
        self.width = max([5, *(len(c) for c in self.classes)])
        if not append:
            self.stream.write(f"{'LABEL':<{self.width}}  {'SCORE':>6}  PATH\n")
            self.stream.flush()

    def write(self, row: Prediction) -> None:
        if row.error is not None:
            line = f"{'ERROR':<{self.width}}  {'-':>6}  {row.path}  ({row.error})"
        else:
            line = f"{row.label:<{self.width}}  {row.score:6.4f}  {row.path}"
            if len(row.topk) > 1:
                line += "  | " + ", ".join(f"{lab} {s:.4f}" for lab, s in row.topk[1:])
        self.stream.write(line + "\n")
        self.stream.flush()


WRITERS: dict[str, type[RowWriter]] = {"table": TableWriter, "csv": CsvWriter,
                                       "jsonl": JsonlWriter, "json": JsonWriter}


def format_for_path(path: str | os.PathLike[str] | None) -> str:
    """The output format an ``-o`` file's extension implies (``table`` otherwise)."""
    if path is None:
        return "table"
    suffix = Path(path).suffix.lower()
    return {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".json": "json"
            }.get(suffix, "table")


def _key(path: str) -> str:
    return os.path.abspath(path)


def done_paths(output: str | os.PathLike[str], fmt: str, topk: int) -> set[str]:
    """Absolute paths of the files that already have a row in ``output`` (jsonl / csv).
    An incomplete last line (an interrupted write) is ignored."""
    if fmt not in ("jsonl", "csv"):
        raise TkError(f"--resume needs --format jsonl or csv (not {fmt})")
    try:
        with open(output, encoding="utf-8", newline="") as fh:
            text = fh.read()
    except FileNotFoundError:
        return set()
    except (OSError, UnicodeDecodeError) as exc:
        raise TkError(f"--resume: cannot read {output}: {exc}") from None
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    done: set[str] = set()
    if fmt == "jsonl":
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("path"), str):
                done.add(_key(row["path"]))
        return done
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        return done
    if header != csv_header(topk):
        raise TkError(f"--resume: {output} has the columns {','.join(header)}, not those of "
                      f"this run ({','.join(csv_header(topk))}); same --topk?")
    for cells in reader:
        if cells:
            done.add(_key(cells[0]))
    return done


def repair_tail(output: str | os.PathLike[str]) -> bool:
    """Cut an incomplete last line (from an interrupted run) off ``output``; whether the
    file has content left."""
    try:
        with open(output, "rb+") as fh:
            data = fh.read()
            if data and not data.endswith(b"\n"):
                fh.truncate(data.rfind(b"\n") + 1)
            return bool(data) and data.rfind(b"\n") >= 0
    except FileNotFoundError:
        return False
