"""The job behind ``padim serve``: load the model, start uvicorn."""

from __future__ import annotations

from pathlib import Path

import click

from .inspector import Limits


def serve(model_path: Path, host: str, port: int, max_bytes: int, max_pixels: int,
          weights: Path | None = None) -> None:
    """Serve ``model_path`` on ``host:port`` until interrupted."""
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        raise click.ClickException(
            f"the service needs the optional packages fastapi, uvicorn and python-multipart ({exc.name} missing); "
            "install them with: pip install 'visa-padim[serve]'"
        ) from None
    from .inspector import Inspector

    inspector = Inspector.open(model_path, Limits(max_bytes=max_bytes, max_pixels=max_pixels), weights)
    click.echo(f"model {inspector.model_id} ({inspector.format}, {model_path}); "
               f"page at http://{host}:{port}/, API schema at http://{host}:{port}/openapi.json")
    uvicorn.run(create_app(inspector), host=host, port=port, log_level="info")
