"""Commands that read the index: search, caption, info."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cli.common import (
    RERANK_K,
    BackendOpt,
    DeviceOpt,
    EfSearchOpt,
    ExactOpt,
    JsonOpt,
    KOpt,
    MinScoreOpt,
    ModelOpt,
    NprobeOpt,
    PrecisionOpt,
    PretrainedOpt,
    RerankKOpt,
    RerankOpt,
    err,
    handle_errors,
    home,
    print_json,
    read_only,
    table,
)
from retrieval.config import DEFAULT_K, DEFAULT_WEIGHT
from retrieval.errors import UserError

if TYPE_CHECKING:
    from retrieval.query.search import Hit, Searcher
    from retrieval.store import ImageFilter


def register(app: typer.Typer) -> None:
    """Add this group's commands to the app."""
    app.command()(search)
    app.command()(caption)
    app.command()(info)


def _check_dates(flt: ImageFilter) -> None:
    """Refuse a bad --after/--before before any model loads, with the parser the filter itself uses."""
    from retrieval.store.records import date_bound

    for value in (flt.after, flt.before):
        if value:
            date_bound(value)


def _open(model: str | None, pretrained: str | None, device: str, precision: str, backend: str) -> Searcher:
    from retrieval.query.open import open_index

    read_only()
    return open_index(home(), model, pretrained, device, precision, backend=backend, notify=err)


def _ann_options(searcher: Searcher, exact: bool, nprobe: int | None, ef_search: int | None) -> None:
    """--exact / --nprobe / --ef-search: how this query searches the ANN index (checked when it searches)."""
    if exact or nprobe or ef_search:
        from retrieval.store import QueryOptions

        searcher.store.query_options = QueryOptions(exact=exact, nprobe=nprobe, ef_search=ef_search)


def _cut(hits: list[Hit], threshold: float, searcher: Searcher, why_not: str | None) -> list[Hit]:
    """The image hits whose calibrated relevance reaches `threshold` (all of them, with a note, for queries the
    calibration does not cover)."""
    from retrieval.query.cutoff import Relevance, split_by

    if why_not is not None:
        err(f"note: --min-score is not applied to {why_not} (it calibrates text against photos)")
        return hits
    kept, weaker = split_by(Relevance(searcher).images(hits), threshold)
    _note_weaker(len(weaker), threshold)
    return kept


def _note_weaker(n: int, threshold: float) -> None:
    """What the cutoff hid, on stderr (stdout stays the results, JSON or table)."""
    if n:
        err(f"{n} weaker match{'es' if n > 1 else ''} hidden (relevance below {threshold:.2f}; "
            f"a lower --min-score shows {'them' if n > 1 else 'it'})")


def _hit_json(h: Hit, *fields: str) -> dict[str, object]:
    """A hit as JSON: rank, id, score, the dense rank and score, then the item's `fields`; a path is shown
    with U+FFFD for bytes that are not UTF-8, plus `path_bytes` (base64) for such names (store/paths.py)."""
    from retrieval.store.paths import path_json

    out: dict[str, object] = {"rank": h.rank, "id": h.id, "score": h.score, "dense_score": h.dense_score,
                              "dense_rank": h.dense_rank,
                              **({"relevance": h.relevance} if h.relevance is not None else {})}
    for f in fields:
        out.update(path_json(h.item.path) if f == "path" and h.item.path is not None else {f: getattr(h.item, f)})
    return out


def _image_bytes(path: Path) -> bytes:
    """A query image, read up to the page's upload cap (never without limit: /dev/zero is a file too)."""
    from retrieval.fsutil import read_bytes
    from webui.limits import MAX_QUERY_IMAGE_BYTES

    return read_bytes(path.expanduser(), MAX_QUERY_IMAGE_BYTES, "a query image")


@handle_errors
def search(
    query: Annotated[str | None, typer.Argument(help="What to look for, in words.")] = None,
    image: Annotated[Path | None, typer.Option("--image", help="Query image (image->image search).")] = None,
    weight: Annotated[float, typer.Option(
        "--weight", min=0.0, max=1.0, help="Share of the text when fusing text and --image.")] = DEFAULT_WEIGHT,
    negative: Annotated[list[str] | None, typer.Option(
        "--not", help="Text to steer away from (repeatable).")] = None,
    k: KOpt = DEFAULT_K,
    after: Annotated[str | None, typer.Option(
        "--after", help="Taken on or after DATE (YYYY-MM-DD, or YYYY-MM-DDTHH:MM[:SS]).")] = None,
    before: Annotated[str | None, typer.Option(
        "--before", help="Taken before DATE (YYYY-MM-DD, or YYYY-MM-DDTHH:MM[:SS]).")] = None,
    under: Annotated[Path | None, typer.Option("--under", help="Only images under FOLDER.")] = None,
    camera: Annotated[str | None, typer.Option("--camera", help="Camera make/model contains TEXT.")] = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    backend: BackendOpt = "auto",
    rerank: RerankOpt = None,
    rerank_k: RerankKOpt = RERANK_K,
    exact: ExactOpt = False,
    nprobe: NprobeOpt = None,
    ef_search: EfSearchOpt = None,
    min_score: MinScoreOpt = None,
    sort: Annotated[str, typer.Option(
        "--sort", help="score | date: the order of the results kept (date: capture time, newest first).")] = "score",
    json_out: JsonOpt = False,
) -> None:
    """Find images by text, by example image, or both fused; optionally filtered.

    Text queries rerank the dense top --rerank-k by co-attention over token features when the index records a
    trained reranker (--rerank: also with the parameter-free scorer; --no-rerank: never).

    --min-score hides results that are not about a text query (calibrated relevance, see README "Quality");
    --sort date then lists what is left newest first.

    Dates are the EXIF capture time, or the file time for images without one.

    Examples:

      crossmodal search "a dog running on a beach" -k 20

      crossmodal search --image query.jpg -k 10

      crossmodal search "at night" --image query.jpg --weight 0.5

      crossmodal search "a red car" --not "people" --json

      crossmodal search "birthday cake" --after 2023-01-01 --before 2024-01-01 --under ~/Pictures --camera pixel

      crossmodal search "a lighthouse" --nprobe 64     (or --ef-search 256, or --exact)

      crossmodal search "fireworks" -k 50 --min-score auto --sort date
    """
    from retrieval.media.decode import is_raw_name
    from retrieval.query.cutoff import check_sort, parse_min_score, sort_hits
    from retrieval.rerank.reranker import open_reranker
    from retrieval.store import ImageFilter
    from retrieval.store.paths import display_path, to_catalog

    if (query is None or not query.strip()) and image is None:
        raise UserError("give a text query, an --image, or both (see `crossmodal search --help`)")
    threshold, sort = parse_min_score(min_score), check_sort(sort)
    flt = ImageFilter(under=to_catalog(os.path.abspath(under.expanduser())) if under else None, after=after,
                      before=before, camera=camera)
    _check_dates(flt)
    data = _image_bytes(image) if image is not None else None
    searcher = _open(model, pretrained, device, precision, backend)
    _ann_options(searcher, exact, nprobe, ef_search)
    reranker = open_reranker(searcher, rerank if query and query.strip() else False, err)
    q = searcher.embed_query(text=query, image=data, weight=weight, negatives=negative or [],
                             image_raw=image is not None and is_raw_name(str(image)), with_tokens=reranker is not None)
    hits = (reranker.search_images(q, k, flt, rerank_k) if reranker is not None
            else searcher.search_images(q.vector, k, flt))
    if threshold is not None:
        hits = _cut(hits, threshold, searcher,
                    None if image is None and query and query.strip() else "a query with an --image")
    hits = sort_hits(hits, sort)
    if json_out:
        print_json([_hit_json(h, "path", "width", "height") for h in hits])
        return
    rel = any(h.relevance is not None for h in hits)
    table(f"{len(hits)} images", ["rank", "score", *(["relevance"] if rel else []), "path"],
          [[str(h.rank), f"{h.score:.4f}", *([f"{h.relevance:.2f}"] if rel and h.relevance is not None else []),
            display_path(h.item.path or "")] for h in hits])


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
    exact: ExactOpt = False,
    nprobe: NprobeOpt = None,
    ef_search: EfSearchOpt = None,
    min_score: MinScoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Find the captions that best describe an image (from your corpora, else ImageNet class prompts).

    The dense top --rerank-k captions are reranked by co-attention over token features when the index records
    a trained reranker (--rerank: also with the parameter-free scorer). --min-score hides captions that are not
    about the image (calibrated relevance).

    Examples:

      crossmodal caption photo.jpg -k 5

      crossmodal caption photo.jpg --corpus alt-texts --json

      crossmodal caption photo.jpg --ef-search 256     (or --nprobe 64, or --exact)

      crossmodal caption photo.jpg -k 20 --min-score auto
    """
    from retrieval.media.decode import is_raw_name
    from retrieval.query.cutoff import parse_min_score
    from retrieval.rerank.reranker import open_reranker

    threshold = parse_min_score(min_score)
    data = _image_bytes(image)
    searcher = _open(model, pretrained, device, precision, backend)
    _ann_options(searcher, exact, nprobe, ef_search)
    if searcher.store.count("text") == 0 and not json_out:
        typer.echo("no caption corpus added yet; using the built-in ImageNet vocabulary "
                   "(embedded once per model, then cached)", err=True)
    raw = is_raw_name(str(image))
    reranker = open_reranker(searcher, rerank, err)
    # Dense captions embed the photo once, and the cutoff reuses that vector; a reranked caption makes its own
    # vision pass (vector and tokens), so only there does the cutoff embed the photo again.
    if reranker is not None:
        hits = reranker.caption(data, k, corpus, rerank_k, raw=raw)
    else:
        q = searcher.query_vector(image=data, image_raw=raw)
        hits = searcher.search_texts(q, k, corpus)
    if threshold is not None:
        from retrieval.query.cutoff import Relevance, sort_hits, split_by

        if reranker is not None:
            q = searcher.query_vector(image=data, image_raw=raw)
        hits, weaker = split_by(Relevance(searcher).captions(q, hits), threshold)
        hits = sort_hits(hits, "score")  # ranks of what is kept: 1, 2, ...
        _note_weaker(len(weaker), threshold)
    if json_out:
        print_json([_hit_json(h, "text", "corpus") for h in hits])
        return
    rel = any(h.relevance is not None for h in hits)
    table(f"captions for {image}", ["rank", "score", *(["relevance"] if rel else []), "text", "corpus"],
          [[str(h.rank), f"{h.score:.4f}", *([f"{h.relevance:.2f}"] if rel and h.relevance is not None else []),
            h.item.text or "", h.item.corpus or ""] for h in hits])


@handle_errors
def info(json_out: JsonOpt = False) -> None:
    """What the index holds: model, counts, corpora, size on disk, and where its model's ONNX export is.

    Also lists the temporary folders of ONNX exporters that died (killed mid-export) and removes them, in the
    shared export cache and in the home (earlier versions exported there): they belong to no live process
    (where the folder is read-only they are only listed).

    Example:

      crossmodal info --json
    """
    from retrieval.model.recorded import image_precisions
    from retrieval.store import Store

    read_only()
    with Store.open(home()) as store:
        fp = store.fingerprint
        data = {
            "home": str(store.home),
            "catalog": store.catalog.describe(),  # the SQLite file, or the PostgreSQL URL (password masked)
            "model": fp.model if fp else None,
            **({"model_config": {"file": fp.config_file, "sha256": fp.config.split(":", 1)[1]}}
               if fp and fp.config else {}),  # a custom model's config (recorded whole in the index)
            "pretrained": fp.pretrained if fp else None,
            "dim": fp.dim if fp else None,
            "image_precision": ", ".join(image_precisions(store)) or None,  # which embedded the images
            "images": store.count("image"),
            "texts": store.count("text"),
            "corpora": store.corpora(),
            "vector_index": {m: store.ann_info(m) for m in ("image", "text")},
        }
        size = store.size_on_disk()
        skipped = len(store.skipped())
    from retrieval.model.export_cache import exports_root, legacy_dir, legacy_root
    from retrieval.model.onnx_encoder import find_export, folder_bytes
    from retrieval.model.onnx_upkeep import sweep_exports

    leftovers = sweep_exports(exports_root()) + sweep_exports(legacy_root(store.home))
    found = find_export(fp, store.home) if fp is not None else None
    export = {"path": str(found[0]), "bytes": folder_bytes(found[0]),
              "shared": found[0].parent == exports_root()} if found is not None else None
    unused = legacy_dir(store.home, fp) if fp is not None and (found is None or found[0].parent == exports_root()) \
        else None
    if json_out:  # "onnx_leftovers" only when there were some
        print_json({**data, "onnx_export": export,
                    **({"onnx_leftovers": [{"path": str(x.path), "bytes": x.bytes, "removed": x.removed}
                                           for x in leftovers]} if leftovers else {})})
        return
    rows = [[k, str(v)] for k, v in data.items() if k not in ("corpora", "vector_index", "model_config")]
    if fp is not None and fp.config:  # the config itself is in the index: the file may move or go
        rows.insert(2, ["model config", f"{fp.config_file} ({fp.config}, recorded in the index)"])
    for m, ix in data["vector_index"].items():
        mapped = ", memory-mapped" if ix["memory_mapped"] else ""
        rows.append([f"{m} search", f"{ix['describe']} (asked: {ix['requested']}{mapped})"
                     + (f"; {ix['problem']}" if ix.get("problem") else "")])
    rows += [[f"corpus {name}", str(n)] for name, n in data["corpora"].items()]
    rows += [["skipped files", str(skipped)], ["size on disk", f"{size / 1e6:.1f} MB"]]
    if fp is not None:
        where = ("shared by every index of this model" if export and export["shared"]
                 else "in this index, from an earlier crossmodal")
        rows += [["ONNX export (fast queries)",
                  f"{export['path']}, {int(export['bytes']) / 1e6:.1f} MB ({where})" if export else "none"]]
        from retrieval.model.int8_auto import int8_status

        int8 = int8_status(store.home, fp)
        rows += [["int8 image tower (indexing)", int8]] if int8 else []
    if unused is not None and unused.is_dir():
        rows += [["unused ONNX export of an earlier crossmodal",
                  f"{unused}, {folder_bytes(unused) / 1e6:.1f} MB: delete it to reclaim the space"]]
    rows += [["ONNX leftover of a dead exporter", f"{x.path.name}, {x.bytes / 1e6:.1f} MB: "
              + ("removed" if x.removed else "not removed (read-only folder?)")] for x in leftovers]
    table("crossmodal index", ["what", "value"], rows)
