"""The quality lab's measuring stages (bench/quality_lab.py runs them): test split, homes, reranking, decode,
precision and backend, the relevance cutoff and the large collection; returns the figures and the Markdown."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.lab_search import add_distractors, ann_rows, distractor_truth, load_test, search_recall
from bench.quality_lab import INDEX_TYPES, cli, fmt, home_stage, log, recall_table, sha256_file, test_folder

RERANK_KS = (8, 16, 32, 64)
LAMBDAS = (0.25, 0.5, 1.0, 2.0)


def _vectors(encoder: Any, files: list[Path], full: bool = False) -> np.ndarray:
    """Photos embedded through the index's decode path (JPEG draft toward the model's size), or `full`: decoded
    at full size first, then resized as the model wants."""
    from retrieval.media.decode import decode_for_model, load_image, prepare

    def pixels(p: Path) -> np.ndarray:
        data = p.read_bytes()
        return prepare(load_image(data)[0], encoder.preprocess) if full else decode_for_model(
            data, encoder.preprocess).pixels

    return np.concatenate([encoder.encode_pixels(np.stack([pixels(p) for p in files[s:s + 64]]))
                           for s in range(0, len(files), 64)])


def _cutoff(encoder: Any, vocab: np.ndarray, scenes: Path) -> dict[str, Any]:
    """Fit each calibration's threshold on val (best F1 over caption x photo pairs), report it on test."""
    from retrieval.query.cutoff import AUTO_MIN_SCORE
    from training.evaluate import load_pairs
    from training.lab_metrics import cutoff_quality, fit_threshold
    from training.lab_rerank import scene_relevance

    def zs(split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
        pairs = load_pairs(scenes).split(split)
        img = _vectors(encoder, pairs.images)
        txt = encoder.encode_texts(pairs.captions, batch_size=256)
        sim = txt @ img.T
        base = img @ vocab.T
        calib = {"raw cosine": sim,
                 "z vs the photo's vocabulary scores (auto)": (sim - base.mean(1)[None]) / base.std(1)[None],
                 "z vs the query's scores over the collection": (sim - sim.mean(1, keepdims=True))
                 / sim.std(1, keepdims=True)}
        return calib, scene_relevance(scenes, pairs)

    val, val_rel = zs("val")
    test, test_rel = zs("test")
    rows = []
    for name in val:
        fit = fit_threshold(val[name], val_rel)
        row = {"calibration": name, "val": fit, "test": cutoff_quality(test[name], test_rel, fit["threshold"])}
        if "auto" in name:
            row["test_auto"] = cutoff_quality(test[name], test_rel, AUTO_MIN_SCORE)
        rows.append(row)
    return {"rows": rows, "relevant_share_test": float(test_rel.mean()), "auto": AUTO_MIN_SCORE}


def measure(a: argparse.Namespace, scenes: Path, model_json: Path, model_pt: Path,
            train_log: dict[str, Any]) -> dict[str, Any]:
    """The test-split measures (kept in WORK, keyed by model and reranker, so a later stage's failure does
    not cost them again), then the large collection."""
    import json


    reranker = a.work / f"reranker-{sha256_file(model_pt)[:12]}-{a.reranker_images}x{a.reranker_epochs}-v2.safetensors"
    cache = reranker.with_suffix(".small.json")
    small = json.loads(cache.read_text()) if cache.is_file() else None
    if small is None:
        t0 = time.perf_counter()
        small = _small(a, scenes, model_json, model_pt, reranker)
        small["seconds"] = round(time.perf_counter() - t0, 1)
        cache.write_text(json.dumps(small, default=float))
    large: list[dict[str, Any]] = []
    if a.distractors:
        large = large_stage(a, scenes, model_json, model_pt)
    md = _markdown(list(small["rows"].items()), small["binding"], small["cutoff"], large, small["n_img"],
                   small["n_cap"], a, small["decode_cosine"], train_log, small["eval_cli"])
    return {**small, "large": large, "markdown": md, "when": time.strftime("%Y-%m-%d %H:%M")}


def large_stage(a: argparse.Namespace, scenes: Path, model_json: Path, model_pt: Path) -> list[dict[str, Any]]:
    """The test split among `a.distractors` distractor scenes, one row per index type (kept in WORK)."""
    import json

    from retrieval.model.recorded import NO_INDEX, open_model
    from training.distractors import build

    key = sha256_file(model_pt)[:12]
    cache = a.work / f"large-{key}-{a.distractors}.json"
    if cache.is_file():
        rows: list[dict[str, Any]] = json.loads(cache.read_text())["rows"]
        return rows
    t0 = time.perf_counter()
    images, captions = test_folder(a.work, scenes)
    test, test_scenes, test_specs = load_test(scenes, images)
    encoder = open_model(NO_INDEX, str(model_json), str(model_pt), "cpu", "fp32")
    d = build(a.work / "distractors" / key, a.distractors, encoder, a.backgrounds, log=log)
    big = home_stage(a.work, f"large-{a.distractors}", images, captions,
                     ["--model", str(model_json), "--pretrained", str(model_pt)], "fp32")
    add_distractors(big, d, log)
    rows = ann_rows(big, distractor_truth(test_scenes, test_specs, d), test, ("auto",) + INDEX_TYPES,
                    lambda t: cli(big, "reindex", "--index-type", t), log)
    cache.write_text(json.dumps({"rows": rows, "seconds": round(time.perf_counter() - t0, 1)}, default=float))
    return rows


def _small(a: argparse.Namespace, scenes: Path, model_json: Path, model_pt: Path, reranker: Path) -> dict[str, Any]:
    from retrieval.model.recorded import NO_INDEX, open_model
    from retrieval.query.open import open_index
    from retrieval.query.vocab import prompt_vocabulary
    from retrieval.rerank.params import load_scorer
    from retrieval.rerank.reranker import Reranker
    from training.evaluate import extract_features, load_pairs
    from training.lab_metrics import SceneTruth
    from training.lab_rerank import binding_accuracy, dense_recall, rerank_recall, scene_relevance
    from training.torch_scorer import CoAttentionScorer, load_params

    work = a.work
    images, captions = test_folder(work, scenes)
    model = ["--model", str(model_json), "--pretrained", str(model_pt)]
    homes = {p: home_stage(work, p, images, captions, model, p) for p in ("fp32", "bf16", "int8")}
    if not reranker.is_file():
        cli(homes["fp32"], "train-reranker", str(scenes), "--out", str(reranker), "--epochs", str(a.reranker_epochs),
            "--max-images", str(a.reranker_images))
    ev = {"dense": cli(homes["fp32"], "eval", str(scenes), "--split", "test", "--no-rerank"),
          "trained": cli(homes["fp32"], "eval", str(scenes), "--split", "test", "--reranker", str(reranker))}

    encoder = open_model(NO_INDEX, str(model_json), str(model_pt), "cpu", "fp32")
    dim, weights = encoder.fingerprint.dim, encoder.fingerprint.weights
    pairs = load_pairs(scenes).split("test")
    feats = extract_features(encoder, pairs)
    rel = scene_relevance(scenes, pairs)
    trained = load_params(reranker, dim, weights).eval()
    rows: list[tuple[str, dict[str, Any]]] = []
    chance = dense_recall(feats.image_pooled, feats.text_pooled, rel, feats.caption_image)
    rows.append(("chance (random ranking)", {n: {d: chance[n]["chance"][d] for d in ("t2i", "i2t")}
                                             for n in ("scene", "own")}))
    rows.append(("dense (eval features, torch fp32)", rerank_recall(feats, rel, None, 32)))
    for k in RERANK_KS:
        rows.append((f"parameter-free rerank, k={k}, lambda=1",
                     rerank_recall(feats, rel, CoAttentionScorer(dim).eval(), k)))
    for lam in LAMBDAS:
        if lam != 1.0:
            rows.append((f"parameter-free rerank, k=32, lambda={lam}",
                         rerank_recall(feats, rel, CoAttentionScorer(dim, lam=lam).eval(), 32)))
    for k in RERANK_KS:
        rows.append((f"trained reranker, k={k} (lambda {float(trained.lam.detach()):.2f})",
                     rerank_recall(feats, rel, trained, k)))
    log("rerank sweeps done")
    binding = binding_accuracy(encoder, scenes, pairs, feats,
                               {"dense": None, "parameter-free": CoAttentionScorer(dim).eval(), "trained": trained})
    draft = _vectors(encoder, pairs.images)
    full = _vectors(encoder, pairs.images, full=True)
    rows.append(("draft decode (index path), fp32", dense_recall(draft, feats.text_pooled, rel, feats.caption_image)))
    rows.append(("full decode, fp32", dense_recall(full, feats.text_pooled, rel, feats.caption_image)))
    cos = np.sum(draft * full, axis=1)
    log("decode done")

    test, test_scenes, test_specs = load_test(scenes, images)
    truth = SceneTruth(test_scenes, test_specs)
    product: dict[str, Any] = {}
    for name, home, backend in (("fp32", homes["fp32"], "torch"), ("fp32", homes["fp32"], "onnx"),
                                ("bf16", homes["bf16"], "torch"), ("int8", homes["int8"], "torch")):
        searcher = open_index(home, backend=backend)
        try:
            label = f"search: index {name}, queries on {backend}"
            product[label] = search_recall(searcher, truth, test)
            rows.append((label, product[label]))
            if name == "fp32" and backend == "torch":
                free = Reranker.open(searcher)
                for scorer_name, scorer in (("parameter-free", free.scorer),
                                            ("trained", load_scorer(reranker, dim, weights))):
                    rr = Reranker(searcher, scorer, free.images, free.texts)
                    label = f"search: index fp32, torch, {scorer_name} rerank k=32"
                    product[label] = search_recall(searcher, truth, test, reranker=rr)
                    rows.append((label, product[label]))
                vocab = prompt_vocabulary(searcher.encoder, home)
        finally:
            searcher.store.close()
    log("product path done")
    cutoff = _cutoff(encoder, vocab, scenes)
    log("cutoff done")

    return {"rows": dict(rows), "binding": binding, "cutoff": cutoff, "eval_cli": ev, "n_img": len(pairs.images),
            "n_cap": len(pairs.captions), "decode_cosine": {"mean": float(cos.mean()), "min": float(cos.min())}}


def _markdown(rows: list[tuple[str, dict[str, Any]]], binding: dict[str, Any], cutoff: dict[str, Any],
              large: list[dict[str, Any]], n_img: int, n_cap: int, a: argparse.Namespace, cos: dict[str, float],
              train_log: dict[str, Any], ev: dict[str, Any]) -> str:
    out = [f"Test split: {n_img} photos, {n_cap} captions; model trained {train_log.get('steps_done')} steps "
           f"(seed {a.seed}); R@1 / R@5 / R@10 in %.", "", recall_table(rows), ""]
    d, t = ev["dense"]["dense"], ev["trained"]["reranked"]
    out.append(f"`crossmodal eval --split test` (own image): dense t2i {d['t2i']['R@1']:.1f} / {d['t2i']['R@5']:.1f} / "
               f"{d['t2i']['R@10']:.1f}, trained rerank t2i {t['t2i']['R@1']:.1f} / {t['t2i']['R@5']:.1f} / "
               f"{t['t2i']['R@10']:.1f}. Draft vs full decode: cosine mean {cos['mean']:.5f}, min {cos['min']:.5f}.")
    out += ["", "| binding set | probe accuracy | chance | pairwise (true above one negative) |", "|---|---|---|---|"]
    out += [f"| {k} | {100 * v['accuracy']:.1f} | {100 * v['chance']:.1f} | {100 * v['pairwise']:.1f} |"
            for k, v in binding.items()]
    share = 100 * cutoff["relevant_share_test"]
    out += ["", f"Relevance cutoff (caption x photo pairs of the test split, {share:.1f}% relevant by scene; "
            "threshold fitted for F1 on val):", "",
            "| calibration | threshold | test precision | test recall | kept |", "|---|---|---|---|---|"]
    for r in cutoff["rows"]:
        for label, q in (("", r["test"]), (" at auto", r.get("test_auto"))):
            if q:
                out.append(f"| {r['calibration']}{label} | {q['threshold']:.2f} | {100 * q['precision']:.1f} | "
                           f"{100 * q['recall']:.1f} | {100 * q['kept']:.1f}% |")
    if large:
        out += ["", f"Large collection: the test split among {a.distractors:,} distractor scenes; tuned settings.", "",
                "| asked | photo index | caption index | t2i by scene | t2i own | t2i vs exact | t2i ms/query | "
                "i2t by scene | i2t own | i2t vs exact | i2t ms/query | build s |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]

        def short(r: dict[str, Any], modality: str) -> str:  # the factory and knob, not the tuned recalls
            return str((r["index"] or {}).get(modality, {}).get("describe", "?")).split(", recall@10")[0]

        for r in large:
            t2i, i2t = r["t2i"], r["i2t"]
            out.append(f"| {r['type']} | {short(r, 'image')} | {short(r, 'text')} | {fmt(t2i['scene'])} | "
                       f"{fmt(t2i['own'])} | {t2i['vs_exact']:.3f} | {t2i['ms']} | {fmt(i2t['scene'])} | "
                       f"{fmt(i2t['own'])} | {i2t['vs_exact']:.3f} | {i2t['ms']} | {r['build_s']} |")
    return "\n".join(out)
