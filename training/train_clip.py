"""Train a small CLIP from scratch on generated scenes, on CPU, in minutes: the relevance lab's model.

No pretrained weights reach the build machine, so this is how relevance gets measured at all. The model is
open_clip's own (`create_model` on a custom config, default `training/configs/scenes-vit-tiny.json`: 64 px,
8 px patches, a 4-layer ViT and a 3-layer text transformer of width 128 on CLIP's BPE tokenizer),
the loss open_clip's ClipLoss, the optimizer AdamW with warmup and cosine decay, logit_scale learned and
clamped at 100 as open_clip's trainer does. Images go through the project's decode path once (what
`crossmodal index` will feed the model); the only augmentation is a shift of a few pixels (flips and crops
would make "left of" or a count lie). Hard negatives: for a share of the batch, a binding-style edit of the
row's caption (colours or objects swapped, relation reversed, count off by one) joins the batch as an extra
text its image must rank below its true caption.

Writes OUT/model.json (the config), OUT/model.pt (a state_dict that `crossmodal index --model OUT/model.json
--pretrained OUT/model.pt` loads) and OUT/train_log.json (losses, val recalls under scene and own-image
relevance with chance levels, binding accuracy, wall time, seed, data digest). Same seed, data and options
-> the same weights on the same machine (given --steps: a --minutes budget makes the step count depend on
speed).

    python -m training.train_clip DATA_DIR OUT_DIR [--config cfg.json] [--steps N] [--minutes M] [--batch B]
        [--image-size S] [--seed 0] [--hard-negatives/--no-hard-negatives]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import UserError
from training.clip_data import SceneData, Split, check_folder, load_scenes, shift_batch
from training.clip_metrics import binding_report, binding_texts, retrieval_report, summary_line
from training.clip_model import (
    build_model,
    cosine_lr,
    count_params,
    embed,
    encode_texts,
    load_config,
    make_loss,
    make_optimizer,
    pixels_to_tensor,
    tokenize,
)

EventFn = Callable[[str, dict[str, Any]], None]
OUTPUTS = ("model.json", "model.pt", "train_log.json")
DEFAULT_STEPS = 800  # 14.8 minutes in all for the default config on 2 busy cores (0.96 steps/s)


@dataclass
class TrainConfig:
    """Options of one run (recorded whole in train_log.json)."""

    steps: int | None = None  # None: DEFAULT_STEPS, or as many as `minutes` allows
    minutes: float | None = None  # wall-clock budget: plans the steps when `steps` is None, else stops early
    batch: int = 128
    image_size: int | None = None  # None: the config's
    seed: int = 0
    hard_negatives: bool = True
    hard_share: float = 0.5  # share of batch rows that bring one hard negative text
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 100
    shift: int = 2  # max translation in px (the only augmentation)
    eval_every: int = 100
    log_every: int = 10
    threads: int = 2


def _check(cfg: TrainConfig) -> None:
    if cfg.steps is not None and cfg.steps < 1:
        raise UserError(f"--steps must be at least 1, not {cfg.steps}")
    if cfg.minutes is not None and not cfg.minutes > 0:
        raise UserError(f"--minutes must be positive, not {cfg.minutes}")
    if cfg.batch < 2:
        raise UserError(f"--batch must be at least 2 (contrastive loss needs negatives), not {cfg.batch}")
    if cfg.seed < 0 or cfg.threads < 1 or cfg.eval_every < 1 or cfg.log_every < 1 or cfg.shift < 0:
        raise UserError("--seed and --shift must be >= 0, threads and eval/log intervals >= 1")
    if not 0.0 <= cfg.hard_share <= 1.0:
        raise UserError(f"hard-negative share must be in 0..1, not {cfg.hard_share}")


def _check_out(out: Path) -> None:
    """OUT must be absent, empty, or an earlier output of this trainer (whose files are replaced at the end)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder")
    if out.is_dir() and any(p.name not in OUTPUTS and not p.name.endswith(".partial") for p in out.iterdir()):
        raise UserError(f"{out} holds other files than {', '.join(OUTPUTS)}; give an empty or new folder")


class Batches:
    """The seeded data order: shuffled epochs of train images (each at most once per batch), one of each image's
    captions, and for a share of rows one hard negative of that caption (left out when it equals a positive
    text of the batch)."""

    def __init__(self, train: Split, batch: int, seed: int, hard: bool, share: float, shift: int) -> None:
        self.train, self.batch, self.hard, self.share, self.shift = train, min(batch, len(train)), hard, share, shift
        self.rng = np.random.default_rng([seed, 7])
        self.own = train.image_captions()
        self.order: list[int] = []

    def next(self) -> tuple[np.ndarray, list[int], list[str]]:
        """(shifted pixels of B images, their caption indices, extra negative texts)."""
        if len(self.order) < self.batch:  # the epoch's remainder is dropped: an image twice in a batch would be
            self.order = [int(i) for i in self.rng.permutation(len(self.train))]  # its own negative
        rows, self.order = self.order[:self.batch], self.order[self.batch:]
        caps, wanted = [], []
        for i in rows:
            own = self.own[i]
            if self.hard and self.rng.random() < self.share:
                withneg = [int(c) for c in own if self.train.negatives[int(c)]]
                if withneg:
                    c = withneg[int(self.rng.integers(len(withneg)))]
                    negs = self.train.negatives[c]
                    caps.append(c)
                    wanted.append(negs[int(self.rng.integers(len(negs)))])
                    continue
            caps.append(int(own[int(self.rng.integers(len(own)))]))
        positives = {self.train.captions[c] for c in caps}
        extra = list(dict.fromkeys(t for t in wanted if t not in positives))
        return shift_batch(self.train.pixels[rows], self.rng, self.shift), caps, extra


class Evaluator:
    """Retrieval on splits (scene and own-image relevance, with chance) and binding-set accuracy, for a model
    as it trains; tokens and relevance are prepared once."""

    def __init__(self, tokenizer: Any, pre: Any, data: SceneData, splits: Sequence[str] = ("val", "test")) -> None:
        self.pre, self.data = pre, data
        self.splits = {n: (s, tokenize(tokenizer, s.captions)) for n in splits
                       if (s := data.splits.get(n)) is not None and len(s)}
        test = data.splits.get("test")
        self.binding = None
        if data.binding and test is not None and len(test):
            texts = binding_texts(data.binding)
            self.binding = (test, texts, tokenize(tokenizer, texts))

    def __call__(self, model: Any, splits: Sequence[str] = ("val",), binding: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in splits:
            if name in self.splits:
                s, tokens = self.splits[name]
                img, txt = embed(model, self.pre, s.pixels, tokens)
                out[name] = retrieval_report(img, txt, s.relevance(), s.caption_image)
        if binding and self.binding is not None:
            test, texts, tokens = self.binding
            img, txt = embed(model, self.pre, test.pixels, tokens)
            names = {Path(f).name: v for f, v in zip(test.files, img, strict=True)}
            out["binding"] = binding_report(names, dict(zip(texts, txt, strict=True)), self.data.binding)
        return out


def _save(model: Any, config: Any, log: dict[str, Any], out: Path) -> None:
    import torch

    out.mkdir(parents=True, exist_ok=True)

    def put(name: str, write: Callable[[Path], object]) -> None:
        tmp = out / f"{name}.partial"
        write(tmp)
        os.replace(tmp, out / name)

    put("model.json", lambda p: p.write_text(json.dumps(config.model_cfg(), indent=2) + "\n"))
    put("model.pt", lambda p: torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, p))
    put("train_log.json", lambda p: p.write_text(json.dumps(log, indent=1) + "\n"))


def _step(model: Any, opt: Any, loss_fn: Any, images: Any, texts: Any) -> float:
    """One optimizer step on a batch (B images, B matched texts then any hard negatives); returns the loss.
    logit_scale is clamped to [0, ln 100] afterwards, as open_clip's trainer does."""
    import torch
    import torch.nn.functional as F

    image_features = F.normalize(model.encode_image(images), dim=-1)
    text_features = F.normalize(encode_texts(model, texts), dim=-1)
    loss = loss_fn(image_features, text_features, model.logit_scale.exp())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return float(loss.detach())


def train(data_dir: str | Path, out_dir: str | Path, cfg: TrainConfig | None = None, config: str | Path | None = None,
          on_event: EventFn | None = None) -> dict[str, Any]:
    """Train, evaluate every `eval_every` steps and at the end, save under `out_dir`; returns the log.
    Events ("load", "step", "eval", "done") go to `on_event` with their figures."""
    cfg = cfg or TrainConfig()
    _check(cfg)
    emit = on_event or (lambda kind, info: None)
    out = Path(out_dir).expanduser()
    _check_out(out)
    check_folder(data_dir)
    model_config = load_config(config, cfg.image_size)  # all user errors before the heavy imports
    import open_clip
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        t0 = time.perf_counter()
        model, tokenizer, pre = build_model(model_config, cfg.seed)
        data = load_scenes(data_dir, pre, progress=lambda what, n, total: emit("load", {"done": n, "total": total}))
        train_split = data.splits["train"]
        cap_tokens = tokenize(tokenizer, train_split.captions)
        emit("load", {"seconds": time.perf_counter() - t0, "params": count_params(model), "digest": data.digest,
                      "images": {k: len(v) for k, v in data.splits.items()}})
        log: dict[str, Any] = {
            "version": 1, "data": str(Path(data_dir).expanduser().resolve()), "data_digest": data.digest,
            "seed": cfg.seed, "train_config": asdict(cfg), "model_config": model_config.model_cfg(),
            "model_name": model_config.name, "params": count_params(model), "preprocess": pre.to_json(),
            "images": {k: len(v) for k, v in data.splits.items()}, "torch": torch.__version__,
            "open_clip": open_clip.__version__, "history": [], "evals": []}
        loss_fn, opt = make_loss(), make_optimizer(model, cfg.lr, cfg.weight_decay)
        evaluate = Evaluator(tokenizer, pre, data)
        batches = Batches(train_split, cfg.batch, cfg.seed, cfg.hard_negatives, cfg.hard_share, cfg.shift)
        start = time.perf_counter()
        deadline = start + cfg.minutes * 60 if cfg.minutes else None

        eval_total = 0.0  # seconds spent evaluating, left out of the training speed

        def run_eval(step: int) -> float:
            nonlocal eval_total
            t = time.perf_counter()
            report = evaluate(model)
            entry = {"step": step, "elapsed_s": round(t - start, 2), **report}
            log["evals"].append(entry)
            emit("eval", entry)
            eval_total += time.perf_counter() - t
            return time.perf_counter() - t

        eval_s = run_eval(0)
        steps = cfg.steps or (DEFAULT_STEPS if deadline is None else None)
        step, stopped, losses, step_s = 0, "steps", [], 0.0
        model.train()
        while steps is None or step < steps:
            if deadline is not None and time.perf_counter() > deadline:
                stopped = "time"
                break
            if steps is None and step == 20:  # plan the rest of the time budget from the measured speed
                per_step = (time.perf_counter() - start - eval_total) / 20 + eval_s / cfg.eval_every
                left = deadline - time.perf_counter() - 2 * eval_s if deadline else 0.0
                steps = max(step + 1, step + int(left / per_step))
            lr = cosine_lr(step, cfg.lr, min(cfg.warmup, max(1, (steps or DEFAULT_STEPS) // 10)), steps or 10**9)
            for group in opt.param_groups:
                group["lr"] = lr
            pixels, caps, extra = batches.next()
            texts = cap_tokens[torch.tensor(caps)]
            if extra:
                texts = torch.cat([texts, tokenize(tokenizer, extra)])
            losses.append(_step(model, opt, loss_fn, pixels_to_tensor(pixels, pre), texts))
            step += 1
            if step % cfg.log_every == 0 or step == steps:
                step_s = time.perf_counter() - start
                entry = {"step": step, "loss": round(float(np.mean(losses)), 4), "lr": lr, "extra_texts": len(extra),
                         "logit_scale": round(float(model.logit_scale.detach().exp()), 3),
                         "elapsed_s": round(step_s, 2), "train_s": round(step_s - eval_total, 2)}
                losses = []
                log["history"].append(entry)
                emit("step", {**entry, "steps": steps})
            if step % cfg.eval_every == 0 and step != steps:
                eval_s = run_eval(step)
        train_s = time.perf_counter() - start - eval_total
        final = evaluate(model, splits=("val", "test"))
        log["final"] = {"step": step, **final}
        log["evals"].append({"step": step, "elapsed_s": round(time.perf_counter() - start, 2), "val": final.get("val"),
                             **({"binding": final["binding"]} if "binding" in final else {})})
        log.update(steps_planned=steps, steps_done=step, stopped=stopped, wall_s=round(time.perf_counter() - t0, 2),
                   train_s=round(train_s, 2), eval_s=round(eval_total, 2),
                   steps_per_s=round(step / max(train_s, 1e-9), 3), threads=torch.get_num_threads())
        _save(model, model_config, log, out)
        emit("done", {"step": step, "out": str(out), "wall_s": log["wall_s"], **final})
        return log
    finally:
        torch.set_num_threads(threads)


# ---- command line ----------------------------------------------------------------------------------
class _ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, not argparse's usage block
        raise _ArgError(message)


def _print_event(kind: str, info: dict[str, Any]) -> None:
    if kind == "load" and "params" in info:
        p = info["params"]
        print(f"loaded {info['images']} images in {info['seconds']:.1f} s; model {p['rest']:,} params + "
              f"{p['token_embedding']:,} token embedding; data {info['digest'][:12]}", flush=True)
    elif kind == "step":
        rate = info["step"] / max(info["train_s"], 1e-9)
        print(f"step {info['step']}/{info['steps'] or '?'} loss {info['loss']:.3f} lr {info['lr']:.2e} "
              f"scale {info['logit_scale']:.1f} ({rate:.2f} steps/s)", flush=True)
    elif kind in ("eval", "done"):
        head = f"eval step {info['step']}" if kind == "eval" else f"final step {info['step']}"
        for split in ("val", "test"):
            if split in info:
                print(f"{head}: {split} {summary_line(info[split])}", flush=True)
        if "binding" in info:
            b = info["binding"]
            print(f"{head}: binding {100 * b['accuracy']:.1f}% of {b['probes']} probes (chance "
                  f"{100 * b['chance']:.1f}%), pairwise {100 * b['pairwise']:.1f}%", flush=True)
        if kind == "done":
            print(f"saved {info['out']}/model.json, model.pt, train_log.json ({info['wall_s']:.0f} s)", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m training.train_clip DATA_DIR OUT_DIR ...`; user errors -> one line on stderr, exit 2."""
    ap = _Parser(prog="python -m training.train_clip", description="Train a small CLIP on generated scenes "
                 "(see the module docstring of training/train_clip.py).")
    ap.add_argument("data", help="a python -m training.scenes output folder")
    ap.add_argument("out", help="output folder: model.json, model.pt, train_log.json")
    ap.add_argument("--config", default=None, help="open_clip model config (default training/configs/"
                    "scenes-vit-tiny.json)")
    ap.add_argument("--steps", type=int, default=None, help=f"training steps (default {DEFAULT_STEPS}, or as "
                    "many as --minutes allows)")
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock budget (stops early; plans the steps "
                    "when --steps is not given)")
    ap.add_argument("--batch", type=int, default=128, help="image-caption pairs per step (default 128)")
    ap.add_argument("--image-size", type=int, default=None, help="model input side in px (default: the config's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of weights and data order (default 0)")
    ap.add_argument("--hard-negatives", action=argparse.BooleanOptionalAction, default=True,
                    help="add binding-style negative captions to the batch (default on)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    ap.add_argument("--eval-every", type=int, default=100, help="steps between val evaluations (default 100)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    try:
        a = ap.parse_args(argv)
        cfg = TrainConfig(steps=a.steps, minutes=a.minutes, batch=a.batch, image_size=a.image_size, seed=a.seed,
                          hard_negatives=a.hard_negatives, lr=a.lr, eval_every=a.eval_every, threads=a.threads)
        if not a.lr > 0:
            raise UserError(f"--lr must be positive, not {a.lr}")
        train(a.data, a.out, cfg, a.config, _print_event)
    except (_ArgError, UserError) as e:
        print(f"train_clip: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Before torch loads: OpenMP threads that spin-wait turn a busy machine's step from 0.1 s into 1.5 s (measured
    # with 2 threads on 2 cores shared with other work); passive waiting keeps 2 threads useful.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
