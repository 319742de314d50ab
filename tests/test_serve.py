"""`tk serve`: the real command in a subprocess on a free loopback port (``--port 0``, the
address read from its stderr), a real HTTP client (httpx), a resnet18 trained by the real
`tk finetune`, predictions compared with `tk infer`'s on the same files, every bad input
followed by a good request, the API key, the drain on SIGTERM, the page in headless
chromium. Every server is stopped by the test that started it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_export import r18, r18_onnx, shared_dir  # noqa: F401 (fixtures)
from test_images import bomb_png

from toolkit.testing import isolated_env, make_image_folder, run_tk, tiny_finetune

CLASSES = ["cat", "dog", "owl"]
START_TIMEOUT = 240  # seconds for a server to say where it listens (torch import, busy CI)
TIMEOUT = 60  # seconds per HTTP request


# -- the model, the files, the servers ---------------------------------------------------


GOOD = [f"good{i}.{'jpg' if i % 2 else 'png'}" for i in range(6)]
BAD = ["text.png", "truncated.png", "bomb.png", "strip.png"]


def _write_files(folder: Path) -> None:
    """Good images (several sizes, PNG and JPEG) and bad ones."""
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(7)
    for i, (w, h) in enumerate([(40, 30), (32, 32), (50, 64), (90, 20), (33, 47), (64, 64)]):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        arr[: h // 2, : w // 2] = rng.integers(0, 256, 3)
        Image.fromarray(arr).save(folder / GOOD[i])
    (folder / "text.png").write_bytes(b"this is not an image\n")
    (folder / "truncated.png").write_bytes((folder / "good0.png").read_bytes()[:60])
    (folder / "bomb.png").write_bytes(bomb_png(100_000, 100_000))
    Image.new("RGB", (2000, 2), (9, 9, 9)).save(folder / "strip.png")  # aspect ratio


def _prepare(home: Path) -> None:
    data = make_image_folder(home / "data", CLASSES, per_class=6, size=32, format="mixed")
    tiny_finetune("resnet18", classes=3, data=data, image_size=32, home=home, name="r18")
    _write_files(home / "upload")
    proc = run_tk("infer", *[home / "upload" / n for n in GOOD + BAD], "--model", "r18",
                  "--format", "json", "--topk", "3", "--workers", "0", home=home,
                  timeout=300)
    assert proc.returncode == 1, proc.stderr  # the bad files fail
    (home / "infer.json").write_text(proc.stdout)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Made once per run (shared by xdist workers): a store holding ``r18``, torchvision
    resnet18 (random init) fine-tuned 1 epoch at 32 px by the real `tk finetune`; good and
    bad images in ``upload/``; `tk infer --format json --topk 3` of them in
    ``infer.json``."""
    return shared_dir(tmp_path_factory, "tk-serve-r18", _prepare)


@pytest.fixture(scope="module")
def files(home: Path) -> dict[str, Path]:
    return {n: home / "upload" / n for n in GOOD + BAD}


@pytest.fixture(scope="module")
def infer_rows(home: Path) -> dict[str, dict]:
    """`tk infer`'s row by file name."""
    return {Path(r["path"]).name: r for r in json.loads((home / "infer.json").read_text())}


class Server:
    def __init__(self, proc: subprocess.Popen[str], url: str, stderr: Path):
        self.proc, self.url, self.stderr_path = proc, url, stderr

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()


@contextlib.contextmanager
def serving(home: Path, *args: str, env: dict[str, str] | None = None,
            model: str = "r18") -> Iterator[Server]:
    """`tk serve --model MODEL --port 0 ARGS` until the block ends (then SIGTERM, killed if
    it has not exited 30 s later)."""
    log = home / f"serve-{os.getpid()}-{time.monotonic_ns()}.err"  # pytest's temp folder
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "toolkit", "serve", "--model", model, "--port", "0",
             "--device", "cpu", *args],
            env=isolated_env(home, {"OMP_NUM_THREADS": "1", **(env or {})}),
            stdout=subprocess.DEVNULL, stderr=err, text=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        url = None
        while url is None:
            found = re.search(r"serving model '.*' on (http://\S+) ", log.read_text())
            if found:
                url = found.group(1)
            elif proc.poll() is not None:
                raise AssertionError(f"tk serve exited {proc.returncode}:\n{log.read_text()}")
            elif time.monotonic() > deadline:
                raise AssertionError(f"tk serve did not start:\n{log.read_text()}")
            else:
                time.sleep(0.2)
        yield Server(proc, url, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[Server]:
    """One server for the tests that need no special option: batches of up to 8 images
    waiting 100 ms to fill, 1 MB uploads."""
    with serving(home, "--max-batch", "8", "--max-wait-ms", "100", "--max-upload-mb",
                 "1") as srv:
        yield srv


def post(url: str, files: list[Path], topk: int = 1, **kw) -> httpx.Response:
    parts = [("file", (p.name, p.read_bytes())) for p in files]
    return httpx.post(f"{url}/v1/predict", params={"topk": topk}, files=parts,
                      timeout=TIMEOUT, **kw)


def assert_served(server: Server, files: dict[str, Path], infer_rows: dict[str, dict]) -> None:
    """The server still answers a good request correctly."""
    r = post(server.url, [files["good1.jpg"]])
    assert r.status_code == 200, r.text
    assert r.json()[0]["label"] == infer_rows["good1.jpg"]["label"]


# -- the tests ---------------------------------------------------------------------------


def test_health_model_and_stats(server: Server, home: Path) -> None:
    assert httpx.get(f"{server.url}/health", timeout=TIMEOUT).json() == {"status": "ok"}
    info = httpx.get(f"{server.url}/v1/model", timeout=TIMEOUT).json()
    assert info["name"] == "r18" and info["classes"] == CLASSES
    assert info["runtime"] == "torch" and info["tk_version"]
    assert info["preprocessing"]["crop"] == [32, 32]
    assert info["batching"] == {"max_batch": 8, "max_wait_ms": 100.0}
    stats = httpx.get(f"{server.url}/v1/stats", timeout=TIMEOUT).json()
    assert set(stats) >= {"requests", "images", "batches", "largest_batch"}
    assert server.url.startswith("http://127.0.0.1:")  # loopback unless told otherwise


def test_predictions_equal_tk_infer(server: Server, files: dict[str, Path],
                                    infer_rows: dict[str, dict]) -> None:
    r = post(server.url, [files[n] for n in GOOD], topk=3)
    assert r.status_code == 200, r.text
    rows = r.json()
    assert [row["path"] for row in rows] == GOOD
    for row in rows:
        want = infer_rows[row["path"]]
        assert set(row) == set(want)  # the same row object as tk infer --format json
        assert row["label"] == want["label"] and row["error"] is None
        assert [t["label"] for t in row["topk"]] == [t["label"] for t in want["topk"]]
        assert row["score"] == pytest.approx(want["score"], abs=1e-4)
    # a raw body: one image, path from ?name=, top-k capped at the class count
    raw = httpx.post(f"{server.url}/v1/predict", params={"topk": 10, "name": "x.png"},
                     content=files["good0.png"].read_bytes(),
                     headers={"content-type": "image/png"}, timeout=TIMEOUT)
    assert raw.status_code == 200, raw.text
    (row,) = raw.json()
    assert row["path"] == "x.png" and row["label"] == infer_rows["good0.png"]["label"]
    assert len(row["topk"]) == len(CLASSES)


def test_each_bad_image_gets_the_tk_infer_error_and_the_next_request_is_served(
        server: Server, files: dict[str, Path], infer_rows: dict[str, dict]) -> None:
    for name in BAD:
        expected = infer_rows[name]["error"]
        assert expected
        r = post(server.url, [files[name]])
        assert r.status_code == 422, (name, r.text)
        assert r.json()["error"] == expected
        assert r.json()["rows"][0]["path"] == name
        assert_served(server, files, infer_rows)
    # a bad file among good ones: its own error row, the others predicted
    r = post(server.url, [files["good0.png"], files["text.png"], files["good2.png"]])
    assert r.status_code == 200
    assert [row["error"] is None for row in r.json()] == [True, False, True]
    # an empty raw body: the message of an empty file
    r = httpx.post(f"{server.url}/v1/predict", content=b"",
                   headers={"content-type": "application/octet-stream"}, timeout=TIMEOUT)
    assert r.status_code == 422 and r.json()["error"] == "empty file (0 bytes)"
    assert_served(server, files, infer_rows)


def test_refused_requests_get_a_json_error_and_the_service_goes_on(
        server: Server, files: dict[str, Path], infer_rows: dict[str, dict]) -> None:
    url = f"{server.url}/v1/predict"
    cases: list[tuple[str, int, str, dict]] = [
        ("wrong content type", 415, "unsupported content type text/plain",
         {"content": b"hello", "headers": {"content-type": "text/plain"}}),
        ("a server-side path", 415, "unsupported content type application/json",
         {"json": {"path": "/etc/passwd"}}),
        ("no file, a field naming a path", 400, "no image file in the request",
         {"content": b'--zz\r\nContent-Disposition: form-data; name="path"\r\n\r\n'
                     b"/etc/passwd\r\n--zz--\r\n",
          "headers": {"content-type": "multipart/form-data; boundary=zz"}}),
        ("huge multipart count", 400, "too many files in one request",
         {"files": [("file", (f"{i}.png", b"x")) for i in range(1000)]}),
        ("bad topk", 400, "topk must be", {"params": {"topk": "x"}, "files": [
            ("file", ("a.png", files["good0.png"].read_bytes()))]}),
        ("over the limit (Content-Length)", 413, "request body too large",
         {"content": b"\0" * (2 << 20), "headers": {"content-type": "image/png"}}),
        ("over the limit (chunked, no length)", 413, "request body too large",
         {"content": iter([b"\0" * 65536] * 32), "headers": {"content-type": "image/png"}}),
        ("malformed multipart", 400, "",
         {"content": b"--zz\r\nnot a part", "headers": {
             "content-type": "multipart/form-data; boundary=zz"}}),
    ]
    for what, status, message, kw in cases:
        r = httpx.post(url, timeout=TIMEOUT, **kw)
        assert r.status_code == status, (what, r.status_code, r.text)
        assert message in r.json()["error"], (what, r.text)
        assert "\n" not in r.json()["error"]
        assert "root:" not in r.text  # nothing of the server's files
        assert_served(server, files, infer_rows)
    assert "Traceback" not in server.stderr


def test_concurrent_requests_share_batches(server: Server, files: dict[str, Path],
                                           infer_rows: dict[str, dict]) -> None:
    """16 single-image requests at once: fewer runtime calls than images (the counters of
    /v1/stats), every answer right."""
    before = httpx.get(f"{server.url}/v1/stats", timeout=TIMEOUT).json()
    names = [GOOD[i % len(GOOD)] for i in range(16)]
    gate = threading.Barrier(len(names))

    def one(name: str) -> tuple[str, httpx.Response]:
        with httpx.Client(timeout=TIMEOUT) as client:
            gate.wait(TIMEOUT)
            return name, client.post(f"{server.url}/v1/predict",
                                     files=[("file", (name, files[name].read_bytes()))])

    with ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(one, names))
    for name, r in answers:
        assert r.status_code == 200, r.text
        assert r.json()[0]["label"] == infer_rows[name]["label"]
    after = httpx.get(f"{server.url}/v1/stats", timeout=TIMEOUT).json()
    images = after["images"] - before["images"]
    assert images == 16
    assert after["batches"] - before["batches"] < images
    assert 1 < after["largest_batch"] <= 8


@pytest.mark.slow
def test_load_16_clients_x_25_requests(server: Server, files: dict[str, Path],
                                       infer_rows: dict[str, dict]) -> None:
    """Bounded load on loopback: 16 clients, 25 requests each, zero errors, every answer
    the label `tk infer` gives that file."""
    def client(k: int) -> list[str]:
        problems = []
        with httpx.Client(timeout=TIMEOUT) as c:
            for j in range(25):
                name = GOOD[(k + j) % len(GOOD)]
                r = c.post(f"{server.url}/v1/predict",
                           files=[("file", (name, files[name].read_bytes()))])
                if r.status_code != 200 or r.json()[0]["label"] != infer_rows[name]["label"]:
                    problems.append(f"{name}: {r.status_code} {r.text[:200]}")
        return problems

    with ThreadPoolExecutor(16) as pool:
        problems = [p for ps in pool.map(client, range(16)) for p in ps]
    assert problems == []


@pytest.mark.slow
def test_api_key_and_sigterm_drains_in_flight_requests(home: Path, files: dict[str, Path],
                                                       infer_rows: dict[str, dict]) -> None:
    key = "s3cret-Key"
    auth = {"authorization": f"Bearer {key}"}
    # batches wait 3 s to fill: requests stay in flight long enough to be caught by SIGTERM
    with serving(home, "--api-key-env", "TK_TEST_KEY", "--max-batch", "64", "--max-wait-ms",
                 "3000", env={"TK_TEST_KEY": key}) as srv:
        good = [("file", ("good0.png", files["good0.png"].read_bytes()))]
        assert httpx.get(f"{srv.url}/health", timeout=TIMEOUT).status_code == 200
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": key},
                        {"authorization": f"Bearer {key}x"}):
            for method, path in (("GET", "/v1/model"), ("POST", "/v1/predict"), ("GET", "/")):
                r = httpx.request(method, f"{srv.url}{path}", headers=headers, files=good
                                  if method == "POST" else None, timeout=TIMEOUT)
                assert r.status_code == 401, (headers, path, r.text)
                assert "API key" in r.json()["error"]
        assert httpx.get(f"{srv.url}/v1/model", headers=auth, timeout=TIMEOUT).status_code == 200

        n = 6
        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(httpx.post, f"{srv.url}/v1/predict", files=good,
                                   headers=auth, timeout=TIMEOUT) for _ in range(n)]
            deadline = time.monotonic() + TIMEOUT
            while httpx.get(f"{srv.url}/v1/stats", headers=auth,
                            timeout=TIMEOUT).json()["in_flight"] < n:
                assert time.monotonic() < deadline, "the requests never arrived"
                time.sleep(0.05)
            srv.proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in futures]
        assert srv.proc.wait(60) == 0, srv.stderr
    for r in answers:
        assert r.status_code == 200, r.text
        assert r.json()[0]["label"] == infer_rows["good0.png"]["label"]
    assert "stopped: " in srv.stderr
    assert "Traceback" not in srv.stderr


def test_min_score_gives_rows_without_a_label_as_tk_infer_does(
        home: Path, files: dict[str, Path], infer_rows: dict[str, dict]) -> None:
    """Served rows are scored as `tk infer` scores them: below --min-score no label, the
    score and top-k kept (the calibrated ones of the default server above)."""
    with serving(home, "--min-score", "1") as srv:
        r = post(srv.url, [files[n] for n in GOOD], topk=2)
        assert r.status_code == 200, r.text
        for row in r.json():
            want = infer_rows[row["path"]]
            assert row["label"] is None and row["error"] is None
            assert row["score"] == pytest.approx(want["score"], abs=1e-4)
            assert row["topk"][0]["label"] == want["label"]


def test_usage_errors_are_one_line(home: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        for args, message in [
            (["--model", "nope"], "nope"),
            (["--model", "r18", "--api-key-env", "TK_UNSET_KEY"], "TK_UNSET_KEY"),
            (["--model", "r18", "--port", port], f"cannot listen on 127.0.0.1:{port}"),
        ]:
            proc = run_tk("serve", *args, home=home, env={"TK_UNSET_KEY": ""}, timeout=120)
            assert proc.returncode == 2, proc.stderr
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("tk: error: "), proc.stderr
            assert message in lines[0]


def test_the_page_in_a_real_browser(server: Server, files: dict[str, Path],
                                    infer_rows: dict[str, dict]) -> None:
    """Headless chromium opens /, uploads an image through the plain form and sees the
    top-k table; the page has no script."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    page = httpx.get(server.url + "/", timeout=TIMEOUT)
    assert page.status_code == 200 and "<script" not in page.text.lower()
    assert "default-src 'none'" in page.headers["content-security-policy"]
    hostile = httpx.post(server.url + "/", files=[("file", ("<b>x</b>.png", files[
        "good2.png"].read_bytes()))], timeout=TIMEOUT)
    assert hostile.status_code == 200
    assert "&lt;b&gt;x&lt;/b&gt;.png" in hostile.text and "<b>x" not in hostile.text
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.set_page_load_timeout(TIMEOUT)
        driver.get(server.url + "/")
        driver.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(
            str(files["good2.png"]))
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        deadline = time.monotonic() + TIMEOUT
        while not driver.find_elements(By.CSS_SELECTOR, "table.topk"):
            assert time.monotonic() < deadline, driver.page_source[:2000]
            time.sleep(0.1)
        cells = driver.find_elements(By.CSS_SELECTOR, "table.topk td")
        labels = [c.text for c in cells[::2]]
        assert labels[0] == infer_rows["good2.png"]["label"]
        assert len(labels) == len(CLASSES)
        assert "good2.png" in driver.find_element(By.TAG_NAME, "h2").text
    finally:
        driver.quit()


@pytest.mark.slow
def test_an_onnx_export_is_served_as_tk_infer_reads_it(
        r18: tuple[Path, Path], r18_onnx: tuple[Path, str]) -> None:  # noqa: F811
    """`tk serve --model FILE.onnx` (the export of test_export's trained resnet18): ONNX
    Runtime, the same rows as `tk infer --model FILE.onnx`."""
    home, data = r18
    onnx, _ = r18_onnx
    images = sorted(data.glob("*/*"))[::3]
    proc = run_tk("infer", *images, "--model", onnx, "--format", "json", "--topk", "3",
                  home=home, timeout=300)
    assert proc.returncode == 0, proc.stderr
    want = {Path(r["path"]).name: r for r in json.loads(proc.stdout)}
    with serving(home, model=str(onnx)) as srv:
        info = httpx.get(f"{srv.url}/v1/model", timeout=TIMEOUT).json()
        assert info["runtime"] == "onnx" and info["classes"] == CLASSES
        r = post(srv.url, images, topk=3)
        assert r.status_code == 200, r.text
        for row in r.json():
            assert row["label"] == want[row["path"]]["label"]
            assert [t["label"] for t in row["topk"]] == [
                t["label"] for t in want[row["path"]]["topk"]]
            assert row["score"] == pytest.approx(want[row["path"]]["score"], abs=1e-4)


def test_ctrl_c_stops_the_server_and_a_second_one_cuts_the_wait(
        home: Path, files: dict[str, Path]) -> None:
    """Ctrl-C (SIGINT) stops like SIGTERM: exit 0, "stopped:" said, no traceback. A second
    Ctrl-C while requests are still being answered ends the wait at once: exit 130 and
    "tk: interrupted", no traceback either."""
    with serving(home) as srv:
        assert httpx.get(f"{srv.url}/health", timeout=TIMEOUT).status_code == 200
        srv.proc.send_signal(signal.SIGINT)
        assert srv.proc.wait(60) == 0, srv.stderr
    assert "stopped: " in srv.stderr and "Traceback" not in srv.stderr

    good = [("file", ("good0.png", files["good0.png"].read_bytes()))]
    # batches wait 10 s to fill: the requests are still in flight at both Ctrl-Cs
    with serving(home, "--max-batch", "64", "--max-wait-ms", "10000") as srv:
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(httpx.post, f"{srv.url}/v1/predict", files=good,
                                   timeout=TIMEOUT) for _ in range(2)]
            deadline = time.monotonic() + TIMEOUT
            while httpx.get(f"{srv.url}/v1/stats", timeout=TIMEOUT).json()["in_flight"] < 2:
                assert time.monotonic() < deadline, "the requests never arrived"
                time.sleep(0.05)
            srv.proc.send_signal(signal.SIGINT)
            time.sleep(1.0)
            srv.proc.send_signal(signal.SIGINT)
            start = time.monotonic()
            code = srv.proc.wait(60)
            for f in futures:  # answered or cut off: either way the client gets an end
                try:
                    f.result()
                except httpx.HTTPError:
                    pass
        assert time.monotonic() - start < 7  # not the rest of the 10 s batch wait
    assert code == 130, srv.stderr
    assert srv.stderr.strip().splitlines()[-1] == "tk: interrupted", srv.stderr
    assert "Traceback" not in srv.stderr
