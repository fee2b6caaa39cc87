"""What every command shares: the index home, typed exceptions -> one line and an exit code, option types,
and output (JSON on stdout, tables, progress on stderr).

Exit codes: 0 success, 2 user error (one line on stderr), 1 unexpected failure, 130 interrupted.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from retrieval.config import default_home
from retrieval.errors import CrossmodalError, UserError

F = TypeVar("F", bound=Callable[..., Any])

state: dict[str, Any] = {"home": None, "read_only": False}


def home() -> Path:
    """The index home: --home, else $CROSSMODAL_HOME, else the user data dir; one that cannot be a folder
    (it is a file, or lies under one) is a one-line user error for every command."""
    from retrieval.fsutil import folder_problem

    path: Path = state["home"] or default_home()
    problem = folder_problem(path.expanduser().absolute())
    if problem:
        raise UserError(problem)
    return path


def read_only() -> None:
    """Mark this process as a read-only query: `main` may skip interpreter teardown once output is out."""
    state["read_only"] = True


# Characters that steer a terminal or reorder text: C0/C1 controls, DEL, bidi overrides and isolates, line
# separators, and lone surrogates (undecodable file names), which a strict stdout cannot even encode.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


def clean(text: str) -> str:
    """User text made safe to print on a terminal: each unprintable character becomes a visible escape
    (ESC -> \\x1b, RLO -> \\u202e), so a caption or file name cannot move the cursor, recolour or reorder
    the output. JSON output does not use it: it keeps the exact text."""
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}",
                            text)


def err(message: str) -> None:
    """One line on stderr, prefixed with the program name; user text in it is `clean`ed."""
    typer.echo(f"crossmodal: {clean(message)}", err=True)


def handle_errors(fn: F) -> F:
    """Turn library exceptions into one line and an exit code; tracebacks only with CROSSMODAL_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except UserError as e:
            err(f"error: {e}")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err("interrupted; everything committed so far is kept")
            raise typer.Exit(130) from None
        except (CrossmodalError, Exception) as e:  # noqa: BLE001
            if os.environ.get("CROSSMODAL_DEBUG"):
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            err(f"internal error: {type(e).__name__}: {first} (set CROSSMODAL_DEBUG=1 for the traceback)")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


# ---- shared options -------------------------------------------------------------------------------
ModelOpt = Annotated[str | None, typer.Option(
    "--model", help="open_clip model name, or an open_clip model-config FILE.json for a custom model (with "
                    "--pretrained CHECKPOINT) (default ViT-B-32; queries use the index's recorded model)")]
PretrainedOpt = Annotated[str | None, typer.Option(
    "--pretrained", help="Pretrained tag (default laion2b_s34b_b79k) or a local checkpoint file")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | mps")]
PrecisionOpt = Annotated[str, typer.Option(
    "--precision", help="auto | fp32 | bf16 | fp16 (auto: fp16 on CUDA; on the CPU bf16 to index where bf16 is "
                        "fast, fp32 for queries)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
KOpt = Annotated[int, typer.Option("-k", "--top-k", min=1, max=100_000, help="Number of results.")]
IndexTypeOpt = Annotated[str | None, typer.Option(
    "--index-type", help="auto | flat | hnsw | ivfsq | ivfpq | a faiss factory string (kept for later runs).")]
MemoryBudgetOpt = Annotated[str | None, typer.Option(
    "--memory-budget", help="RAM the vector index may use, e.g. 4G (auto: half the machine's memory).")]
BackendOpt = Annotated[str, typer.Option(
    "--backend", envvar="CROSSMODAL_BACKEND",
    help="auto | onnx | torch (auto: ONNX Runtime when the index has an export, no torch import)")]

QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
RERANK_K = 32  # retrieval.rerank.reranker.DEFAULT_RERANK_K, without importing it at start-up
RerankOpt = Annotated[bool | None, typer.Option(
    "--rerank/--no-rerank",
    help="Reorder the dense top --rerank-k with co-attention over token features (default: on when the index "
         "records a trained reranker, see train-reranker; --rerank uses the parameter-free scorer otherwise).")]
MinScoreOpt = Annotated[str | None, typer.Option(
    "--min-score", help="Hide results below this calibrated relevance: 'auto' (the threshold the quality lab "
                        "fitted) or a number on the scale of the relevance column. Text->image and image->text.")]
RerankKOpt = Annotated[int, typer.Option("--rerank-k", min=1, max=1000, help="How many dense results to rerank.")]
ExactOpt = Annotated[bool, typer.Option("--exact", help="Exact search even when an ANN index exists.")]
NprobeOpt = Annotated[int | None, typer.Option(
    "--nprobe", min=1, help="IVF lists to visit (overrides the tuned value).")]
EfSearchOpt = Annotated[int | None, typer.Option(
    "--ef-search", min=1, help="HNSW candidate list size (overrides the tuned value).")]


def progress_printer(label: str, quiet: bool) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A rich progress bar on a terminal, plain periodic lines otherwise, nothing when quiet."""
    if quiet:
        return (lambda done, total: None), (lambda: None)
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
                       console=Console(stderr=True), transient=False)
        task = bar.add_task(label, total=None, rate="")
        started = time.perf_counter()
        bar.start()

        def update(done: int, total: int) -> None:
            if total == 0:
                return
            rate = done / max(time.perf_counter() - started, 1e-9)
            bar.update(task, completed=done, total=total, rate=f"{rate:6.1f} {label}/s")

        return update, bar.stop
    state = {"last": 0.0, "started": time.perf_counter()}

    def plain(done: int, total: int) -> None:
        if total == 0 or done == 0:
            return
        now = time.perf_counter()
        if now - state["last"] < 5.0 and done < total:
            return
        state["last"] = now
        rate = done / max(now - state["started"], 1e-9)
        eta = (total - done) / rate if rate > 0 else 0.0
        typer.echo(f"{label}: {done}/{total} ({rate:.1f}/s, ETA {int(eta // 60)}:{int(eta % 60):02d})",
                   err=True)

    return plain, (lambda: None)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, ensure_ascii=False, indent=None))


def table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A table on stdout. Title and cells are user text: shown literally (no rich markup, so '[/b]' cannot
    crash it and '[red]' is not swallowed; no :emoji: codes) and `clean`ed of control characters."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(clean(title)), show_lines=False)
    for c in columns:
        table.add_column(c, justify="right" if c in ("rank", "score", "id", "count") else "left",
                         overflow="fold")
    for r in rows:
        table.add_row(*(Text(clean(cell)) for cell in r))
    Console(width=max(100, int(os.environ.get("COLUMNS", "0") or 0))).print(table)
