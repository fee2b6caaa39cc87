"""The co-attention reranker's commands: set-reranker, train-reranker, eval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cli.common import (
    RERANK_K,
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    PrecisionOpt,
    PretrainedOpt,
    RerankKOpt,
    RerankOpt,
    err,
    handle_errors,
    home,
    print_json,
    table,
)
from retrieval.errors import UserError

if TYPE_CHECKING:
    from retrieval.model.torch_encoder import TorchEncoder
    from training.evaluate import Features, Pairs


def register(app: typer.Typer) -> None:
    """Add this group's commands to the app."""
    app.command("set-reranker")(set_reranker)
    app.command("train-reranker")(train_reranker)
    app.command("eval")(eval_cmd)


@handle_errors
def set_reranker(
    file: Annotated[Path | None, typer.Argument(help="Reranker .safetensors from train-reranker.")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Forget the recorded file (parameter-free).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Record a trained reranker in the index (its path and sha256); text searches and captions then rerank
    with it by default.

    Without one, results are dense unless --rerank asks for the parameter-free scorer.

    Examples:

      crossmodal set-reranker reranker.safetensors

      crossmodal set-reranker --clear
    """
    from retrieval.rerank.params import record_reranker
    from retrieval.store import Store

    if (file is None) == (not clear):
        raise UserError("give a reranker FILE or --clear")
    with Store.open(home(), writable=True) as store:
        info = record_reranker(store, None if clear else file)
    if json_out:
        print_json({"reranker": info})
    else:
        typer.echo(f"reranker: {info['path']} (sha256 {info['sha256'][:12]})" if info
                   else "reranker: parameter-free")


@handle_errors
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
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Learn the reranker's projections and lambda with the encoder frozen, from image-caption pairs.

    The model is the index's recorded one (or --model/--pretrained). Splits: train (+restval) to learn,
    val to report Recall@1 per epoch and keep the best epoch.

    Examples:

      crossmodal train-reranker ~/data/flickr30k --out reranker.safetensors

      crossmodal train-reranker pairs.csv --out reranker.safetensors --epochs 3 --device cuda
    """
    _passive_threads()
    from training.evaluate import load_pairs
    from training.torch_scorer import save_params
    from training.train_reranker import TrainConfig, train

    pairs = load_pairs(data, images)
    tr, va = pairs.split(("train", "restval")), pairs.split("val")
    if not len(va.images):
        raise UserError(f"{data} has no 'val' split to validate on")
    if max_images and len(tr.images) > max_images:
        tr = _first_images(tr, max_images)
    encoder, _ = _encoder(model, pretrained, device, precision)
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
    best = result.history[result.best_epoch - 1] if result.best_epoch else None
    beats = best is not None and best["mean_R@1"] > result.baseline["mean_R@1"]
    summary = {"out": str(out.resolve()), "best_epoch": result.best_epoch, "baseline": result.baseline,
               "history": result.history, "beats_dense": beats}
    if not beats:  # a recorded reranker reranks every query by default: say so before anyone records this one
        err(f"warning: the reranker does not beat dense ranking on val (mean R@1 "
            f"{best['mean_R@1'] if best else 0.0:.3f} vs {result.baseline['mean_R@1']:.3f}); check it with "
            f"`crossmodal eval --reranker {out}` before recording it")
    if json_out:
        print_json(summary)
    else:
        typer.echo(f"dense val R@1 t2i {result.baseline['t2i_R@1']:.3f} i2t {result.baseline['i2t_R@1']:.3f}; "
                   f"best epoch {result.best_epoch}; wrote {out}")


@handle_errors
def eval_cmd(
    data: Annotated[Path, typer.Argument(help="Karpathy-JSON folder/file (Flickr30k, COCO) or path,caption CSV.")],
    split: Annotated[str, typer.Option("--split", help="test | val | train | all")] = "test",
    images: Annotated[Path | None, typer.Option("--images", help="Image folder (default: next to DATA).")] = None,
    rerank: RerankOpt = None,
    rerank_k: RerankKOpt = RERANK_K,
    reranker: Annotated[Path | None, typer.Option(
        "--reranker", help="Reranker file (default: the index's recorded one, else parameter-free).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the results as JSON here.")] = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Recall@1/5/10, text->image and image->text, with and without reranking (clip_benchmark protocol).

    Reranked figures come with a trained reranker (--reranker, or the index's recorded one); --rerank adds
    them for the parameter-free scorer.

    Examples:

      crossmodal eval ~/data/flickr30k --split test --out flickr-test.json

      crossmodal eval ~/data/coco/dataset_coco.json --reranker reranker.safetensors

      crossmodal eval ~/data/scenes --rerank --rerank-k 16
    """
    _passive_threads()
    from training.evaluate import evaluate_features, load_pairs
    from training.torch_scorer import CoAttentionScorer, load_params

    pairs = load_pairs(data, images).split(split)
    if not len(pairs.images):
        raise UserError(f"{data} has no images in split '{split}'")
    encoder, recorded = _encoder(model, pretrained, device, precision)
    scorer = None
    if rerank is None and not (reranker or recorded):
        rerank = False  # like search: the parameter-free scorer only when asked for (--rerank)
    if rerank is not False:
        from retrieval.errors import TokensUnsupported

        try:
            encoder.check_tokens()
        except TokensUnsupported as e:
            if rerank:
                raise
            err(f"note: {e}; dense only")
            rerank = False
    if rerank is not False:
        path = reranker or recorded
        fp = encoder.fingerprint
        scorer = load_params(path, fp.dim, fp.weights) if path else CoAttentionScorer(fp.dim).eval()
    feats = _features(encoder, pairs, split, json_out)
    result = evaluate_features(feats, scorer, rerank_k, device="cuda" if encoder.device == "cuda" else "cpu")
    doc = {"data": str(data), "split": split, "model": encoder.fingerprint.describe(), **result.to_json()}
    if out:
        out.expanduser().write_text(json.dumps(doc, indent=2) + "\n")
    if json_out:
        print_json(doc)
        return
    rows = []
    for name, res in (("dense", result.dense), (f"reranked top {rerank_k}", result.reranked)):
        if not res:
            continue
        rows.append([name] + [f"{res[d][k] * 100:.2f}" for d in ("t2i", "i2t") for k in (1, 5, 10)])
    table(f"{split}: {result.images} images, {result.captions} captions",
               ["ranking"] + [f"{d} R@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)], rows)


def _passive_threads() -> None:
    """Before torch loads: OpenMP threads that spin while they wait made a train-reranker step 5x slower on a
    machine busy with other work (62 s vs 323 s for one epoch of 320 images, load 9 on 2 cores); set
    OMP_WAIT_POLICY yourself to override."""
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _first_images(pairs: Pairs, n: int) -> Pairs:
    """The pairs of the first n images (--max-images)."""
    keep = set(range(n))
    pairs.splits = ["keep" if i in keep else "drop" for i in range(len(pairs.images))]
    return pairs.split("keep")


def _encoder(model: str | None, pretrained: str | None, device: str, precision: str
             ) -> tuple[TorchEncoder, str | None]:
    """The index's recorded model on torch (or --model/--pretrained when there is no index yet), and the
    reranker file the index records (None: none)."""
    from retrieval.errors import IndexMissing
    from retrieval.model.recorded import NO_INDEX, open_model
    from retrieval.rerank.params import recorded_reranker
    from retrieval.store import Store

    try:
        with Store.open(home()) as store:
            rec = recorded_reranker(store)
            return open_model(store, model, pretrained, device, precision), rec["path"] if rec else None
    except IndexMissing:
        return open_model(NO_INDEX, model, pretrained, device, precision), None


def _features(encoder: TorchEncoder, pairs: Pairs, label: str, quiet: bool) -> Features:
    """Embeddings and token features of `pairs`, with a progress line every 5 s."""
    from training.evaluate import extract_features

    last = {"t": 0.0}

    def progress(what: str, done: int, total: int) -> None:
        import time

        now = time.perf_counter()
        if not quiet and (now - last["t"] > 5 or done == total):
            last["t"] = now
            typer.echo(f"{label} {what}: {done}/{total}", err=True)

    return extract_features(encoder, pairs, progress=progress)
