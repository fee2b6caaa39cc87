"""Commands that write the index: index, reindex, remove, add-texts, repair, and skipped (what index left out)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cli.common import (
    DeviceOpt,
    IndexTypeOpt,
    JsonOpt,
    MemoryBudgetOpt,
    ModelOpt,
    PrecisionOpt,
    PretrainedOpt,
    QuietOpt,
    clean,
    err,
    handle_errors,
    home,
    print_json,
    progress_printer,
    table,
)
from cli.index_model import check_int8, check_ray, export_for_queries, model_source, ray_step
from retrieval.config import DEFAULT_BATCH_SIZE, DEFAULT_CUDA_BATCH_SIZE
from retrieval.errors import UserError

if TYPE_CHECKING:
    from retrieval.store import Store


def register(app: typer.Typer) -> None:
    """Add this group's commands to the app."""
    app.command()(index)
    app.command()(reindex)
    app.command()(remove)
    app.command("add-texts")(add_texts)
    app.command()(skipped)
    app.command()(repair)


@handle_errors
def index(
    paths: Annotated[list[Path], typer.Argument(help="Folders (searched recursively) or image files.")],
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = "auto",
    precision: Annotated[str, typer.Option(
        "--precision", help="auto | fp32 | bf16 | fp16 | int8 (auto: fp16 on CUDA; on the CPU images on the "
                            "int8 tower where it measured faster, else torch in bf16 where bf16 is fast, else "
                            "fp32; int8: images on an int8 ONNX Runtime graph checked against fp32, CPU only)"
    )] = "auto",
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
    catalog: Annotated[str | None, typer.Option(
        "--catalog", help="Where a NEW index keeps its catalog: postgresql+psycopg://USER@HOST/DB (needs "
                          "crossmodal[cluster]) or sqlite (the default); the home remembers it "
                          "(CROSSMODAL_CATALOG overrides).")] = None,
    ray: Annotated[str | None, typer.Option(
        "--ray", help="Embed on Ray Data: 'auto' starts a local Ray instance, an address (ray://host:10001) "
                      "joins a cluster; needs pip install 'crossmodal[cluster]'")] = None,
    actors: Annotated[int | None, typer.Option(
        "--actors", min=1, max=4096, help="With --ray: model actors [default: one per GPU, else one]")] = None,
    shard_size: Annotated[int, typer.Option(
        "--shard-size", min=1, max=65536, help="With --ray: images per shard file (one actor call)")] = 256,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Embed every image under the given folders and keep the index in line with them.

    Re-runs only stat unchanged files (same path, size, mtime), re-embed changed ones, keep the vectors of
    moved or renamed files (same content), and drop files that were deleted. A folder that turns up empty
    (an unmounted drive) keeps its images; use `crossmodal remove` to drop them.

    Examples:

      crossmodal index ~/Pictures

      crossmodal index ~/Pictures --model ViT-B-32 --pretrained /models/vit-b-32.pt --json

      crossmodal index ~/Pictures --model my_clip.json --pretrained my_clip.pt   (a custom open_clip config)

      crossmodal index /archive --index-type auto --memory-budget 8G

      crossmodal --home /shared/idx index /archive --catalog postgresql+psycopg://me@dbhost/photos

      crossmodal index /archive --ray auto --actors 2          (Ray Data on this machine; a killed run resumes)
    """
    from indexer.pipeline import index_paths
    from retrieval.model.int8_auto import auto_int8_allowed
    from retrieval.model.recorded import ModelOnDemand, requested_spec
    from retrieval.query.tuning import vocabulary_queries
    from retrieval.store import Store

    for p in paths:
        if not p.expanduser().exists():
            raise UserError(f"no such file or folder: {p}")
    check_int8(precision, device)
    auto_int8_allowed()  # a bad CROSSMODAL_INT8 is one line before anything is opened
    if ray is not None:
        check_ray(precision, gpu_decode, workers)

    with Store.open(home(), create=True, writable=True, catalog=catalog) as store:
        requested_spec(store, model, pretrained, device, precision)  # a different model: refused before any work
        plain = reranker is None and index_type is None and memory_budget is None  # those need the model first
        source = model_source(store, model, pretrained, device, precision, quiet or json_out, guess=plain,
                              local=ray is None)
        if gpu_decode:
            from retrieval.hardware import gpu_decode_problem

            problem = gpu_decode_problem(source.device)
            if problem:
                raise UserError(f"--gpu-decode: {problem}")
        # Tuning may embed the vocabulary with the model in memory; nothing loads it for tuning alone. It runs
        # at commits, after the first embedded batch has recorded a new index's model.
        store.tune_with(vocabulary_queries(store.home, lambda: store.fingerprint,
                                           source.if_loaded if isinstance(source, ModelOnDemand) else lambda: source))
        if reranker is not None:
            from retrieval.rerank.params import record_reranker

            record_reranker(store, reranker)
        if index_type is not None or memory_budget is not None:  # recorded first; commits follow it
            _request_index_type(store, index_type, memory_budget, rebuild=False)
        embed = None if ray is None else ray_step(store, source, (model, pretrained, device, precision), ray,
                                                  actors, shard_size, batch_size, commit_every, quiet or json_out)
        update, stop = progress_printer("images", quiet)
        try:
            report = index_paths(store, source, [str(p) for p in paths], batch_size=batch_size,
                                 workers=workers, progress=update, commit_every=commit_every,
                                 gpu_decode=gpu_decode, embed=embed)
        finally:
            stop()
        if index_type is not None or memory_budget is not None:  # a switch with no new images builds now
            store.set_index_type(store.ann_state["image"].requested, store.ann_state["image"].budget,
                                 log=None if quiet or json_out else err)
        if store.fingerprint is None and isinstance(source, ModelOnDemand):
            source()  # a new index with nothing embedded still records its model
        fp = store.fingerprint
        total = store.count("image")
    if fp is None:  # a recorded preprocessing implies a recorded model
        raise UserError(f"the index in {home()} records no model; index into a new --home")
    for root, n in report.kept:
        err(f"warning: {root} has no image files now; its {n} indexed images were kept "
            f"(unmounted drive?). `crossmodal remove {root}` drops them.")
    if json_out:
        print_json(report.to_json())
    else:
        from retrieval.store.paths import display_path

        for path, reason in report.skipped:
            typer.echo(clean(f"skipped {display_path(path)}: {reason}"), err=True)
        table("index", ["what", "count"], [
            ["added", str(report.added)], ["updated", str(report.updated)], ["moved", str(report.moved)],
            ["removed", str(report.removed)],
            ["already indexed", str(report.unchanged)], ["skipped", str(len(report.skipped))],
            ["images in index", str(total)], ["seconds", f"{report.seconds:.1f}"],
            ["images/s", f"{report.images_per_second:.1f}"],
        ])
    export_for_queries(fp, source if isinstance(source, ModelOnDemand) else lambda: source, quiet or json_out)


def _request_index_type(store: Store, index_type: str | None, memory_budget: str | None, rebuild: bool,
                        force: bool = False, log: Callable[[str], None] | None = None) -> dict[str, str]:
    """Record (and with `rebuild`, build now) the vector index type; unset flags keep what is recorded."""
    from retrieval.store.ann import parse_budget

    current = store.ann_state.get("image")
    requested = index_type or (current.requested if current else "auto")
    budget = parse_budget(memory_budget) if memory_budget is not None else (current.budget if current else None)
    return store.set_index_type(requested, budget, rebuild=rebuild, force=force, log=log)


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
    from retrieval.query.tuning import vocabulary_queries
    from retrieval.store import Store

    with Store.open(home(), writable=True) as store:
        if store.fingerprint is None:
            raise UserError(f"the index in {store.home} is empty; run `crossmodal index FOLDER` first")
        store.tune_with(vocabulary_queries(store.home, store.fingerprint))
        done = _request_index_type(store, index_type, memory_budget, rebuild=True, force=True,
                                   log=None if json_out else err)
        info = {m: store.ann_info(m) for m in done}
    if json_out:
        print_json(info)
        return
    table("vector index", ["modality", "index"], [[m, d] for m, d in done.items()])


REMOVE_ASK_ABOVE = 1000  # `remove` drops more than this many images (or over half the index) only with --yes


@handle_errors
def remove(
    paths: Annotated[list[str], typer.Argument(help="Folders or files to drop from the index.")],
    yes: Annotated[bool, typer.Option(
        "--yes", "-y", help=f"Remove even when that drops more than {REMOVE_ASK_ABOVE:,} images or more than half "
                            "of the index (otherwise such a remove only says what it would drop).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Drop images at or under the given folders from the index (the files themselves are not touched).

    A remove that would drop more than 1,000 images or more than half of the index says what it would drop
    and removes nothing unless --yes is given.

    Examples:

      crossmodal remove ~/Pictures/old-phone

      crossmodal remove /media/old-drive --yes
    """
    from indexer.pipeline import ids_at, remove_paths
    from retrieval.store import Store

    for p in paths:
        if not p.strip():
            raise UserError("an empty path would remove every image under the current folder; "
                            "name the folder or file to remove")
    with Store.open(home(), writable=True) as store:
        if not yes:
            _refuse_large_removal(store, ids_at(store, paths))
        n = remove_paths(store, paths)
    if json_out:
        print_json({"removed": n})
    else:
        typer.echo(f"removed {n} images from the index")


def _refuse_large_removal(store: Store, ids: set[int]) -> None:
    """Raise a UserError naming the count and the top folders when a remove is too large to do unasked."""
    total = store.count("image")
    if len(ids) <= REMOVE_ASK_ABOVE and 2 * len(ids) <= total:
        return
    folders = _top_folders([v.path for v in store.items(ids).values() if v.path])
    where = ", ".join(f"{folder}: {n:,}" for folder, n in folders[:3]) + (", ..." if len(folders) > 3 else "")
    raise UserError(f"this would remove {len(ids):,} of the {total:,} indexed images ({where}); nothing was "
                    "removed: run again with --yes to remove them")


def _top_folders(paths: list[str]) -> list[tuple[str, int]]:
    """Image counts per folder right below the deepest folder that holds them all, largest first."""
    import os
    from collections import Counter

    if not paths:
        return []
    dirs = [os.path.dirname(p) for p in paths]
    root = os.path.commonpath(dirs)
    counts: Counter[str] = Counter()
    for d in dirs:
        rel = os.path.relpath(d, root)
        counts[root if rel == "." else os.path.join(root, rel.split(os.sep)[0])] += 1
    return counts.most_common()


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
    quiet: QuietOpt = False,
) -> None:
    """Add a caption corpus (duplicates within a corpus are stored once; re-adding adds only new lines).

    Examples:

      crossmodal add-texts captions.csv --column caption --corpus alt-texts

      crossmodal add-texts notes.txt
    """
    from indexer.texts import add_corpus, read_corpus
    from retrieval.model.recorded import open_model, record_model
    from retrieval.store import Store

    read_corpus(file, column, field)  # fail on a bad file before loading any model
    with Store.open(home(), create=True, writable=True) as store:
        encoder = open_model(store, model, pretrained, device, precision)
        record_model(store, encoder)
        update, stop = progress_printer("captions", quiet or json_out)
        try:
            report = add_corpus(store, encoder, file, corpus, column, field, progress=update)
        finally:
            stop()
    export_for_queries(encoder.fingerprint, lambda: encoder, quiet or json_out)
    if json_out:
        print_json(report.to_json())
    else:
        typer.echo(clean(f"corpus '{report.corpus}'") + f": added {report.added} captions, {report.duplicates} "
                   f"duplicates skipped ({report.seconds:.1f} s)")


@handle_errors
def skipped(json_out: JsonOpt = False) -> None:
    """List files that could not be indexed, and why.

    Example:

      crossmodal skipped --json
    """
    from retrieval.store import Store

    with Store.open(home()) as store:
        rows = store.skipped()
    from retrieval.store.paths import display_path, path_json

    if json_out:
        print_json([{**path_json(p), "reason": r} for p, r in rows])
        return
    table(f"{len(rows)} skipped files", ["path", "reason"], [[display_path(p), r] for p, r in rows])


@handle_errors
def repair(json_out: JsonOpt = False) -> None:
    """Make catalog and vectors agree after damage, and say exactly what was lost.

    Rebuilds a catalog SQLite cannot read from what it still holds (the damaged file is kept aside as
    catalog.sqlite.damaged-<time>), checks every vector file against its checksums and for NaN/inf, and
    drops damaged vectors, rows without vectors and vectors without rows. Run `crossmodal index`
    afterwards to re-embed the dropped images.

    Example:

      crossmodal repair
    """
    from retrieval.store import Store

    with Store.open(home(), writable=True, check=False, salvage=True) as store:
        report = store.repair_report()
    if json_out:
        print_json(report.to_json())
        return
    for note in report.notes:
        typer.echo(note)
    typer.echo(f"dropped {report.rows_dropped} rows without vectors and "
               f"{report.vectors_dropped} vectors without rows")
