"""The relevance cutoff and date sort (retrieval/query/cutoff.py): the calibration against a numpy oracle,
`--min-score` / `--sort` on `search` and `caption` (kept set, hidden count, order), and bad values refused.

Random weights make relevance meaningless, so these check mechanics; what the cutoff is worth (precision and
recall on the scene lab) is measured by bench/quality_lab.py and tests/test_quality_lab.py.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from retrieval.errors import UserError
from retrieval.query.cutoff import AUTO_MIN_SCORE, parse_min_score, sort_hits, split_by, vocab_z
from retrieval.query.search import Hit
from retrieval.store import ItemView, Store
from tests.helpers import GOOD, run_cli

TORCH = {"CROSSMODAL_BACKEND": "torch"}
TEXT = "a dog running on a beach"


def ok(r):  # noqa: ANN001, ANN201
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def home(built_index: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("cutoff") / "home"
    shutil.copytree(built_index, dst)
    return dst


def test_parse_min_score() -> None:
    assert parse_min_score(None) is None and parse_min_score("auto") == AUTO_MIN_SCORE
    assert parse_min_score(" AUTO ") == AUTO_MIN_SCORE and parse_min_score("-0.5") == -0.5
    for bad in ("high", "nan", "inf", "1,5"):
        with pytest.raises(UserError, match="--min-score"):
            parse_min_score(bad)


def test_vocab_z_is_the_photo_calibrated_z_score() -> None:
    rng = np.random.default_rng(0)
    vocab = rng.normal(size=(50, 8)).astype(np.float32)
    images = rng.normal(size=(4, 8)).astype(np.float32)
    scores = rng.normal(size=4).astype(np.float32)
    want = [(s - (vocab @ x).mean()) / (vocab @ x).std() for s, x in zip(scores, images, strict=True)]
    assert vocab_z(scores, images, vocab) == pytest.approx(want, rel=1e-5)


def _hit(i: int, relevance: float | None, taken: str | None = None) -> Hit:
    item = ItemView(i, "image", f"/nowhere/{i}.jpg", None, None, None, 1, 1, taken, 1, None, None, None, None, None)
    return Hit(rank=i, id=i, score=1.0 - i / 10, item=item, dense_rank=i, dense_score=0.5, relevance=relevance)


def test_split_and_date_sort() -> None:
    hits = [_hit(1, 2.0, "2020-01-01T00:00:00"), _hit(2, 0.5), _hit(3, None, "2024-05-01T00:00:00"),
            _hit(4, 1.0, "2023-01-01T00:00:00")]
    kept, weaker = split_by(hits, 1.0)
    assert [h.id for h in kept] == [1, 3, 4] and [h.id for h in weaker] == [2]  # None: not calibrated, kept
    assert split_by(hits, None) == (hits, [])
    by_date = sort_hits(kept, "date")
    assert [h.id for h in by_date] == [3, 4, 1] and [h.rank for h in by_date] == [1, 2, 3]
    assert [h.id for h in sort_hits(kept, "score")] == [1, 3, 4]
    assert [h.id for h in sort_hits([_hit(5, 1.0), *kept], "date")][-1] == 5  # no date, no file: last


def _relevance(home: Path, encoder, text: str, ids: list[int]) -> list[float]:  # noqa: ANN001
    """The oracle: z of each photo's cosine with the text against its cosines with the prompt vocabulary."""
    from retrieval.query.vocab import _zero_shot

    prompts = [f"a photo of a {c}." for c in _zero_shot(encoder)[0]]
    vocab = encoder.encode_texts(prompts)
    q = encoder.encode_texts([text])[0]
    with Store.open(home) as s:
        vec = np.stack([s.vector("image", i) for i in ids])
    base = vec @ vocab.T
    return list((vec @ q - base.mean(1)) / base.std(1))


@pytest.mark.slow
@pytest.mark.subprocess
def test_search_min_score_keeps_what_the_oracle_keeps_and_says_how_many_it_hid(home: Path, encoder) -> None:
    everything = ok(run_cli("search", TEXT, "-k", str(GOOD), "--json", "--min-score", "-1e9", home=home, env=TORCH))
    dense = ok(run_cli("search", TEXT, "-k", str(GOOD), "--json", home=home, env=TORCH))
    assert [h["id"] for h in everything] == [h["id"] for h in dense]
    assert "relevance" not in dense[0] and all(isinstance(h["relevance"], float) for h in everything)
    want = _relevance(home, encoder, TEXT, [h["id"] for h in everything])
    assert [h["relevance"] for h in everything] == pytest.approx(want, abs=2e-3)
    cut = float(np.median(want))
    r = run_cli("search", TEXT, "-k", str(GOOD), "--json", "--min-score", str(cut), home=home, env=TORCH)
    kept = ok(r)
    assert [h["id"] for h in kept] == [h["id"] for h, z in zip(everything, want, strict=True) if z >= cut]
    assert [h["rank"] for h in kept] == list(range(1, len(kept) + 1))
    hidden = len(everything) - len(kept)
    assert 0 < hidden < len(everything) and f"{hidden} weaker matches hidden" in r.stderr
    table = run_cli("search", TEXT, "-k", str(GOOD), "--min-score", str(cut), home=home, env=TORCH)
    assert table.returncode == 0 and "relevance" in table.stdout
    auto = ok(run_cli("search", TEXT, "-k", str(GOOD), "--json", "--min-score", "auto", home=home, env=TORCH))
    assert [h["id"] for h in auto] == [h["id"] for h, z in zip(everything, want, strict=True) if z >= AUTO_MIN_SCORE]


@pytest.mark.slow
@pytest.mark.subprocess
def test_sort_date_orders_the_kept_results_newest_first(home: Path) -> None:
    by_score = ok(run_cli("search", TEXT, "-k", str(GOOD), "--json", home=home, env=TORCH))
    by_date = ok(run_cli("search", TEXT, "-k", str(GOOD), "--json", "--sort", "date", home=home, env=TORCH))
    assert sorted(h["id"] for h in by_date) == sorted(h["id"] for h in by_score)
    with Store.open(home) as s:
        items = s.items(h["id"] for h in by_date)

    def when(i: int) -> float:
        from retrieval.store.records import date_bound

        taken = items[i].taken_at
        return date_bound(taken)[1] if taken else Path(items[i].path or "").stat().st_mtime

    times = [when(h["id"]) for h in by_date]
    assert times == sorted(times, reverse=True) and [h["rank"] for h in by_date] == list(range(1, GOOD + 1))


@pytest.mark.slow
@pytest.mark.subprocess
def test_caption_min_score_and_image_queries(home: Path, photos: dict[str, Path]) -> None:
    img = str(photos["img02"])
    everything = ok(run_cli("caption", img, "-k", "8", "--corpus", "alpha", "--json", "--min-score", "-1e9",
                            home=home, env=TORCH))
    z = [h["relevance"] for h in everything]
    assert len(z) == 8 and all(math.isfinite(v) for v in z)
    cut = float(np.median(z))
    kept = ok(run_cli("caption", img, "-k", "8", "--corpus", "alpha", "--json", "--min-score", str(cut),
                      home=home, env=TORCH))
    assert [h["id"] for h in kept] == [h["id"] for h in everything if h["relevance"] >= cut]
    r = run_cli("search", "--image", img, "-k", "4", "--json", "--min-score", "auto", home=home, env=TORCH)
    assert len(ok(r)) == 4 and "not applied" in r.stderr  # image-only: nothing to calibrate, nothing hidden


@pytest.mark.subprocess
@pytest.mark.parametrize("args", [("search", "x", "--min-score", "lots"), ("search", "x", "--sort", "name"),
                                  ("caption", "nowhere.jpg", "--min-score", "nan")])
def test_bad_values_are_one_line_and_exit_2(home: Path, args: tuple[str, ...]) -> None:
    r = run_cli(*args, home=home)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
