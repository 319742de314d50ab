"""`tk infer` against hostile but realistic use (issue 12; rows of docs/hardening.md): the
output target, file names, csv cells, interrupted outputs, pipes and full disks, odd
folder entries, file-descriptor limits, progress. Every case runs the real `tk` command
in a subprocess, under a timeout, on real files."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import pty
import re
import resource
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from conftest import TINY_PLUGIN, save_colour_model, write_image

from toolkit.predict.writers import unescape_path
from toolkit.testing import isolated_env

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 20, 20), "green": (10, 200, 30), "blue": (20, 30, 210)}
TIMEOUT = 300


def run(*args: str | bytes, home: Path, cwd: Path = REPO, env: dict[str, str] | None = None,
        **popen) -> subprocess.CompletedProcess[bytes]:
    """``python -m toolkit ARGS``; stdout and stderr as bytes (decoded by the test)."""
    full_env = isolated_env(home, {"TK_PLUGINS": TINY_PLUGIN, **(env or {})})
    if "stdout" not in popen and "stderr" not in popen:
        popen["capture_output"] = True
    return subprocess.run([sys.executable, "-m", "toolkit", *args], env=full_env, cwd=cwd,
                          timeout=TIMEOUT, **popen)


def err_lines(r: subprocess.CompletedProcess[bytes]) -> list[str]:
    return r.stderr.decode("utf-8").splitlines()


def colour_folder(root: Path, n: int = 6) -> list[Path]:
    files = []
    for i in range(n):
        colour = list(COLOURS)[i % 3]
        files.append(write_image(root / f"{i}_{colour}.png", (32, 32), COLOURS[colour]))
    return files


def save_png(path: Path | bytes, colour: tuple[int, int, int]) -> None:
    """A 32x32 PNG at ``path`` (bytes paths allowed: names that are not UTF-8)."""
    from PIL import Image

    with open(path, "wb") as fh:
        Image.new("RGB", (32, 32), colour).save(fh, format="PNG")


def cut_after(path: Path, complete: int, header: int = 0, partial: int = 10) -> bytes:
    """Keep ``header + complete`` lines and ``partial`` bytes of the next, as a kill leaves
    it; return the full content."""
    full = path.read_bytes()
    lines = full.splitlines(keepends=True)
    keep = lines[: header + complete]
    path.write_bytes(b"".join(keep) + lines[header + complete][:partial])
    return full


# -- 1. -o never destroys an input or the store ------------------------------------------

def test_output_that_is_an_input_or_a_store_file_is_refused_before_any_work(tmp_path,
                                                                              colour_model):
    store_dir, name = colour_model
    images = tmp_path / "images"
    red, green, *_ = colour_folder(images, 3)
    model_file = store_dir / "models" / f"{name}.safetensors"
    before = {p: p.read_bytes() for p in [*images.iterdir(), model_file]}
    (tmp_path / "link.png").symlink_to(red)
    os.link(green, tmp_path / "hard.png")
    (tmp_path / "model-link").symlink_to(model_file)
    os.link(model_file, tmp_path / "model-hard")
    (tmp_path / "dangling-into-store").symlink_to(store_dir / "models" / "new.safetensors")
    cases = [
        (red, "is the input file"),
        (tmp_path / "link.png", "(through a link)"),
        (tmp_path / "hard.png", "is the input file"),
        (model_file, "is inside the model store"),
        (tmp_path / "model-link", "is inside the model store"),
        (tmp_path / "model-hard", "model"),  # the store's own check, or the model file
        (store_dir / "models" / "rows.jsonl", "is inside the model store"),
        (tmp_path / "dangling-into-store", "is inside the model store"),
    ]
    for out, message in cases:
        r = run("infer", str(images), "--model", name, "--store", str(store_dir), "-o",
                str(out), home=tmp_path)
        lines = err_lines(r)
        assert r.returncode == 2, (out, lines)
        assert len(lines) == 1 and lines[0].startswith("tk: error: -o ") and message in \
            lines[0], (out, lines)
        assert r.stdout == b""
    assert {p: p.read_bytes() for p in before} == before  # nothing touched
    assert not (store_dir / "models" / "rows.jsonl").exists()
    assert not (store_dir / "models" / "new.safetensors").exists()
    r = run("store", "verify", "--store", str(store_dir), home=tmp_path)
    assert r.returncode == 0, r.stderr
    # an output next to the inputs, not one of them, is fine
    r = run("infer", str(images), "--model", name, "--store", str(store_dir), "-o",
            str(images / "rows.jsonl"), "-q", home=tmp_path)
    assert r.returncode == 0, r.stderr


# -- 2. file names that are not UTF-8 ------------------------------------------------------

@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse such names")
def test_file_names_that_are_not_utf8_give_valid_utf8_in_every_format(tmp_path,
                                                                       colour_model):
    store_dir, name = colour_model
    images = tmp_path / "images"
    images.mkdir()
    raw = {b"a_bad\xff\xfe.png": "red", b"b_back\\slash.png": "green",
           "c_\u00fcn\u00efc\u00f6de.png".encode(): "blue", b"d_plain.png": "red"}
    for filename, colour in raw.items():
        save_png(os.path.join(os.fsencode(images), filename), COLOURS[colour])
    args = ("infer", str(images), "--model", name, "--store", str(store_dir), "-q")

    # -o FILE in jsonl and csv, each killed in the middle of a row then resumed; stdout
    # in the table format: all strict UTF-8, every file once
    outputs = {}
    for out, header in ((tmp_path / "out.jsonl", 0), (tmp_path / "out.csv", 1)):
        r = run(*args, "-o", str(out), home=tmp_path)
        assert r.returncode == 0, r.stderr
        full = cut_after(out, 2, header)
        r = run(*args, "-o", str(out), "--resume", home=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "2 file(s) already in" in r.stderr.decode()
        assert out.read_bytes() == full
        outputs[out.suffix] = full.decode("utf-8")  # strict: raises on invalid UTF-8
    r = run(*args, "--format", "table", home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "a_bad\\xff\\xfe.png" in r.stdout.decode("utf-8")

    rows = [json.loads(line) for line in outputs[".jsonl"].splitlines()]
    # the documented escape: \xNN for a byte that is not UTF-8, \\ for a backslash
    assert [Path(r["path"]).name for r in rows] == [
        "a_bad\\xff\\xfe.png", "b_back\\\\slash.png", "c_\u00fcn\u00efc\u00f6de.png",
        "d_plain.png"]
    for row, (filename, colour) in zip(rows, raw.items(), strict=True):
        assert os.fsencode(unescape_path(row["path"])) == os.path.join(
            os.fsencode(images), filename)  # reversible, byte for byte
        assert row["label"] == colour and row["error"] is None
    table = list(csv.reader(io.StringIO(outputs[".csv"])))
    assert [Path(r[0]).name for r in table[1:]] == [Path(r["path"]).name for r in rows]


# -- 3. csv formula injection, control characters in the table ------------------------------

def test_csv_cells_a_spreadsheet_would_run_are_neutralised(tmp_path):
    store_dir = tmp_path / "store"
    classes = ('=HYPERLINK("http://evil","x")', "+red\nFORGED  0.9999  /etc/passwd", "@blue")
    name = save_colour_model(store_dir, "evil", classes=classes)
    images = tmp_path / "images"
    images.mkdir()
    files = {"=cmd.png": "red", "-rm.png": "green", "'quoted.png": "blue", "plain.png": "red"}
    for filename, colour in files.items():
        save_png(images / filename, COLOURS[colour])
    options = ["infer", "--model", name, "--store", str(store_dir), "-q", "--topk", "2"]
    args = [*options, "--format", "csv", "--", *files]  # relative: the cells start with them

    r = run(*args, home=tmp_path, cwd=images)
    assert r.returncode == 0, r.stderr
    table = list(csv.reader(io.StringIO(r.stdout.decode())))
    assert table[0] == ["path", "label", "score", "label_2", "score_2", "error"]
    body = table[1:]
    assert [row[0] for row in body] == ["'=cmd.png", "'-rm.png", "''quoted.png", "plain.png"]
    assert body[0][1] == "'" + classes[0] and body[1][1] == "'" + classes[1]
    assert body[2][1] == "'@blue"
    dangerous = ("=", "+", "-", "@", "\t", "\r")
    assert not [cell for row in body for cell in row if cell.startswith(dangerous)]

    raw = run(*options, "--csv-raw", "--format", "csv", "--", *files, home=tmp_path,
              cwd=images)
    raw_rows = list(csv.reader(io.StringIO(raw.stdout.decode())))[1:]
    assert [row[0] for row in raw_rows] == list(files)
    assert raw_rows[0][1] == classes[0]

    # resume reads the neutralised cells back
    out = tmp_path / "out.csv"
    r = run(*options, "-o", str(out), "--", *files, home=tmp_path, cwd=images)
    full = cut_after(out, 3, header=1)  # lines, not rows: a label holds a newline
    r = run(*options, "-o", str(out), "--resume", "--", *files, home=tmp_path, cwd=images)
    assert r.returncode == 0, r.stderr
    assert re.search(r"--resume: [12] file\(s\) already in", r.stderr.decode()), r.stderr
    assert out.read_bytes() == full

    # table: the class name holding a newline cannot forge a row
    table_out = run(*options, "--format", "table", str(images), home=tmp_path).stdout.decode()
    lines = table_out.splitlines()
    assert len(lines) == 1 + len(files)
    assert not any(line.startswith("FORGED") for line in lines)
    assert "+red\\x0aFORGED" in table_out


# -- 8. --resume: a cut inside a quoted multi-line cell, another working directory -----------

def test_resume_after_a_cut_inside_a_multiline_csv_cell(tmp_path, colour_model):
    store_dir, name = colour_model
    images = tmp_path / "images"
    images.mkdir()
    names = ["a.png", 'b with\nnewline, comma and "quote".png', "c.png", "d.png"]
    for i, filename in enumerate(names):
        save_png(images / filename, COLOURS[list(COLOURS)[i % 3]])
    out = tmp_path / "out.csv"
    args = ("infer", str(images), "--model", name, "--store", str(store_dir), "-q", "-o",
            str(out))
    assert run(*args, home=tmp_path).returncode == 0
    full = out.read_bytes()
    cut = full.index(b"b with\n") + len(b"b with\n")  # inside the quoted cell, after a \n
    out.write_bytes(full[:cut])
    r = run(*args, "--resume", home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "1 file(s) already in" in r.stderr.decode()
    assert out.read_bytes() == full
    parsed = list(csv.reader(io.StringIO(full.decode())))
    assert [Path(row[0]).name for row in parsed[1:]] == names


def test_resume_from_another_working_directory(tmp_path, colour_model):
    store_dir, name = colour_model
    a, b = tmp_path / "a", tmp_path / "b"
    colour_folder(a / "imgs", 6)
    b.mkdir()
    base = ("infer", "--model", name, "--store", str(store_dir), "-q")
    r = run(*base, "imgs", "-o", "out.jsonl", home=tmp_path, cwd=a)
    assert r.returncode == 0, r.stderr
    cut_after(a / "out.jsonl", 3)
    r = run(*base, "../a/imgs", "-o", "../a/out.jsonl", "--resume", home=tmp_path, cwd=b)
    assert r.returncode == 0, r.stderr
    assert "3 file(s) already in" in r.stderr.decode()
    rows = [json.loads(line) for line in (a / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    resolved = [os.path.realpath(a / row["path"]) if i < 3 else
                os.path.realpath(b / row["path"]) for i, row in enumerate(rows)]
    assert sorted(resolved) == sorted(str(p.resolve()) for p in (a / "imgs").iterdir())


# -- 11. closed pipes, full disks, closed stdout ---------------------------------------------

def test_closed_pipe_is_a_quiet_exit(tmp_path, colour_model):
    store_dir, name = colour_model
    colour_folder(tmp_path / "images", 6)
    args = ("infer", str(tmp_path / "images"), "--model", name, "--store", str(store_dir))
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read: the first write fails with EPIPE
    try:
        r = run(*args, home=tmp_path, stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert r.returncode == 141, r.stderr  # 128 + SIGPIPE, like other Unix tools
    assert r.stderr.decode().splitlines() == [], r.stderr  # not even the summary
    # the shell's `| head -1`
    env = isolated_env(tmp_path, {"TK_PLUGINS": TINY_PLUGIN})
    cmd = " ".join([sys.executable, "-m", "toolkit", *args])
    p = subprocess.run(["bash", "-c", f"{cmd} | head -1; echo \"status ${{PIPESTATUS[0]}}\""],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    out = p.stdout.splitlines()
    assert out[0].split() == ["LABEL", "SCORE", "PATH"]
    assert out[-1] in ("status 141", "status 0"), p.stdout  # 0: it finished before head
    assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr


def test_full_disk_file_size_limit_and_closed_stdout_are_one_line(tmp_path, colour_model):
    store_dir, name = colour_model
    colour_folder(tmp_path / "images", 12)
    args = ("infer", str(tmp_path / "images"), "--model", name, "--store", str(store_dir),
            "-q")
    r = run(*args, "-o", "/dev/full", home=tmp_path)
    assert r.returncode == 2
    assert err_lines(r) == ["tk: error: cannot write to /dev/full: no space left on device"]

    r = run(*args, home=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=lambda: os.close(1))
    assert r.returncode == 2
    assert err_lines(r) == ["tk: error: standard output is closed: pass -o FILE"]

    out = tmp_path / "out.jsonl"
    limit = 700  # a few rows fit

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = run(*args, "-o", str(out), "--batch-size", "2", home=tmp_path, preexec_fn=small_files)
    assert r.returncode == 2, r.stderr
    lines = err_lines(r)
    assert len(lines) == 1 and "file too large" in lines[0], lines
    assert 0 < out.stat().st_size <= limit
    r = run(*args, "-o", str(out), "--resume", home=tmp_path)  # with room again
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12 and len({row["path"] for row in rows}) == 12


# -- 4. extreme aspect ratios ------------------------------------------------------------------

PEAK_RSS = ("import os, sys, resource, subprocess; p = subprocess.run(sys.argv[1:]); "
            "print('peak-kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
            "file=sys.stderr); sys.exit(p.returncode)")


def test_extreme_aspect_ratio_is_a_row_error_in_inference_and_stops_training(tmp_path,
                                                                             colour_model):
    from PIL import Image

    store_dir, name = colour_model
    images = tmp_path / "images"
    colour_folder(images, 2)
    Image.new("RGB", (200_000, 1), (200, 10, 10)).save(images / "strip.png")
    assert (images / "strip.png").stat().st_size < 2000
    env = isolated_env(tmp_path, {"TK_PLUGINS": TINY_PLUGIN})
    r = subprocess.run([sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "toolkit",
                        "infer", str(images), "--model", name, "--store", str(store_dir),
                        "--format", "jsonl", "-q"], env=env, capture_output=True, text=True,
                       timeout=TIMEOUT, cwd=REPO)
    assert r.returncode == 1, r.stderr  # one file failed
    rows = {Path(row["path"]).name: row for row in map(json.loads, r.stdout.splitlines())}
    assert "extreme aspect ratio: 200000x1" in rows["strip.png"]["error"]
    assert rows["0_red.png"]["label"] == "red" and rows["1_green.png"]["label"] == "green"
    peak_kb = int(r.stderr.strip().splitlines()[-1].split()[1])
    assert peak_kb < 2_000_000  # resizing it would take 5.45 GB

    # the same file in a training folder stops training, naming it
    data = tmp_path / "data"
    for cls in ("a", "b"):
        for i in range(3):
            write_image(data / cls / f"{i}.png", (24, 24), COLOURS["red" if cls == "a"
                                                                   else "blue"])
    Image.new("RGB", (200_000, 1)).save(data / "b" / "strip.png")
    r = run("finetune", "--backbone", "tiny-cnn", "--no-pretrained", "--data", str(data),
            "--epochs", "1", "--workers", "0", "--name", "strip", "-q", home=tmp_path)
    assert r.returncode == 2, r.stderr
    errors = [line for line in err_lines(r) if line.startswith("tk: error:")]
    assert len(errors) == 1 and "strip.png" in errors[0], err_lines(r)
    assert "extreme aspect ratio" in errors[0] and "Traceback" not in r.stderr.decode()


# -- 13. few file descriptors ------------------------------------------------------------------

def test_ulimit_n_20_with_default_workers_predicts_every_file(tmp_path, colour_model):
    store_dir, name = colour_model
    colour_folder(tmp_path / "images", 40)

    def few_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (20, 20))

    r = run("infer", str(tmp_path / "images"), "--model", name, "--store", str(store_dir),
            "--format", "jsonl", "--workers", "4", "--batch-size", "4", "-q", home=tmp_path,
            preexec_fn=few_fds)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert len(rows) == 40 and all(row["error"] is None for row in rows)
    lines = err_lines(r)
    assert "Traceback" not in r.stderr.decode()
    assert len(lines) == 2 and "cannot start 4 decoding workers (ulimit -n is 20" in lines[0]


# -- 14. FIFOs and hidden folders are said; progress suits stderr ------------------------------

def test_fifos_and_hidden_folders_are_skipped_and_said(tmp_path, colour_model):
    store_dir, name = colour_model
    images = tmp_path / "images"
    write_image(images / "red.png", (32, 32), COLOURS["red"])
    os.mkfifo(images / "pipe.jpg")
    write_image(images / "..." / "green.png", (32, 32), COLOURS["green"])
    write_image(images / ".hidden.png", (32, 32), COLOURS["blue"])
    (images / ".DS_Store").write_bytes(b"\0")  # not an image name: not worth a word
    args = ("--model", name, "--store", str(store_dir), "--format", "jsonl", "-q")
    r = run("infer", str(images), *args, home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [Path(json.loads(x)["path"]).name for x in r.stdout.splitlines()] == ["red.png"]
    lines = err_lines(r)
    assert lines[0] == (f"tk: warning: skipped 1 entry that is not a regular file (FIFO): "
                        f"{images / 'pipe.jpg'}")
    assert lines[1] == (f"tk: warning: skipped 2 hidden entries (names starting with '.'; "
                        f"name a file to read it): {images / '...'}, {images / '.hidden.png'}")
    # named explicitly, the FIFO is an error row, never a hang
    r = run("infer", str(images / "pipe.jpg"), *args, home=tmp_path)
    assert r.returncode == 1
    assert json.loads(r.stdout)["error"] == "not a regular file (a FIFO)"


def test_progress_in_a_terminal_does_not_tear_table_rows(tmp_path, colour_model):
    """stdout and stderr on one terminal: the bar is cleared before each row and drawn
    again after, so every row reaches the screen whole, on a line of its own."""
    store_dir, name = colour_model
    colour_folder(tmp_path / "images", 30)
    env = isolated_env(tmp_path, {"TK_PLUGINS": TINY_PLUGIN})
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "toolkit", "infer",
                             str(tmp_path / "images"), "--model", name, "--store",
                             str(store_dir), "--batch-size", "4"], env=env, cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], TIMEOUT)
        if not ready:
            proc.kill()
            pytest.fail("tk infer did not finish")
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the other side is closed
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=TIMEOUT) == 0
    os.close(leader)
    screen = b"".join(chunks).decode()
    assert "infer:" in screen and "\r" in screen  # a real bar was drawn
    row = re.compile(r"^(red|green|blue) +\d\.\d{4}  \S+\.png$")
    shown = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line).split("\r")[-1]
             for line in screen.replace("\r\n", "\n").split("\n")]
    rows = [line for line in shown if line.endswith(".png")]
    assert len(rows) == 30 and all(row.match(line) for line in rows), rows


def test_bad_size_limits_in_the_environment_are_one_usage_error(tmp_path, colour_model):
    store_dir, name = colour_model
    colour_folder(tmp_path / "images", 3)
    for var in ("TK_MAX_IMAGE_PIXELS", "TK_MAX_ASPECT_RATIO"):
        r = run("infer", str(tmp_path / "images"), "--model", name, "--store",
                str(store_dir), home=tmp_path, env={var: "abc"})
        assert r.returncode == 2 and r.stdout == b""
        assert err_lines(r) == [f"tk: error: {var}='abc': expected a whole number"]
