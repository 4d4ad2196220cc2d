"""The job behind ``padim serve``: check who may connect, load the model, watch its file, start uvicorn."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

import click

from .security import ServeSecurity, resolve_security

LOGGER = "padim.serve"


class JsonLines(logging.Formatter):
    """One JSON object per log record: time, level, logger, message, and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z", "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(stream=None) -> logging.Handler:
    """Send the service's logs (``padim.serve``, ``padim.serve.access``) as JSON lines to stderr."""
    logger = logging.getLogger(LOGGER)
    for old in [h for h in logger.handlers if isinstance(h.formatter, JsonLines)]:
        logger.removeHandler(old)  # serving twice in one process must not log each line twice
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLines())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


def serve(model_path: Path, host: str, port: int, max_bytes: int, max_pixels: int,
          weights: Path | None = None, security: ServeSecurity | None = None,
          shutdown_timeout: float = 30.0, reload_interval: float = 2.0, window: int = 500) -> None:
    """Serve ``model_path`` on ``host:port`` until interrupted; on SIGTERM, stop accepting connections and
    let requests in flight finish (up to ``shutdown_timeout`` seconds).

    The model is reloaded on SIGHUP, and when its file changes (polled every ``reload_interval``
    seconds; 0: only on SIGHUP). ``window``: how many recent images the window metrics cover.

    ``security`` comes from :func:`padim.serve.security.resolve_security`; without it the token is read
    from the environment and a reachable ``host`` without one is refused (ServeConfigError).
    """
    if security is None:
        security = resolve_security(host)
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        raise click.ClickException(
            f"the service needs the optional packages fastapi, uvicorn, python-multipart and prometheus-client "
            f"({exc.name} missing); install them with: pip install 'visa-padim[serve]'"
        ) from None
    from .inspector import Inspector, Limits
    from .reload import ModelSlot, fingerprint, reload_on_sighup

    configure_logging()
    log = logging.getLogger(LOGGER)
    for warning in security.warnings:
        log.warning(warning)
    seen = fingerprint(Path(model_path))  # before loading: a file replaced meanwhile is picked up
    inspector = Inspector.open(model_path, Limits(max_bytes=max_bytes, max_pixels=max_pixels), weights)
    slot = ModelSlot(inspector, seen=seen)
    scheme = "https" if security.ssl_certfile else "http"
    auth = "bearer token required" if security.token else "no authentication"
    watching = (f"when replaced (checked every {reload_interval:g} s) or on SIGHUP" if reload_interval > 0
                else "on SIGHUP")
    click.echo(f"model {inspector.model_id} ({inspector.format}, {model_path}, reloaded {watching}); {auth}; "
               f"page at {scheme}://{host}:{port}/, API schema at {scheme}://{host}:{port}/openapi.json, "
               f"metrics at {scheme}://{host}:{port}/metrics")
    app = create_app(slot, token=security.token, window=window)
    on_main = threading.current_thread() is threading.main_thread()  # only there can a signal handler be set
    previous = reload_on_sighup(slot) if on_main else None
    slot.watch(reload_interval)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info",
                    access_log=False,  # padim.serve.access logs each request, with its id, score and verdict
                    ssl_certfile=str(security.ssl_certfile) if security.ssl_certfile else None,
                    ssl_keyfile=str(security.ssl_keyfile) if security.ssl_keyfile else None,
                    timeout_graceful_shutdown=shutdown_timeout)
    finally:
        slot.stop()
        if on_main:
            signal.signal(signal.SIGHUP, previous)
