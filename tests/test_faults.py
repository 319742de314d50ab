"""Faults with real processes: kill -9, a full disk, decompression bombs. Nothing is lost
and nothing half-written is ever listed.

Covered elsewhere (not repeated here):

- ``kill -9`` during `tk finetune`, then ``--resume`` gives bit-identical weights:
  ``tests/test_finetune.py::test_kill_then_resume_matches_uninterrupted_run`` (killed at
  an epoch end, before that epoch's checkpoint).
- ``kill -9`` during a store save, in the window after the data is written and before the
  rename, for bases and for models: ``tests/test_store.py::
  test_kill_during_save_leaves_no_half_model`` (the store lists only complete models,
  verifies clean, the next writer removes the dead one's temp file); disk full inside
  ``ModelStore.save``: ``tests/test_store.py::test_full_disk_leaves_nothing_partial``.

Added here: ``kill -9`` while the real `tk finetune` writes its checkpoint and while it
writes the model (then ``--resume`` finishes the run: no epoch is lost); a file-size limit
(``RLIMIT_FSIZE``: CPython ignores SIGXFSZ, so writes fail with EFBIG) during training and
during `tk store import-weights`; a small tmpfs that fills up while the trained model is
saved (when this machine lets the test mount one); decompression bombs through `tk infer`
and through training on an image folder.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TINY_PLUGIN, write_image

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--opt", "dataset.samples=60", "--opt", "dataset.image_size=32"]
# on the CPU: bit-identical weights after a resume are a property of deterministic kernels
# (on a GPU, cuDNN's convolution backward is not deterministic)
TRAIN = ["--plugin", TINY_PLUGIN, "finetune", "--backbone", "tiny-cnn", "--classes", "3",
         "--no-pretrained", "--seed", "1", "--batch-size", "16", "--device", "cpu", "-q",
         *SMALL]

# Loaded with --plugin: makes fsync slow so that a test can kill the process in the window
# between "temp file written" and "renamed into place" (as tests/test_store.py does).
SLOW_FSYNC_PLUGIN = textwrap.dedent('''
    """Test harness: every fsync sleeps first (widens the atomic-write window)."""
    import os
    import time

    _real_fsync = os.fsync


    def _slow_fsync(fd):
        time.sleep(float(os.environ.get("TK_TEST_FSYNC_DELAY", "0.4")))
        _real_fsync(fd)


    os.fsync = _slow_fsync
''')


def tk_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TK_DEBUG", "TK_PLUGINS", "TK_MAX_IMAGE_PIXELS")}
    env.update(TK_HOME=str(tmp_path / "home"), TORCH_HOME=str(tmp_path / "torch"),
               HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TK_DISABLE_PLUGINS="timm,torchvision", PYTHONPATH=str(REPO), **extra)
    return env


def tk(args: list[str], env: dict[str, str], *, preexec_fn=None, timeout: int = 300
       ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "toolkit", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec_fn)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("tk: ")]


def assert_one_clear_error(proc: subprocess.CompletedProcess, *parts: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and errors[0].startswith("tk: error: "), proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == errors[0]  # the last word is the error
    for part in parts:
        assert part in errors[0], errors[0]
    return errors[0]


def assert_store_consistent(store: Path, names: list[str]) -> None:
    """`tk store list` shows exactly ``names`` (complete models), `tk store verify` is
    clean, and no temp file of a dead writer is listed as a model."""
    from model_store import ModelStore

    ms = ModelStore(store)
    assert sorted(i.name for i in ms.list()) == sorted(names)
    assert ms.damaged() == []
    assert all(r.ok for r in ms.verify()), [r for r in ms.verify() if not r.ok]
    shown = [p.name for p in (store / "models").glob("*.safetensors")
             if not p.name.startswith(".")] if (store / "models").exists() else []
    assert sorted(shown) == sorted(f"{n}.safetensors" for n in names)


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# -- kill -9 inside the atomic writes of a real `tk finetune` ---------------------------------


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if ready():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        assert proc.poll() is not None or proc.wait(30) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_kill_during_real_saves_then_resume_loses_nothing(tmp_path: Path):
    """`tk finetune` killed twice: while the last epoch's checkpoint is being written,
    then (resumed) while the trained model is being written (each time a temp file there,
    not yet renamed). Each time no model is listed, the store verifies and the last
    complete checkpoint is intact; the final `--resume` saves the same weights as a run
    that was never interrupted, and no temp file is left behind."""
    slow = tmp_path / "slow_fsync.py"
    slow.write_text(SLOW_FSYNC_PLUGIN)
    env = tk_env(tmp_path, TK_TEST_FSYNC_DELAY="0.3")
    store = tmp_path / "home"
    straight = tk([*TRAIN, "--epochs", "2", "--name", "straight"], env)
    assert straight.returncode == 0, straight.stderr
    run_dir = store / "runs" / "victim"
    models = store / "models"
    victim = [sys.executable, "-m", "toolkit", "--plugin", str(slow), *TRAIN, "--epochs", "2",
              "--name", "victim"]

    def checkpoint_window() -> bool:  # epoch 2's checkpoint is being written
        return (run_dir / "checkpoint.safetensors").exists() and any(
            run_dir.glob(".tk-tmp-*checkpoint*"))

    def model_window() -> bool:
        return any(models.glob(".tk-tmp-*victim*"))

    for ready, extra, resumed_after in ((checkpoint_window, [], None),
                                        (model_window, ["--resume"], 1)):
        proc = subprocess.Popen([*victim, *extra], env=env, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _kill_when(proc, ready)
        stderr = proc.stderr.read() if proc.stderr else ""
        assert proc.returncode == -signal.SIGKILL, stderr
        if resumed_after:
            assert f"resuming after epoch {resumed_after}" in stderr
        assert_store_consistent(store, ["straight"])
        assert (run_dir / "checkpoint.safetensors").exists()  # the last complete epoch

    resumed = tk([*TRAIN, "--epochs", "2", "--name", "victim", "--resume"], env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 2" in resumed.stderr  # nothing to train again: just saved
    assert_store_consistent(store, ["straight", "victim"])
    assert not list(store.rglob(".ckpt-*")) and not list(store.rglob(".tk-tmp-*"))
    a, b = tensors(models / "straight.safetensors"), tensors(models / "victim.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


# -- a full disk --------------------------------------------------------------------------


def _file_size_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_file_size_limit_during_training_is_one_clear_line(tmp_path: Path):
    """The checkpoint (the first file training writes) hits the limit: one clear line,
    exit 2, no model listed, the store verifies."""
    env = tk_env(tmp_path)
    proc = tk([*TRAIN, "--epochs", "2", "--name", "big"], env,
              preexec_fn=_file_size_limit(20_000))
    assert_one_clear_error(proc, "cannot write checkpoint", "file too large",
                           "the previous checkpoint, if any, is kept")
    store = tmp_path / "home"
    assert_store_consistent(store, [])
    assert not list((store / "runs").rglob(".tk-tmp-*"))  # the temp file went with the error


def test_file_size_limit_during_import_weights(tmp_path: Path):
    """`tk store import-weights` into a store that cannot take the file: one line, no
    partial weights file, nothing listed."""
    import torch

    from toolkit.plugin.importing import _import

    torch.manual_seed(0)
    state = _import(TINY_PLUGIN).tiny_cnn(False, width=16).module.state_dict()
    src = tmp_path / "tiny.pth"
    torch.save(state, src)
    store = tmp_path / "store"
    proc = tk(["--plugin", TINY_PLUGIN, "store", "import-weights", "tiny-cnn", str(src),
               "--store", str(store)], tk_env(tmp_path), preexec_fn=_file_size_limit(4096))
    assert_one_clear_error(proc, "cannot write weights for 'tiny:tiny-cnn'", "file too large")
    from model_store import ModelStore

    ms = ModelStore(store)
    assert ms.list_weights() == [] and ms.verify() == []
    assert not list(store.rglob(".tk-tmp-*"))


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs, when this machine lets the test mount one (root with
    CAP_SYS_ADMIN); skipped otherwise."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_full_disk_while_saving_the_model_keeps_the_run(tmp_path: Path, small_tmpfs: Path):
    """The store lives on a 64 KiB tmpfs (its runs/ folder, the checkpoints, elsewhere):
    training finishes, the model (a 74 KB backbone) does not fit. One clear line, exit 2,
    nothing partial listed, the store verifies; once there is room, `--resume` saves the
    trained model without training again."""
    store = small_tmpfs / "store"
    store.mkdir()
    runs = tmp_path / "runs"
    runs.mkdir()
    (store / "runs").symlink_to(runs)
    env = tk_env(tmp_path)
    args = [*TRAIN, "--epochs", "1", "--name", "wide", "--opt", "backbone.width=32",
            "--store", str(store)]
    proc = tk(args, env)
    assert_one_clear_error(proc, "cannot write model 'wide'", "no space left on device")
    assert_store_consistent(store, [])
    assert not list(store.rglob(".tk-tmp-*"))
    assert (runs / "wide" / "checkpoint.safetensors").exists()  # the trained epoch is kept

    grown = subprocess.run(["mount", "-o", "remount,size=4m", str(small_tmpfs)],
                           capture_output=True, text=True)
    assert grown.returncode == 0, grown.stderr
    resumed = tk([*args, "--resume"], env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 1 of 1" in resumed.stderr
    assert_store_consistent(store, ["wide"])


# -- decompression bombs -----------------------------------------------------------------


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload)))


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real decompression bomb: a 4 MB PNG of 30000 x 30000 grey pixels (900 million,
    ten times Pillow's default limit) whose data really inflates to 900 MB."""
    side = 30_000
    z = zlib.compressobj(1)
    block = (b"\0" * (side + 1)) * 100  # filter byte + one row, 100 rows
    idat = b"".join([z.compress(block) for _ in range(side // 100)] + [z.flush()])
    data = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8,
                                                                   0, 0, 0, 0))
            + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(data)
    return path


# tk infer / finetune on CPU peak at about 0.85 GB here (torch and the model); decoding the
# bomb would take 4.4 GB more (900 MB of grey pixels, 2.7 GB as RGB)
PEAK_LIMIT_KB = 2_000_000

# runs a command and reports its peak memory: the bomb must not be decoded
PEAK_RSS = textwrap.dedent("""
    import resource, subprocess, sys
    proc = subprocess.run(sys.argv[1:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"peak-rss-kb {peak}", file=sys.stderr)
    sys.exit(proc.returncode)
""")


def tk_peak(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, int]:
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "toolkit",
                           *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("peak-rss-kb "), proc.stderr
    proc.stderr = "\n".join(proc.stderr.strip().splitlines()[:-1]) + "\n"
    return proc, int(last.split()[1])


def test_bomb_through_tk_infer_is_one_error_row(tmp_path: Path, bomb: Path):
    from conftest import save_colour_model

    store = tmp_path / "store"
    save_colour_model(store, "colours")
    images = tmp_path / "images"
    write_image(images / "a-red.png", (32, 32), (230, 10, 10))
    shutil.copy(bomb, images / "b-bomb.png")
    proc, peak_kb = tk_peak(["--plugin", TINY_PLUGIN, "infer", str(images), "--model",
                             "colours", "--store", str(store), "--format", "jsonl",
                             "--workers", "0"], tk_env(tmp_path))
    assert proc.returncode == 1, proc.stderr  # some files could not be read
    assert "Traceback" not in proc.stderr
    rows = {Path(r["path"]).name: r for r in map(json.loads, proc.stdout.splitlines())}
    assert rows["a-red.png"]["label"] == "red" and rows["a-red.png"]["error"] is None
    error = rows["b-bomb.png"]["error"]
    assert "image too large: 900000000 pixels exceeds the limit of 89478485" in error
    assert "refused before decoding" in error and rows["b-bomb.png"]["label"] is None
    assert peak_kb < PEAK_LIMIT_KB, f"peak {peak_kb} kB: the bomb was decoded"


def test_bomb_in_a_training_folder_stops_training_with_its_name(tmp_path: Path, bomb: Path):
    data = tmp_path / "data"
    for label, colour in (("a", (230, 10, 10)), ("b", (10, 10, 230))):
        for i in range(4):
            write_image(data / label / f"{i}.png", (32, 32), colour)
    shutil.copy(bomb, data / "b" / "9-bomb.png")
    proc, peak_kb = tk_peak(["--plugin", TINY_PLUGIN, "finetune", "--backbone", "tiny-cnn",
                             "--no-pretrained", "--data", str(data), "--epochs", "1", "-q",
                             "--batch-size", "4", "--val-split", "0.5", "--name", "bombed"],
                            tk_env(tmp_path))
    line = assert_one_clear_error(proc, "cannot read training image", "9-bomb.png",
                                  "image too large", "refused before decoding")
    assert "raise TK_MAX_IMAGE_PIXELS to allow it" in line  # a genuinely huge image can be
    assert peak_kb < PEAK_LIMIT_KB, f"peak {peak_kb} kB: the bomb was decoded"
    assert_store_consistent(tmp_path / "home", [])
