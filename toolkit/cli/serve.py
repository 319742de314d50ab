"""`tk serve`: an HTTP prediction service for a stored model or an ONNX export."""

from __future__ import annotations

from pathlib import Path

import click

from toolkit.cli import cli, get_state
from toolkit.cli.store import store_option


@cli.command("serve")
@click.option("--model", metavar="NAME|FILE.onnx",
              help="Stored model, or an exported .onnx file (ONNX Runtime, no torch) "
              "[the newest stored model, named on stderr].")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; use an API key).")
@click.option("--port", type=int, default=8000, show_default=True,
              help="TCP port (0: any free port, printed on stderr).")
@click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True,
              help="Most images per model call (1: no batching).")
@click.option("--max-wait-ms", type=click.FloatRange(min=0, max=10_000), default=5.0,
              show_default=True, help="How long a batch waits to fill.")
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=20.0,
              show_default=True, help="Largest request body (413 beyond).")
@click.option("--api-key-env", metavar="VAR",
              help="Require 'Authorization: Bearer <value of VAR>' (except on /health).")
@click.option("--device", default="auto", show_default=True,
              help="auto | cpu | cuda | cuda:N | mps.")
@click.option("--min-score", type=click.FloatRange(0, 1), default=None, metavar="S",
              help="Rows whose top score is below S get label null (as `tk infer`).")
@click.option("--calibration/--no-calibration", default=True, show_default=True,
              help="Scores with the model's calibration temperature or the raw softmax.")
@store_option
def serve_command(model: str | None, host: str, port: int, max_batch: int,
                  max_wait_ms: float, max_upload_mb: float, api_key_env: str | None,
                  device: str, min_score: float | None, calibration: bool,
                  store_dir: Path | None) -> None:
    """Serve a stored model or an exported .onnx file over HTTP until SIGTERM or Ctrl-C.

    \b
    GET  /health              {"status": "ok"}
    GET  /v1/model            name, classes, preprocessing, runtime, tk version
    GET  /v1/stats            requests, images, batches, largest batch
    POST /v1/predict?topk=K   multipart files or a raw image body -> the rows of
                              `tk infer --format json` (path = the file name)
    GET  /                    an upload page (plain HTML form)

    \b
    Concurrent requests are batched (up to --max-batch images, waiting at most
    --max-wait-ms). Bad uploads get a JSON error with the reason `tk infer` gives;
    bodies over --max-upload-mb get 413. SIGTERM / Ctrl-C: stop accepting, answer the
    requests already accepted, exit 0. Needs `pip install 'tk-microtoolkit[serve]'`.
    """
    from toolkit.serve.run import ServeArgs, run_serve

    args = ServeArgs(model=model, store=str(store_dir) if store_dir else None, host=host,
                     port=port, max_batch=max_batch, max_wait_ms=max_wait_ms,
                     max_upload_mb=max_upload_mb, api_key_env=api_key_env, device=device,
                     min_score=min_score, calibrated=calibration)
    run_serve(args, get_state().plugins)
