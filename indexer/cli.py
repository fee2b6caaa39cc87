"""The `crossmodal` command line: flags -> library calls, typed exceptions -> messages and exit codes.

Exit codes: 0 success, 2 user error (one line on stderr), 1 unexpected failure, 130 interrupted.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from retrieval.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CUDA_BATCH_SIZE,
    DEFAULT_K,
    DEFAULT_WEIGHT,
    HOME_ENV,
    default_home,
)
from retrieval.errors import CrossmodalError, UserError

from .cli_rerank import RERANK_K, RerankKOpt, RerankOpt, caption_hits, dense_fields, open_reranker, search_hits
from .cli_rerank import register as register_rerank_commands

F = TypeVar("F", bound=Callable[..., Any])

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

_state: dict[str, Path] = {}


def _home() -> Path:
    return _state.get("home") or default_home()


def _err(message: str) -> None:
    typer.echo(f"crossmodal: {message}", err=True)


def handle_errors(fn: F) -> F:
    """Turn library exceptions into one line and an exit code; tracebacks only with CROSSMODAL_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except UserError as e:
            _err(f"error: {e}")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            _err("interrupted; everything committed so far is kept")
            raise typer.Exit(130) from None
        except (CrossmodalError, Exception) as e:  # noqa: BLE001
            if os.environ.get("CROSSMODAL_DEBUG"):
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            _err(f"internal error: {type(e).__name__}: {first} (set CROSSMODAL_DEBUG=1 for the traceback)")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


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
        _state["home"] = home.expanduser()


# ---- shared options -------------------------------------------------------------------------------
ModelOpt = Annotated[str | None, typer.Option(
    "--model", help="open_clip model name (default ViT-B-32; queries use the index's recorded model)")]
PretrainedOpt = Annotated[str | None, typer.Option(
    "--pretrained", help="Pretrained tag (default laion2b_s34b_b79k) or a local checkpoint file")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | mps")]
PrecisionOpt = Annotated[str, typer.Option(
    "--precision", help="auto | fp32 | bf16 | fp16 (auto: fp16 on CUDA, bf16 on CPUs with fast bf16)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
KOpt = Annotated[int, typer.Option("-k", "--top-k", min=1, max=100_000, help="Number of results.")]
IndexTypeOpt = Annotated[str | None, typer.Option(
    "--index-type", help="auto | flat | hnsw | ivfsq | ivfpq | a faiss factory string (kept for later runs).")]
MemoryBudgetOpt = Annotated[str | None, typer.Option(
    "--memory-budget", help="RAM the vector index may use, e.g. 4G (auto: half the machine's memory).")]
BackendOpt = Annotated[str, typer.Option(
    "--backend", envvar="CROSSMODAL_BACKEND",
    help="auto | onnx | torch (auto: ONNX Runtime when the index has an export, no torch import)")]


def _progress_printer(label: str, quiet: bool) -> tuple[Callable[[int, int], None], Callable[[], None]]:
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


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, ensure_ascii=False, indent=None))


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for c in columns:
        table.add_column(c, justify="right" if c in ("rank", "score", "id", "count") else "left",
                         overflow="fold")
    for r in rows:
        table.add_row(*r)
    Console(width=max(100, int(os.environ.get("COLUMNS", "0") or 0))).print(table)


# ---- index ----------------------------------------------------------------------------------------
@app.command()
@handle_errors
def index(
    paths: Annotated[list[Path], typer.Argument(help="Folders (searched recursively) or image files.")],
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", min=1, max=4096,
        help=f"Images per model call [default: {DEFAULT_BATCH_SIZE}, {DEFAULT_CUDA_BATCH_SIZE} on CUDA]")] = None,
    workers: Annotated[int | None, typer.Option(
        "--workers", min=0, max=64, help="Decode processes (0: decode in the main process)")] = None,
    gpu_decode: Annotated[bool | None, typer.Option(
        "--gpu-decode/--no-gpu-decode",
        help="Decode JPEGs on the GPU with nvJPEG [default: on when the model runs on CUDA]")] = None,
    commit_every: Annotated[int, typer.Option(
        "--commit-every", min=1, help="Commit at least every N images (chunks grow with the index).")] = 512,
    reranker: Annotated[Path | None, typer.Option(
        "--reranker", help="Record a trained reranker file (see train-reranker) in the index.")] = None,
    index_type: IndexTypeOpt = None,
    memory_budget: MemoryBudgetOpt = None,
    json_out: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Embed every image under the given folders and keep the index in line with them.

    Re-runs only stat unchanged files (same path, size, mtime), re-embed changed ones, keep the vectors of
    moved or renamed files (same content), and drop files that were deleted. A folder that turns up empty
    (an unmounted drive) keeps its images; use `crossmodal remove` to drop them.

    Examples:

      crossmodal index ~/Pictures

      crossmodal index ~/Pictures --model ViT-B-32 --pretrained /models/vit-b-32.pt --json

      crossmodal index /archive --index-type auto --memory-budget 8G
    """
    from indexer.pipeline import index_paths
    from retrieval.encoder import load_encoder
    from retrieval.session import check_encoder, checkpoint_stat, requested_spec
    from retrieval.store import Store

    for p in paths:
        if not p.expanduser().exists():
            raise UserError(f"no such file or folder: {p}")
    with Store.open(_home(), create=True, writable=True) as store:
        spec, sha = requested_spec(store, model, pretrained, device, precision)
        encoder = load_encoder(spec, checkpoint_sha=sha)
        check_encoder(store, encoder)
        if gpu_decode:
            from retrieval.gpu import gpu_decode_problem

            problem = gpu_decode_problem(encoder.device)
            if problem:
                raise UserError(f"--gpu-decode: {problem}")
        store.bind_model(encoder.fingerprint,
                         checkpoint_stat(encoder.fingerprint.pretrained)
                         if encoder.fingerprint.weights.startswith("sha256:") else None)
        if reranker is not None:
            from retrieval.rerank import record_reranker

            record_reranker(store, reranker)
        if index_type is not None or memory_budget is not None:  # recorded first; commits follow it
            _request_index_type(store, index_type, memory_budget, rebuild=False)
        if not quiet and not json_out:
            typer.echo(f"model {encoder.fingerprint.describe()} on {encoder.device} ({encoder.precision})",
                       err=True)
        update, stop = _progress_printer("images", quiet)
        try:
            report = index_paths(store, encoder, [str(p) for p in paths], batch_size=batch_size,
                                 workers=workers, progress=update, commit_every=commit_every,
                                 gpu_decode=gpu_decode)
        finally:
            stop()
        if index_type is not None or memory_budget is not None:  # a switch with no new images builds now
            store.set_index_type(store.ann_state["image"].requested, store.ann_state["image"].budget,
                                 log=None if quiet or json_out else _err)
        total = store.count("image")
    for root, n in report.kept:
        _err(f"warning: {root} has no image files now; its {n} indexed images were kept "
             f"(unmounted drive?). `crossmodal remove {root}` drops them.")
    if json_out:
        _print_json(report.to_json())
        _export_for_queries(encoder, True)
        return
    for path, reason in report.skipped:
        typer.echo(f"skipped {path}: {reason}", err=True)
    _table("index", ["what", "count"], [
        ["added", str(report.added)], ["updated", str(report.updated)], ["moved", str(report.moved)],
        ["removed", str(report.removed)],
        ["already indexed", str(report.unchanged)], ["skipped", str(len(report.skipped))],
        ["images in index", str(total)], ["seconds", f"{report.seconds:.1f}"],
        ["images/s", f"{report.images_per_second:.1f}"],
    ])
    _export_for_queries(encoder, quiet)


def _request_index_type(store, index_type: str | None, memory_budget: str | None, rebuild: bool,
                        force: bool = False, log=None) -> dict[str, str]:
    from retrieval.store.ann import parse_budget

    current = store.ann_state.get("image")
    requested = index_type or (current.requested if current else "auto")
    budget = parse_budget(memory_budget) if memory_budget is not None else (current.budget if current else None)
    return store.set_index_type(requested, budget, rebuild=rebuild, force=force, log=log)


@app.command()
@handle_errors
def reindex(
    index_type: IndexTypeOpt = None,
    memory_budget: MemoryBudgetOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Rebuild and re-tune the vector search index from the stored vectors (no image is read again).

    Use it to switch index types, or to re-tune after a large change. The search-time setting (nprobe or
    efSearch) is chosen to reach recall@10 >= 0.95 against exact search on a held-out sample.

    Examples:

      crossmodal reindex --index-type hnsw

      crossmodal reindex --index-type ivfsq

      crossmodal reindex --index-type ivfpq --memory-budget 2G

      crossmodal reindex --index-type "IVF4096,PQ32x8np"
    """
    from retrieval.store import Store

    with Store.open(_home(), writable=True) as store:
        if store.fingerprint is None:
            raise UserError(f"the index in {store.home} is empty; run `crossmodal index FOLDER` first")
        done = _request_index_type(store, index_type, memory_budget, rebuild=True, force=True,
                                   log=None if json_out else _err)
        info = {m: store.ann_info(m) for m in done}
    if json_out:
        _print_json(info)
        return
    _table("vector index", ["modality", "index"], [[m, d] for m, d in done.items()])


@app.command()
@handle_errors
def remove(
    paths: Annotated[list[Path], typer.Argument(help="Folders or files to drop from the index.")],
    json_out: JsonOpt = False,
) -> None:
    """Drop images at or under the given folders from the index (the files themselves are not touched).

    Example:

      crossmodal remove ~/Pictures/old-phone
    """
    from indexer.pipeline import remove_paths
    from retrieval.store import Store

    with Store.open(_home(), writable=True) as store:
        n = remove_paths(store, [str(p) for p in paths])
    if json_out:
        _print_json({"removed": n})
    else:
        typer.echo(f"removed {n} images from the index")


# ---- add-texts ------------------------------------------------------------------------------------
@app.command("add-texts")
@handle_errors
def add_texts(
    file: Annotated[Path, typer.Argument(help="Captions: .txt (one per line), .csv/.tsv, or .jsonl")],
    corpus: Annotated[str | None, typer.Option("--corpus", help="Corpus name (default: file name)")] = None,
    column: Annotated[str | None, typer.Option("--column", help="CSV/TSV column with the captions")] = None,
    field: Annotated[str | None, typer.Option("--field", help="JSONL field with the captions")] = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    json_out: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Add a caption corpus (duplicates within a corpus are stored once; re-adding adds only new lines).

    Examples:

      crossmodal add-texts captions.csv --column caption --corpus alt-texts

      crossmodal add-texts notes.txt
    """
    from indexer.texts import add_corpus, read_corpus
    from retrieval.encoder import load_encoder
    from retrieval.session import check_encoder, checkpoint_stat, requested_spec
    from retrieval.store import Store

    read_corpus(file, column, field)  # fail on a bad file before loading any model
    with Store.open(_home(), create=True, writable=True) as store:
        spec, sha = requested_spec(store, model, pretrained, device, precision)
        encoder = load_encoder(spec, checkpoint_sha=sha)
        check_encoder(store, encoder)
        store.bind_model(encoder.fingerprint,
                         checkpoint_stat(encoder.fingerprint.pretrained)
                         if encoder.fingerprint.weights.startswith("sha256:") else None)
        update, stop = _progress_printer("captions", quiet or json_out)
        try:
            report = add_corpus(store, encoder, file, corpus, column, field, progress=update)
        finally:
            stop()
    _export_for_queries(encoder, quiet or json_out)
    if json_out:
        _print_json(report.to_json())
    else:
        typer.echo(f"corpus '{report.corpus}': added {report.added} captions, {report.duplicates} "
                   f"duplicates skipped ({report.seconds:.1f} s)")


# ---- queries --------------------------------------------------------------------------------------
def _check_dates(flt) -> None:
    from datetime import datetime

    for value in (flt.after, flt.before):
        if value:
            try:
                datetime.fromisoformat(value)
            except ValueError:
                raise UserError(f"'{value}' is not a date (use YYYY-MM-DD)") from None


def _export_for_queries(encoder, quiet: bool) -> None:
    """Export the model to ONNX once per index so queries start without torch; never fails the command."""
    from retrieval.backend import default_backend

    if default_backend() == "torch":
        return
    from retrieval.onnx_export import ensure_export

    def start() -> None:
        if not quiet:
            _err("exporting the model to ONNX for fast queries (once per index and model)")

    ensure_export(encoder, _home(), lambda msg: _err(f"warning: {msg}"), on_start=start)


def _searcher(model: str | None, pretrained: str | None, device: str, precision: str, backend: str = "auto"):
    from retrieval.session import open_searcher

    _read_only["done"] = True
    return open_searcher(_home(), model, pretrained, device, precision, backend=backend, notify=_err)


def _image_bytes(path: Path) -> bytes:
    from retrieval.imageio import read_bytes

    return read_bytes(path.expanduser())


@app.command()
@handle_errors
def search(
    query: Annotated[str | None, typer.Argument(help="What to look for, in words.")] = None,
    image: Annotated[Path | None, typer.Option("--image", help="Query image (image->image search).")] = None,
    weight: Annotated[float, typer.Option(
        "--weight", min=0.0, max=1.0, help="Share of the text when fusing text and --image.")] = DEFAULT_WEIGHT,
    negative: Annotated[list[str] | None, typer.Option(
        "--not", help="Text to steer away from (repeatable).")] = None,
    k: KOpt = DEFAULT_K,
    after: Annotated[str | None, typer.Option("--after", help="Taken on or after DATE (YYYY-MM-DD).")] = None,
    before: Annotated[str | None, typer.Option("--before", help="Taken before DATE (YYYY-MM-DD).")] = None,
    under: Annotated[Path | None, typer.Option("--under", help="Only images under FOLDER.")] = None,
    camera: Annotated[str | None, typer.Option("--camera", help="Camera make/model contains TEXT.")] = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    backend: BackendOpt = "auto",
    rerank: RerankOpt = None,
    rerank_k: RerankKOpt = RERANK_K,
    exact: Annotated[bool, typer.Option("--exact", help="Exact search even when an ANN index exists.")] = False,
    nprobe: Annotated[int | None, typer.Option(
        "--nprobe", min=1, help="IVF lists to visit (overrides the tuned value).")] = None,
    ef_search: Annotated[int | None, typer.Option(
        "--ef-search", min=1, help="HNSW candidate list size (overrides the tuned value).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Find images by text, by example image, or both fused; optionally filtered.

    Text queries rerank the dense top --rerank-k by co-attention over token features (--no-rerank: off).

    Dates are the EXIF capture time, or the file time for images without one.

    Examples:

      crossmodal search "a dog running on a beach" -k 20

      crossmodal search --image query.jpg -k 10

      crossmodal search "at night" --image query.jpg --weight 0.5

      crossmodal search "a red car" --not "people" --json

      crossmodal search "birthday cake" --after 2023-01-01 --before 2024-01-01 --under ~/Pictures --camera pixel

      crossmodal search "a lighthouse" --nprobe 64     (or --ef-search 256, or --exact)
    """
    from retrieval.imageio import is_raw_name
    from retrieval.store import ImageFilter

    if (query is None or not query.strip()) and image is None:
        raise UserError("give a text query, an --image, or both (see `crossmodal search --help`)")
    flt = ImageFilter(under=str(under.expanduser()) if under else None, after=after, before=before,
                      camera=camera)
    _check_dates(flt)
    data = _image_bytes(image) if image is not None else None
    searcher = _searcher(model, pretrained, device, precision, backend)
    if exact or nprobe or ef_search:
        from retrieval.store.store import QueryOptions

        searcher.store.query_options = QueryOptions(exact=exact, nprobe=nprobe, ef_search=ef_search)
    reranker = open_reranker(searcher, rerank if query and query.strip() else False, _err)
    q = (reranker or searcher).query_vector(text=query, image=data, weight=weight, negatives=negative or [],
                                            image_raw=image is not None and is_raw_name(str(image)))
    hits = search_hits(searcher, reranker, q, query, k, flt, rerank_k)
    if json_out:
        _print_json([{"rank": h.rank, "id": h.id, "score": h.score, **dense_fields(h), "path": h.item.path,
                      "width": h.item.width, "height": h.item.height} for h in hits])
        return
    _table(f"{len(hits)} images", ["rank", "score", "path"],
           [[str(h.rank), f"{h.score:.4f}", h.item.path or ""] for h in hits])


@app.command()
@handle_errors
def caption(
    image: Annotated[Path, typer.Argument(help="Image to describe.")],
    k: KOpt = 5,
    corpus: Annotated[str | None, typer.Option(
        "--corpus", help="Only this corpus (builtin:imagenet for the built-in vocabulary).")] = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    backend: BackendOpt = "auto",
    rerank: RerankOpt = None,
    rerank_k: RerankKOpt = RERANK_K,
    json_out: JsonOpt = False,
) -> None:
    """Find the captions that best describe an image (from your corpora, else ImageNet class prompts).

    The dense top --rerank-k captions are reranked by co-attention over token features (--no-rerank: off).

    Examples:

      crossmodal caption photo.jpg -k 5

      crossmodal caption photo.jpg --corpus alt-texts --json
    """
    from retrieval.imageio import is_raw_name

    data = _image_bytes(image)
    searcher = _searcher(model, pretrained, device, precision, backend)
    if searcher.store.count("text") == 0 and not json_out:
        typer.echo("no caption corpus added yet; using the built-in ImageNet vocabulary "
                   "(embedded once per model, then cached)", err=True)
    hits = caption_hits(searcher, data, k, corpus, is_raw_name(str(image)), rerank, rerank_k, _err)
    if json_out:
        _print_json([{"rank": h.rank, "id": h.id, "score": h.score, **dense_fields(h), "text": h.item.text,
                      "corpus": h.item.corpus} for h in hits])
        return
    _table(f"captions for {image}", ["rank", "score", "text", "corpus"],
           [[str(h.rank), f"{h.score:.4f}", h.item.text or "", h.item.corpus or ""] for h in hits])


@app.command()
@handle_errors
def info(json_out: JsonOpt = False) -> None:
    """What the index holds: model, counts, corpora, size on disk.

    Example:

      crossmodal info --json
    """
    from retrieval.store import Store

    _read_only["done"] = True
    with Store.open(_home()) as store:
        fp = store.fingerprint
        data = {
            "home": str(store.home),
            "model": fp.model if fp else None,
            "pretrained": fp.pretrained if fp else None,
            "dim": fp.dim if fp else None,
            "images": store.count("image"),
            "texts": store.count("text"),
            "corpora": store.corpora(),
            "vector_index": {m: store.ann_info(m) for m in ("image", "text")},
        }
        size = store.size_on_disk()
        skipped = len(store.skipped())
    if json_out:
        _print_json(data)
        return
    rows = [[k, str(v)] for k, v in data.items() if k not in ("corpora", "vector_index")]
    for m, ix in data["vector_index"].items():
        mapped = ", memory-mapped" if ix["memory_mapped"] else ""
        rows.append([f"{m} search", f"{ix['describe']} (asked: {ix['requested']}{mapped})"
                     + (f"; {ix['problem']}" if ix.get("problem") else "")])
    rows += [[f"corpus {name}", str(n)] for name, n in data["corpora"].items()]
    rows += [["skipped files", str(skipped)], ["size on disk", f"{size / 1e6:.1f} MB"]]
    if fp is not None:
        from retrieval.onnx_encoder import export_bytes

        onnx_bytes = export_bytes(store.home, fp)
        rows += [["ONNX export (fast queries)", f"{onnx_bytes / 1e6:.1f} MB" if onnx_bytes else "none"]]
    _table("crossmodal index", ["what", "value"], rows)


@app.command()
@handle_errors
def skipped(json_out: JsonOpt = False) -> None:
    """List files that could not be indexed, and why.

    Example:

      crossmodal skipped --json
    """
    from retrieval.store import Store

    with Store.open(_home()) as store:
        rows = store.skipped()
    if json_out:
        _print_json([{"path": p, "reason": r} for p, r in rows])
        return
    _table(f"{len(rows)} skipped files", ["path", "reason"], [[p, r] for p, r in rows])


@app.command()
@handle_errors
def repair(json_out: JsonOpt = False) -> None:
    """Make catalog and vectors agree after damage: drops rows without vectors and vectors without rows.

    Run `crossmodal index` afterwards to re-embed the dropped images.

    Example:

      crossmodal repair
    """
    from retrieval.store import Store

    with Store.open(_home(), writable=True, check=False) as store:
        report = store.repair()
    if json_out:
        _print_json(report)
    else:
        typer.echo(f"dropped {report['rows_dropped']} rows without vectors and "
                   f"{report['vectors_dropped']} vectors without rows")


@app.command()
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
    env = dict(os.environ, **{HOME_ENV: str(_home())})
    cmd = [sys.executable, "-m", "streamlit", "run", str(app_path), "--server.address", host,
           "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--global.developmentMode", "false", "--server.maxUploadSize", str(MAX_UPLOAD_MB),
           "--server.fileWatcherType", "none", "--client.toolbarMode", "viewer"]
    typer.echo(f"crossmodal page on http://{host}:{port} (Ctrl-C to stop)", err=True)
    try:
        raise typer.Exit(subprocess.call(cmd, env=env))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


_read_only = {"done": False}  # set by query commands: nothing of theirs needs interpreter teardown


def _report_heavy_imports() -> None:
    """CROSSMODAL_DEBUG_IMPORTS=1: name the heavy modules this process imported (tests, benchmarks)."""
    if os.environ.get("CROSSMODAL_DEBUG_IMPORTS"):
        heavy = sorted(m for m in ("torch", "torchvision", "open_clip") if m in sys.modules)
        sys.stderr.write(f"crossmodal: heavy imports: {', '.join(heavy) or 'none'}\n")


register_rerank_commands(app, sys.modules[__name__])  # train-reranker, eval, set-reranker


def main() -> None:
    """Console-script entry point.

    Query commands end with os._exit once their output is flushed: tearing down sqlalchemy, numpy, faiss
    and onnxruntime at interpreter exit takes ~0.5 s and does nothing a read-only command needs.
    """
    import atexit

    from .light_params import install

    install()  # plain option values without importing pydantic (~0.2 s of a query)
    atexit.register(_report_heavy_imports)
    try:
        app()
        code = 0
    except SystemExit as e:
        if not _read_only["done"] or not isinstance(e.code, (int, type(None))):
            raise
        code = e.code or 0
    if not _read_only["done"]:
        return
    atexit.unregister(_report_heavy_imports)
    _report_heavy_imports()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        code = code or 1
    os._exit(code)


if __name__ == "__main__":
    main()
