"""CLI pieces of the co-attention reranker: `train-reranker`, `eval`, `set-reranker`, and the helpers that
`search` / `caption` call to rerank their dense top-k. Registered on the main app by `indexer.cli`.
"""


import json
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer

from retrieval.errors import UserError

RERANK_K = 32

RerankOpt = Annotated[bool | None, typer.Option(
    "--rerank/--no-rerank",
    help="Reorder the dense top --rerank-k with co-attention over token features (default: on where the "
         "model supports it).")]
RerankKOpt = Annotated[int, typer.Option("--rerank-k", min=1, max=1000, help="How many dense results to rerank.")]


def open_reranker(searcher: Any, rerank: bool | None, notify: Any) -> Any | None:
    """The index's reranker, None when turned off; auto mode (None) falls back to dense with a note."""
    if rerank is False:
        return None
    from retrieval.rerank import Reranker
    from retrieval.tokens import TokensUnsupported

    try:
        return Reranker.open(searcher)
    except TokensUnsupported as e:
        if rerank:
            raise
        notify(f"note: {e}; showing dense results (--no-rerank silences this)")
        return None


def search_hits(searcher: Any, reranker: Any | None, q: Any, text: str | None, k: int, flt: Any,
                rerank_k: int) -> list:
    """Dense top-k, reordered by the reranker when there is one (q from reranker.query_vector)."""
    from retrieval.rerank import search_images

    return search_images(searcher, reranker, q, text, k, rerank_k, flt)


def caption_hits(searcher: Any, data: bytes, k: int, corpus: str | None, raw: bool, rerank: bool | None,
                 rerank_k: int, notify: Any) -> list:
    from retrieval.rerank import caption, mark_dense

    if rerank is False:
        return mark_dense(searcher.caption(data, k, corpus, raw=raw))
    return caption(searcher, open_reranker(searcher, rerank, notify), data, k, corpus, rerank_k, raw=raw)


def dense_fields(h: Any) -> dict:
    """The JSON fields a reranked hit adds beside rank and score."""
    return {"dense_score": h.dense_score if h.dense_score is not None else h.score,
            "dense_rank": h.dense_rank if h.dense_rank is not None else h.rank}


# ---- commands -------------------------------------------------------------------------------------
def register(app: typer.Typer, cli: ModuleType) -> None:
    """Add the reranker commands to `app`; `cli` is indexer.cli (its helpers and shared options)."""

    @app.command("set-reranker")
    @cli.handle_errors
    def set_reranker(
        file: Annotated[Path | None, typer.Argument(help="Reranker .safetensors from train-reranker.")] = None,
        clear: Annotated[bool, typer.Option("--clear", help="Forget the recorded file (parameter-free).")] = False,
        json_out: cli.JsonOpt = False,
    ) -> None:
        """Record a trained reranker in the index (its path and sha256); queries then use it.

        Without one, reranking uses the parameter-free scorer.

        Examples:

          crossmodal set-reranker reranker.safetensors

          crossmodal set-reranker --clear
        """
        from retrieval.rerank import record_reranker
        from retrieval.store import Store

        if (file is None) == (not clear):
            raise UserError("give a reranker FILE or --clear")
        with Store.open(cli._home(), writable=True) as store:
            info = record_reranker(store, None if clear else file)
        if json_out:
            cli._print_json({"reranker": info})
        else:
            typer.echo(f"reranker: {info['path']} (sha256 {info['sha256'][:12]})" if info
                       else "reranker: parameter-free")

    @app.command("train-reranker")
    @cli.handle_errors
    def train_reranker(
        data: Annotated[Path, typer.Argument(help="Karpathy-JSON folder/file (Flickr30k, COCO) or path,caption CSV.")],
        out: Annotated[Path, typer.Option("--out", help="Where to write the .safetensors file.")],
        images: Annotated[Path | None, typer.Option("--images", help="Image folder (default: next to DATA).")] = None,
        epochs: Annotated[int, typer.Option("--epochs", min=1)] = 5,
        batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
        negatives: Annotated[int, typer.Option("--negatives", min=1, help="Hard negatives per query.")] = 7,
        rerank_k: RerankKOpt = RERANK_K,
        heads: Annotated[int, typer.Option("--heads", min=1)] = 8,
        lr: Annotated[float, typer.Option("--lr")] = 1e-3,
        max_images: Annotated[int | None, typer.Option(
            "--max-images", min=2, help="Use at most N training images (memory: tokens are held in RAM).")] = None,
        model: cli.ModelOpt = None,
        pretrained: cli.PretrainedOpt = None,
        device: cli.DeviceOpt = "auto",
        precision: cli.PrecisionOpt = "auto",
        json_out: cli.JsonOpt = False,
    ) -> None:
        """Learn the reranker's projections and lambda with the encoder frozen, from image-caption pairs.

        The model is the index's recorded one (or --model/--pretrained). Splits: train (+restval) to learn,
        val to report Recall@1 per epoch and keep the best epoch.

        Examples:

          crossmodal train-reranker ~/data/flickr30k --out reranker.safetensors

          crossmodal train-reranker pairs.csv --out reranker.safetensors --epochs 3 --device cuda
        """
        from indexer.train_reranker import TrainConfig, train
        from retrieval.evaluate import load_pairs
        from retrieval.rerank import save_params

        pairs = load_pairs(data, images)
        tr, va = pairs.split(("train", "restval")), pairs.split("val")
        if not len(va.images):
            raise UserError(f"{data} has no 'val' split to validate on")
        if max_images and len(tr.images) > max_images:
            tr = _first_images(tr, max_images)
        encoder = _encoder(cli, model, pretrained, device, precision)
        quiet = json_out
        tf = _features(encoder, tr, "train", quiet)
        vf = _features(encoder, va, "val", quiet)
        cfg = TrainConfig(epochs=epochs, batch_size=batch_size, negatives=negatives, rerank_k=rerank_k,
                          heads=heads, lr=lr, device="cuda" if encoder.device == "cuda" else "cpu")

        def report(row: dict) -> None:
            if not quiet:
                typer.echo(f"epoch {row['epoch']}: loss {row['loss']:.4f}  val R@1 t2i {row['t2i_R@1']:.3f} "
                           f"i2t {row['i2t_R@1']:.3f}  lambda {row['lambda']:.3f}", err=True)

        if not quiet:
            typer.echo(f"{len(tr.images)} train / {len(va.images)} val images on {cfg.device}", err=True)
        result = train(tf, vf, cfg, on_epoch=report)
        out = out.expanduser()
        save_params(result.scorer, out, model=encoder.fingerprint.model, weights=encoder.fingerprint.weights)
        summary = {"out": str(out.resolve()), "best_epoch": result.best_epoch, "baseline": result.baseline,
                   "history": result.history}
        if json_out:
            cli._print_json(summary)
        else:
            typer.echo(f"dense val R@1 t2i {result.baseline['t2i_R@1']:.3f} i2t {result.baseline['i2t_R@1']:.3f}; "
                       f"best epoch {result.best_epoch}; wrote {out}")

    @app.command("eval")
    @cli.handle_errors
    def eval_cmd(
        data: Annotated[Path, typer.Argument(help="Karpathy-JSON folder/file (Flickr30k, COCO) or path,caption CSV.")],
        split: Annotated[str, typer.Option("--split", help="test | val | train | all")] = "test",
        images: Annotated[Path | None, typer.Option("--images", help="Image folder (default: next to DATA).")] = None,
        rerank: RerankOpt = None,
        rerank_k: RerankKOpt = RERANK_K,
        reranker: Annotated[Path | None, typer.Option(
            "--reranker", help="Reranker file (default: the index's recorded one, else parameter-free).")] = None,
        out: Annotated[Path | None, typer.Option("--out", help="Write the results as JSON here.")] = None,
        model: cli.ModelOpt = None,
        pretrained: cli.PretrainedOpt = None,
        device: cli.DeviceOpt = "auto",
        precision: cli.PrecisionOpt = "auto",
        json_out: cli.JsonOpt = False,
    ) -> None:
        """Recall@1/5/10, text->image and image->text, with and without reranking (clip_benchmark protocol).

        Examples:

          crossmodal eval ~/data/flickr30k --split test --out flickr-test.json

          crossmodal eval ~/data/coco/dataset_coco.json --reranker reranker.safetensors
        """
        from retrieval.evaluate import evaluate_features, load_pairs
        from retrieval.rerank import CoAttentionScorer, load_params

        pairs = load_pairs(data, images).split(split)
        if not len(pairs.images):
            raise UserError(f"{data} has no images in split '{split}'")
        encoder = _encoder(cli, model, pretrained, device, precision)
        scorer = None
        if rerank is not False:
            from retrieval.tokens import TokensUnsupported, check_model

            try:
                check_model(encoder.model)
            except TokensUnsupported as e:
                if rerank:
                    raise
                cli._err(f"note: {e}; dense only")
                rerank = False
        if rerank is not False:
            path = reranker or _recorded_reranker(cli)
            fp = encoder.fingerprint
            scorer = load_params(path, fp.dim, fp.weights) if path else CoAttentionScorer(fp.dim).eval()
        feats = _features(encoder, pairs, split, json_out)
        result = evaluate_features(feats, scorer, rerank_k, device="cuda" if encoder.device == "cuda" else "cpu")
        doc = {"data": str(data), "split": split, "model": encoder.fingerprint.describe(), **result.to_json()}
        if out:
            out.expanduser().write_text(json.dumps(doc, indent=2) + "\n")
        if json_out:
            cli._print_json(doc)
            return
        rows = []
        for name, res in (("dense", result.dense), (f"reranked top {rerank_k}", result.reranked)):
            if not res:
                continue
            rows.append([name] + [f"{res[d][k] * 100:.2f}" for d in ("t2i", "i2t") for k in (1, 5, 10)])
        cli._table(f"{split}: {result.images} images, {result.captions} captions",
                   ["ranking"] + [f"{d} R@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)], rows)


def _first_images(pairs: Any, n: int) -> Any:
    keep = set(range(n))
    pairs.splits = ["keep" if i in keep else "drop" for i in range(len(pairs.images))]
    return pairs.split("keep")


def _encoder(cli: ModuleType, model: str | None, pretrained: str | None, device: str, precision: str) -> Any:
    """The index's recorded model (or --model/--pretrained when there is no index), on torch."""
    from retrieval.config import ModelSpec
    from retrieval.encoder import load_encoder
    from retrieval.errors import IndexMissing
    from retrieval.session import check_encoder, requested_spec
    from retrieval.store import Store

    try:
        with Store.open(cli._home()) as store:
            if store.fingerprint is None:
                raise IndexMissing("empty index")
            spec, sha = requested_spec(store, model, pretrained, device, precision)
            enc = load_encoder(spec, checkpoint_sha=sha)
            check_encoder(store, enc)
            return enc
    except IndexMissing:
        spec = ModelSpec(name=model or ModelSpec.name, pretrained=pretrained or ModelSpec.pretrained,
                         device=device, precision=precision)
        return load_encoder(spec)


def _recorded_reranker(cli: ModuleType) -> str | None:
    from retrieval.errors import IndexMissing
    from retrieval.rerank import recorded_reranker
    from retrieval.store import Store

    try:
        with Store.open(cli._home()) as store:
            rec = recorded_reranker(store)
    except IndexMissing:
        return None
    return rec["path"] if rec else None


def _features(encoder: Any, pairs: Any, label: str, quiet: bool) -> Any:
    from retrieval.evaluate import extract_features

    last = {"t": 0.0}

    def progress(what: str, done: int, total: int) -> None:
        import time

        now = time.perf_counter()
        if not quiet and (now - last["t"] > 5 or done == total):
            last["t"] = now
            typer.echo(f"{label} {what}: {done}/{total}", err=True)

    return extract_features(encoder, pairs, progress=progress)
