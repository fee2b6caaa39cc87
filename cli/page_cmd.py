"""`crossmodal ui`: the Streamlit page over the index."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from cli.common import handle_errors, home
from retrieval.config import HOME_ENV


def register(app: typer.Typer) -> None:
    """Add this group's commands to the app."""
    app.command()(ui)


@handle_errors
def ui(
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8501,
    host: Annotated[str, typer.Option("--host", help="Address to bind (loopback unless you say so).")]
    = "127.0.0.1",
) -> None:
    """Open the web page (Streamlit) over the index.

    Example:

      crossmodal ui --port 8501
    """
    import subprocess

    import webui
    from webui.limits import MAX_UPLOAD_MB

    app_path = Path(webui.__file__).parent / "app.py"
    env = dict(os.environ, **{HOME_ENV: str(home())})
    cmd = [sys.executable, "-m", "streamlit", "run", str(app_path), "--server.address", host,
           "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--global.developmentMode", "false", "--server.maxUploadSize", str(MAX_UPLOAD_MB),
           "--server.fileWatcherType", "none", "--client.toolbarMode", "viewer"]
    typer.echo(f"crossmodal page on http://{host}:{port} (Ctrl-C to stop)", err=True)
    if os.name == "posix":
        # The server takes this process's place, so SIGTERM or SIGINT sent to `crossmodal ui` (a service
        # manager, `kill`) stops the server itself: no orphaned server is left running.
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, cmd, env)
    try:
        raise typer.Exit(subprocess.call(cmd, env=env))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
