"""The stdlib-sqlite3 catalog reader answers every read exactly as the SQLAlchemy Store does."""

from __future__ import annotations

import time

import numpy as np
import pytest

from retrieval.store import ImageFilter, ItemView, Store
from retrieval.store.reader import ITEM_FIELDS, CatalogReader


def _bound(text: str) -> tuple[str, float]:
    from datetime import datetime

    return (text if "T" in text else text + "T00:00:00"), datetime.fromisoformat(text).timestamp()


@pytest.fixture(scope="module")
def pair(built_index):
    store = Store.open(built_index)
    reader = CatalogReader(built_index / "catalog.sqlite")
    yield store, reader
    reader.close()
    store.close()


def test_item_fields_are_itemviews(pair) -> None:
    from dataclasses import fields

    assert tuple(f.name for f in fields(ItemView)) == ITEM_FIELDS


def test_meta_ids_and_rows_equal_the_store(pair) -> None:
    store, reader = pair
    with reader.snapshot():
        assert reader.meta() == store.meta and reader.has_catalog()
        assert reader.schema_version() == int(store.meta["schema_version"])
        for m in ("image", "text"):
            ids = reader.ids(m)
            assert len(ids) == store.count(m) > 0
            assert np.array_equal(np.sort(ids), np.sort(store.vectors(m)[0]))
    every = np.concatenate([reader.ids("image"), reader.ids("text"), [-1, 10**9]])
    want = store.items(every)
    got = {i: ItemView(*row) for i, row in reader.items(every).items()}
    assert got == want and len(got) == len(every) - 2
    assert reader.image_shas(every) == store.image_shas(every)
    assert reader.corpora() == store.corpora() == {"alpha": 30, "beta": 20}
    assert reader.skipped() == store.skipped() and len(reader.skipped()) == 3
    assert reader.cameras() == store.cameras()
    for corpus in ("alpha", "beta", "none"):
        assert np.array_equal(reader.text_ids(corpus), store.text_ids(corpus))


@pytest.mark.parametrize("flt", [
    ImageFilter(under="SUB"), ImageFilter(under="ROOT"), ImageFilter(under="ROOT/img01.png"),
    ImageFilter(after="2021-06-15"), ImageFilter(before="2021-06-16T00:00:00"), ImageFilter(after="2000-01-01"),
    ImageFilter(after="NOW"), ImageFilter(camera="pixel"), ImageFilter(under="ROOT", after="2000-01-01", before="NOW"),
])
def test_filters_equal_the_store(pair, photos, flt: ImageFilter) -> None:
    from dataclasses import replace

    store, reader = pair
    root = str(photos["root"])
    now = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() + 3600))
    sub = {"SUB": f"{root}/sub/", "ROOT": root, "ROOT/img01.png": str(photos["img01"]), "NOW": now}
    flt = replace(flt, **{k: sub.get(getattr(flt, k), getattr(flt, k)) for k in ("under", "after", "before")})
    want = store.image_ids(flt)
    got = reader.image_ids(under=flt.under, camera=flt.camera, after=_bound(flt.after) if flt.after else None,
                           before=_bound(flt.before) if flt.before else None)
    assert np.array_equal(got, want)
