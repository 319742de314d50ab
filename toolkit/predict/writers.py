"""Output of `tk infer`: table, csv, jsonl and json rows written as they come, and what
``--resume`` reads back.

Every format is valid UTF-8 whatever the file names hold:

- **Paths** go through :func:`escape_path`, a reversible escape: a byte of a file name that
  is not UTF-8 is written ``\\xNN`` (its hex value), and a backslash is doubled (``\\\\``),
  so ``bad\\xff.png`` on disk reads ``bad\\\\xff.png`` in jsonl (JSON doubles the backslash
  again) and ``bad\\xff.png`` in csv and table output. :func:`unescape_path` gives the name
  back (``os.fsencode`` of it is the original bytes); ``--resume`` uses it.
- **csv** cells that a spreadsheet would read as a formula (first character ``=``, ``+``,
  ``-``, ``@``, tab or carriage return, as OWASP lists them) get a leading ``'`` so they
  stay text; a cell that starts with ``'`` gets one more, so the rule can be undone
  (:func:`csv_text`): strip one leading ``'`` when a character of that list follows it.
  ``--csv-raw`` writes the cells as they are. Cells holding ``,``, ``"``, CR or LF are
  quoted (RFC 4180); lines end with LF.
- **table** output escapes control characters in labels, paths and errors as ``\\xNN``
  (after :func:`escape_path`), so a class name holding a newline cannot forge a row.
- Labels and error texts that still hold unencodable characters are written with
  Python's ``backslashreplace`` (``\\udcff``), never as invalid bytes.

Writes that fail (``-o /dev/full``, a full disk) raise :class:`OutputError` (one line); a
closed pipe (``tk infer ... | head -1``) raises ``BrokenPipeError``, which the command
turns into the quiet exit of other Unix tools.

``--resume`` (jsonl and csv) reads the rows already in the file by parsing them, not by
lines: an incomplete last record (a kill in the middle of a row, even inside a quoted
multi-line csv cell) is dropped (:class:`ResumeState` ``keep``), and files are compared
by resolved path, so a resumed run from another working directory skips what is done.
"""

from __future__ import annotations

import csv
import json
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from toolkit.errors import TkError, describe_os_error

FORMATS = ("table", "csv", "jsonl", "json")

if TYPE_CHECKING:
    from toolkit.predict.runner import Prediction


class OutputError(TkError):
    """The output cannot be written (full disk, ``/dev/full``, a read-only target)."""


# -- escapes ------------------------------------------------------------------------------

def escape_path(path: str) -> str:
    """``path`` (a str from ``os.fsdecode``) as valid text: undecodable bytes (Python's
    surrogate escapes ``\\udc80``-``\\udcff``) become ``\\xNN``, ``\\`` becomes ``\\\\``;
    other lone surrogates (never from a POSIX file name) become ``\\uNNNN``."""
    if "\\" not in path and (path.isascii() or not _has_surrogates(path)):
        return path
    out = []
    for ch in path:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


_UNESCAPE = re.compile(r"\\(\\|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4})")


def unescape_path(text: str) -> str:
    """The inverse of :func:`escape_path`."""
    if "\\" not in text:
        return text

    def one(m: re.Match[str]) -> str:
        token = m.group(1)
        if token == "\\":
            return "\\"
        if token[0] == "x":
            return chr(0xDC00 + int(token[1:], 16))
        return chr(int(token[1:], 16))

    return _UNESCAPE.sub(one, text)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def escape_control(text: str) -> str:
    """Control characters (C0, DEL, C1) as ``\\xNN``: one table row stays one line."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


CSV_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
"""First characters that make a spreadsheet read a cell as a formula (OWASP)."""


def csv_cell(text: str, raw: bool = False) -> str:
    """A csv text cell, neutralised (see the module doc) unless ``raw``."""
    if not raw and text and (text[0] in CSV_TRIGGERS or text[0] == "'"):
        return "'" + text
    return text


def csv_text(cell: str, raw: bool = False) -> str:
    """The text of a cell written by :func:`csv_cell`."""
    if not raw and len(cell) > 1 and cell[0] == "'" and (cell[1] in CSV_TRIGGERS
                                                          or cell[1] == "'"):
        return cell[1:]
    return cell


def _csv_line(cells: Sequence[object]) -> str:
    out = []
    for cell in cells:
        text = cell if isinstance(cell, str) else str(cell)
        if any(c in text for c in ',"\r\n'):
            text = '"' + text.replace('"', '""') + '"'
        out.append(text)
    return ",".join(out) + "\n"


# -- writers ------------------------------------------------------------------------------

class RowWriter:
    """Writes rows to a text stream as they come, flushing each."""

    def __init__(self, stream: IO[str], classes: Sequence[str], topk: int, *,
                 csv_raw: bool = False, name: str = "stdout", multi_label: bool = False):
        self.multi_label = multi_label  # rows carry labels (csv: labels, label_scores)
        self.stream = stream
        self.classes = list(classes)
        self.topk = topk
        self.csv_raw = csv_raw
        self.name = name

    def emit(self, text: str) -> None:
        """Write and flush ``text``; a failure is one :class:`OutputError` line (a closed
        pipe stays ``BrokenPipeError``)."""
        try:
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputError(f"cannot write to {self.name}: {describe_os_error(exc)}") from None

    def begin(self, *, append: bool = False) -> None:  # noqa: B027 - optional hook
        pass

    def write(self, row: Prediction) -> None:
        raise NotImplementedError

    def end(self) -> None:
        self.emit("")


def row_dict(row: Prediction) -> dict[str, object]:
    """The JSON object of a row (jsonl and json output, `tk serve` answers): the path
    escaped (:func:`escape_path`)."""
    d = row.to_dict()
    if row.path is not None:
        d["path"] = escape_path(row.path)
    return d


class JsonlWriter(RowWriter):
    def write(self, row: Prediction) -> None:
        self.emit(json.dumps(row_dict(row), ensure_ascii=False) + "\n")


class JsonWriter(RowWriter):
    """A JSON array, streamed: ``[`` first, one row per line, ``]`` at the end."""

    def begin(self, *, append: bool = False) -> None:
        self.emit("[")
        self.first = True

    def write(self, row: Prediction) -> None:
        self.emit(("\n" if self.first else ",\n")
                  + json.dumps(row_dict(row), ensure_ascii=False))
        self.first = False

    def end(self) -> None:
        self.emit("\n]\n" if not self.first else "]\n")


def csv_header(topk: int, multi_label: bool = False) -> list[str]:
    """``path,label,score`` then ``label_2,score_2``... up to ``topk``, (multi-label:
    ``labels,label_scores``, ``;``-joined) then ``error``."""
    cols = ["path", "label", "score"]
    for k in range(2, topk + 1):
        cols += [f"label_{k}", f"score_{k}"]
    if multi_label:
        cols += ["labels", "label_scores"]
    return [*cols, "error"]


class CsvWriter(RowWriter):
    def begin(self, *, append: bool = False) -> None:
        if not append:
            self.emit(_csv_line(csv_header(self.topk, self.multi_label)))

    def write(self, row: Prediction) -> None:
        def text(value: str | None) -> str:
            return csv_cell(value or "", self.csv_raw)

        cells: list[object] = [text(escape_path(row.path or "")), text(_shown_label(row)),
                               "" if row.score is None else row.score]
        for k in range(1, self.topk):
            if k < len(row.topk):
                cells += [text(row.topk[k][0]), row.topk[k][1]]
            else:
                cells += ["", ""]
        if self.multi_label:
            labels = row.labels or []
            cells += [text(";".join(lab for lab, _ in labels)),
                      ";".join(f"{s:g}" for _, s in labels)]
        self.emit(_csv_line([*cells, text(row.error)]))


def _shown_label(row: Prediction) -> str:
    """The label cell of the table and csv: ``unknown`` for a predicted row without a label
    (its top score is below ``--min-score``), empty for an error row."""
    if row.label is None and row.error is None:
        from toolkit.predict.scoring import UNKNOWN

        return UNKNOWN
    return row.label or ""


def _table_text(text: str) -> str:
    return escape_control(escape_path(text))


class TableWriter(RowWriter):
    """For people: ``LABEL  SCORE  PATH`` (errors: ``ERROR  -  PATH  (reason)``); control
    characters escaped."""

    def begin(self, *, append: bool = False) -> None:
        self.width = max([7, *(len(_table_text(c)) for c in self.classes)])  # "unknown"
        if not append:
            self.emit(f"{'LABEL':<{self.width}}  {'SCORE':>6}  PATH\n")

    def line(self, row: Prediction) -> str:
        path = _table_text(row.path or "")
        if row.error is not None:
            return f"{'ERROR':<{self.width}}  {'-':>6}  {path}  ({_table_text(row.error)})"
        line = f"{_table_text(_shown_label(row)):<{self.width}}  {row.score:6.4f}  {path}"
        if row.labels is not None:
            line += "  labels: " + (";".join(_table_text(lab) for lab, _ in row.labels)
                                    or "(none)")
        if len(row.topk) > 1:
            line += "  | " + ", ".join(f"{_table_text(lab)} {s:.4f}" for lab, s in row.topk[1:])
        return line

    def write(self, row: Prediction) -> None:
        self.emit(self.line(row) + "\n")


WRITERS: dict[str, type[RowWriter]] = {"table": TableWriter, "csv": CsvWriter,
                                       "jsonl": JsonlWriter, "json": JsonWriter}


def format_for_path(path: str | os.PathLike[str] | None) -> str:
    """The output format an ``-o`` file's extension implies (``table`` otherwise)."""
    if path is None:
        return "table"
    suffix = Path(path).suffix.lower()
    return {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".json": "json"
            }.get(suffix, "table")


def open_output(path: str, *, append: bool) -> IO[str]:
    """``-o FILE`` as a UTF-8 text stream (``backslashreplace`` for what cannot be
    encoded)."""
    try:
        return open(path, "a" if append else "w", encoding="utf-8",  # noqa: SIM115
                    errors="backslashreplace", newline="")
    except OSError as exc:
        raise OutputError(f"-o {path}: cannot write ({describe_os_error(exc)})") from None


def stdout_stream() -> IO[str]:
    """Standard output, set to write UTF-8 with ``backslashreplace`` (never invalid bytes).
    Raises :class:`TkError` when standard output is closed."""
    import io
    import sys

    out = sys.stdout
    if out is None:
        raise TkError("standard output is closed: pass -o FILE")
    try:
        os.fstat(out.fileno())
    except (ValueError, io.UnsupportedOperation):
        pass  # not backed by a file descriptor (a test's capture): use it as it is
    except OSError:
        raise TkError("standard output is closed: pass -o FILE") from None
    reconfigure = getattr(out, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(encoding="utf-8", errors="backslashreplace")
        except (ValueError, OSError, io.UnsupportedOperation):
            pass
    return out


# -- resume -------------------------------------------------------------------------------

@dataclass
class ResumeState:
    """What an earlier run left in ``-o FILE``: the paths of its complete rows (as written,
    unescaped) and how many leading bytes hold complete records (``keep``; the rest is an
    interrupted write, cut off before appending)."""

    paths: list[str] = field(default_factory=list)
    keep: int = 0


def read_output(output: str | os.PathLike[str], fmt: str, topk: int, *,
                csv_raw: bool = False) -> ResumeState:
    """Parse ``output`` (jsonl or csv) for ``--resume``. A missing file is an empty state."""
    if fmt not in ("jsonl", "csv"):
        raise TkError(f"--resume needs --format jsonl or csv (not {fmt})")
    name = os.fspath(output)
    try:
        st = os.stat(name)
    except FileNotFoundError:
        return ResumeState()
    except OSError as exc:
        raise TkError(f"--resume: cannot read {name}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise TkError(f"--resume: {name} is not a regular file")
    try:
        with open(name, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise TkError(f"--resume: cannot read {name}: {exc.strerror or exc}") from None
    lines = _complete_lines(data, name)
    if fmt == "jsonl":
        return _read_jsonl(lines)
    return _read_csv(lines, name, topk, csv_raw)


def _complete_lines(data: bytes, name: str) -> list[tuple[str, int]]:
    """``(line text, byte offset after it)`` for every line that ends with a newline."""
    out: list[tuple[str, int]] = []
    start = 0
    while True:
        end = data.find(b"\n", start)
        if end < 0:
            return out
        try:
            text = data[start:end + 1].decode("utf-8")
        except UnicodeDecodeError:
            raise TkError(f"--resume: {name} is not UTF-8 text (not a tk output?)") from None
        out.append((text, end + 1))
        start = end + 1


def _read_jsonl(lines: list[tuple[str, int]]) -> ResumeState:
    state = ResumeState()
    for text, end in lines:
        try:
            row = json.loads(text)
        except ValueError:
            continue  # not a row (hand-edited?); the next rows still count
        if isinstance(row, dict) and isinstance(row.get("path"), str):
            state.paths.append(unescape_path(row["path"]))
        state.keep = end
    return state


def _read_csv(lines: list[tuple[str, int]], name: str, topk: int, raw: bool) -> ResumeState:
    state = ResumeState()
    consumed = [0]

    def feed() -> Iterator[str]:
        for text, end in lines:
            consumed[0] = end
            yield text

    reader = csv.reader(feed(), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            return state
        if header not in (csv_header(topk), csv_header(topk, True)):
            raise TkError(f"--resume: {name} has the columns {','.join(header)}, not those "
                          f"of this run ({','.join(csv_header(topk))}); same --topk?")
        state.keep = consumed[0]
        for cells in reader:
            if cells:
                state.paths.append(unescape_path(csv_text(cells[0], raw)))
            state.keep = consumed[0]
    except csv.Error:
        # the end of the file inside a quoted cell: an interrupted record, dropped
        if consumed[0] != lines[-1][1]:
            raise TkError(f"--resume: {name} is not a csv file tk wrote (line "
                          f"{reader.line_num})") from None
    return state


def truncate_output(output: str | os.PathLike[str], keep: int) -> None:
    """Cut ``output`` to its first ``keep`` bytes (dropping an interrupted record)."""
    try:
        if os.path.getsize(output) > keep:
            os.truncate(output, keep)
    except OSError as exc:
        raise OutputError(f"-o {os.fspath(output)}: cannot repair its end before "
                          f"appending ({describe_os_error(exc)})") from None


class PathKeys:
    """Files by resolved identity: ``(real path of the folder, name)``, folders resolved
    once each. The name itself is not resolved: two links to one file are two files."""

    def __init__(self) -> None:
        self._dirs: dict[str, str] = {}

    def key(self, path: str, base: str | None = None) -> tuple[str, str]:
        folder, name = os.path.split(path)
        if base is not None and not os.path.isabs(path):
            folder = os.path.join(base, folder)
        folder = folder or "."
        real = self._dirs.get(folder)
        if real is None:
            real = self._dirs[folder] = os.path.realpath(folder)
        return real, name


def done_indices(paths: Sequence[str], written: Sequence[str], output: str | os.PathLike[str],
                 keys: PathKeys | None = None) -> set[int]:
    """Positions in ``paths`` (this run's files) that already have a row (``written``, the
    row paths of the earlier run). Compared by resolved path: an absolute row path as is, a
    relative one against this working directory, else the output's folder or one of its
    parents (where the earlier run may have been started)."""
    keys = keys or PathKeys()
    todo: dict[tuple[str, str], list[int]] = {}
    for i, p in enumerate(paths):
        todo.setdefault(keys.key(p), []).append(i)
    out_dir = os.path.dirname(os.path.realpath(os.fspath(output)))
    bases: list[str | None] = [None]
    folder = out_dir
    while True:
        bases.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    found: set[int] = set()
    for row_path in written:
        candidates: Sequence[str | None] = [None] if os.path.isabs(row_path) else bases
        for base in candidates:
            hit = todo.get(keys.key(row_path, base))
            if hit is not None:
                found.update(hit)
                break
    return found

