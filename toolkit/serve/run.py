"""`tk serve` as a function: check the options, open the model, bind the socket, serve
until SIGTERM / Ctrl-C, then drain.

The socket is bound here (before uvicorn starts) so that a port in use is one usage
error, and ``--port 0`` picks a free port, said on stderr with the address. On SIGTERM
or the first Ctrl-C uvicorn stops accepting connections, answers every request already
accepted (the batcher runs until they are), and the command exits 0; a second Ctrl-C
stops at once.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from toolkit.errors import TkError

GRACEFUL_SECONDS = 30
"""How long the drain waits for requests already accepted before closing them."""
MAX_CONNECTIONS = 256
"""Concurrent connections (and requests) beyond which uvicorn answers 503."""


@dataclass
class ServeArgs:
    """`tk serve` options (see ``tk serve --help``)."""

    model: str | None = None
    store: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_upload_mb: float = 20.0
    api_key_env: str | None = None
    device: str = "auto"
    min_score: float | None = None  # below it a row's label is null, as in `tk infer`
    calibrated: bool = True  # False: the raw softmax (--no-calibration)


def _log(message: str) -> None:
    print(f"tk: {message}", file=sys.stderr, flush=True)


def read_api_key(var: str | None) -> str | None:
    """The value of environment variable ``var`` (None without ``--api-key-env``)."""
    if not var:
        return None
    value = os.environ.get(var, "")
    if not value.strip():
        raise TkError(f"--api-key-env {var}: the environment variable {var} is not set or "
                      "empty")
    return value


def check_args(args: ServeArgs) -> None:
    from toolkit.data.decode import check_limits

    if not 0 <= int(args.port) <= 65535:
        raise TkError(f"--port {args.port}: expected 0 (any free port) to 65535")
    if int(args.max_batch) < 1:
        raise TkError(f"--max-batch must be at least 1, got {args.max_batch}")
    if not 0 <= float(args.max_wait_ms) <= 10_000:
        raise TkError(f"--max-wait-ms must be between 0 and 10000, got {args.max_wait_ms}")
    if not float(args.max_upload_mb) > 0:
        raise TkError(f"--max-upload-mb must be more than 0, got {args.max_upload_mb}")
    check_limits()


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (one line on failure)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise TkError(f"--host {host}: {exc.strerror or exc}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
        sock.set_inheritable(True)
    except OSError as exc:
        sock.close()
        raise TkError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_serve(args: ServeArgs, plugins: Any, log: Callable[[str], None] = _log) -> int:
    """Serve until told to stop; returns the number of prediction requests answered."""
    check_args(args)
    api_key = read_api_key(args.api_key_env)
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401  (python-multipart, for uploads)
        import uvicorn
    except ImportError as exc:
        raise TkError(f"tk serve needs the [serve] extra ({exc.name} is missing): "
                      "pip install 'tk-microtoolkit[serve]'") from None

    from toolkit.predict.session import open_predictor
    from toolkit.serve.app import AppConfig, create_app
    from toolkit.serve.batcher import Batcher

    sock = bind(args.host, args.port)
    with sock, open_predictor(args.model, store=args.store, plugins=plugins,
                              device=args.device, log=log) as opened:
        # scored as `tk infer` scores: calibration, --min-score, multi-label thresholds
        runner = opened.runner(topk=len(opened.classes), workers=0,
                               warn=lambda m: log(f"warning: {m}"),
                               calibrated=args.calibrated, min_score=args.min_score)
        batcher = Batcher(runner, max_batch=args.max_batch, max_wait=args.max_wait_ms / 1000)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{port}"
        t = opened.transform
        config = AppConfig(
            name=opened.name, classes=opened.classes, meta=opened.meta,
            runtime=opened.runtime.name,
            preprocessing={"resize": t.resize_size, "crop": list(t.crop_size),
                           "interpolation": t.interpolation, "mean": list(t.mean),
                           "std": list(t.std)},
            max_upload_bytes=int(args.max_upload_mb * 2**20), max_batch=batcher.max_batch,
            max_wait_ms=float(args.max_wait_ms), api_key=api_key,
            on_ready=lambda: log(f"serving model '{opened.name}' on {url} "
                                 f"(max batch {batcher.max_batch}, max wait "
                                 f"{args.max_wait_ms:g} ms; Ctrl-C stops)"))
        if not _is_loopback(host):
            log(f"warning: listening on {host}, reachable from other machines"
                + ("" if api_key else " without an API key (--api-key-env VAR)"))
        app = create_app(config, batcher)
        server = _Server(uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="on", server_header=False,
            timeout_graceful_shutdown=GRACEFUL_SECONDS, limit_concurrency=MAX_CONNECTIONS))
        server.run(sockets=[sock])
        if not server.started:
            raise TkError("the server did not start (see the message above)")
    stats = batcher.stats
    log(f"stopped: {stats.requests} request(s), {stats.images} image(s) in "
        f"{stats.batches} batch(es)")
    if server.forced:  # a second Ctrl-C: the requests still in flight were cut off
        raise KeyboardInterrupt
    return stats.requests


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a SIGTERM / SIGINT that stopped it gracefully is not raised
        again afterwards (uvicorn re-raises it, which would end the process by the signal
        instead of exit status 0). A second Ctrl-C while requests are still being answered
        stops at once (uvicorn's force exit) without the traceback uvicorn logs for each
        cancelled request; ``forced`` says it happened (tk then exits 130, interrupted)."""

        forced = False

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.forced = True
                logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            import threading

            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = (signal.SIGINT, signal.SIGTERM)
            previous = {s: signal.signal(s, self.handle_exit) for s in sigs}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return Server


def _Server(config: Any) -> Any:
    return _server_class()(config)
