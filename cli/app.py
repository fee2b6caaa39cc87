"""The `crossmodal` command line: the Typer app, its global options and the entry point.

Commands live by group: index_cmds.py (write the index), query_cmds.py (read it), rerank_cmds.py (the
reranker), page_cmd.py (the web page); common.py holds what they share.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from cli import index_cmds, page_cmd, query_cmds, rerank_cmds
from cli.common import state
from retrieval.config import HOME_ENV

app = typer.Typer(
    name="crossmodal",
    help=(
        "Search your photos by meaning: index folders and caption files with a CLIP model, then query "
        "text->image, image->image, text+image and image->text.\n\n"
        "Examples:\n\n"
        "  crossmodal index ~/Pictures\n\n"
        "  crossmodal search \"a dog running on a beach\" -k 20\n\n"
        "  crossmodal caption photo.jpg -k 5"
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from retrieval import __version__

        typer.echo(f"crossmodal {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    home: Annotated[Path | None, typer.Option(
        "--home", envvar=HOME_ENV, help="Index folder [env CROSSMODAL_HOME; default: the user data dir]")] = None,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Global options."""
    if home is not None:
        state["home"] = home.expanduser()


for group in (index_cmds, query_cmds, rerank_cmds, page_cmd):
    group.register(app)


def _report_heavy_imports() -> None:
    """CROSSMODAL_DEBUG_IMPORTS=1: name the heavy modules this process imported (tests, benchmarks)."""
    if os.environ.get("CROSSMODAL_DEBUG_IMPORTS"):
        heavy = sorted(m for m in ("torch", "torchvision", "open_clip") if m in sys.modules)
        sys.stderr.write(f"crossmodal: heavy imports: {', '.join(heavy) or 'none'}\n")


def main() -> None:
    """Console-script entry point.

    Commands end with os._exit once their output is flushed: tearing down sqlalchemy, numpy, faiss and
    onnxruntime at interpreter exit takes ~0.5 s, and with torch and open_clip loaded ~1.1 s, and does
    nothing a finished command needs. A writer's work is durable when it returns (the store commits
    atomically and closes inside the command); its atexit handlers (decode workers' cleanup) still run.
    """
    import atexit

    from cli.light_params import install

    install()  # plain option values without importing pydantic (~0.2 s of a query)
    atexit.register(_report_heavy_imports)
    try:
        app()
        code = 0
    except SystemExit as e:
        if not isinstance(e.code, (int, type(None))):
            raise
        code = e.code or 0
    if state["read_only"]:
        atexit.unregister(_report_heavy_imports)
        _report_heavy_imports()
    else:
        atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        code = code or 1
    os._exit(code)


if __name__ == "__main__":
    main()
