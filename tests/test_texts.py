"""Caption corpora: every format, column/field choice, dedupe, clear errors."""

from __future__ import annotations

import json

import pytest

from indexer.texts import add_corpus, read_corpus
from retrieval.errors import CorpusError, InputNotFound
from retrieval.store import Store


def test_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first\n\n  second  \nfirst\n")
    assert read_corpus(tmp_path / "a.txt") == [(1, "first"), (3, "second"), (4, "first")]
    (tmp_path / "b.csv").write_text('id,caption,x\n1,"a, quoted caption",y\n2,,z\n3,plain,w\n')
    assert read_corpus(tmp_path / "b.csv") == [(1, "a, quoted caption"), (3, "plain")]
    assert read_corpus(tmp_path / "b.csv", column="x") == [(1, "y"), (2, "z"), (3, "w")]
    (tmp_path / "c.tsv").write_text("alt\tother\nline one\t1\nline two\t2\n")
    assert read_corpus(tmp_path / "c.tsv", column="alt") == [(1, "line one"), (2, "line two")]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"text": "j1", "n": 1}, {"text": "j2"}, "a bare string"]) + "\n")
    assert read_corpus(tmp_path / "d.jsonl") == [(1, "j1"), (2, "j2"), (3, "a bare string")]
    (tmp_path / "bom.txt").write_bytes("\ufeffwith bom\n".encode())
    assert read_corpus(tmp_path / "bom.txt") == [(1, "with bom")]


@pytest.mark.parametrize("name,content,kw,match", [
    ("x.csv", "a,b\n1,2\n", {}, "say which column"),
    ("x.csv", "caption\nhi\n", {"column": "text"}, "no column 'text'"),
    ("x.jsonl", '{"a": 1}\nnot json\n', {"field": "a"}, "line 2 is not valid JSON"),
    ("x.jsonl", '{"caption": "a"}\n{"other": 1}\n', {}, "line 2 has no field 'caption'"),
    ("x.json", "[]", {}, "unsupported caption file type"),
    ("x.txt", b"\xff\xfe\xfa", {}, "not UTF-8"),
])
def test_errors(tmp_path, name, content, kw, match):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CorpusError, match=match):
        read_corpus(p, **kw)


def test_missing_file(tmp_path):
    with pytest.raises(InputNotFound):
        read_corpus(tmp_path / "nope.txt")


def test_dedupe_within_corpus_and_readd(tmp_path, encoder):
    (tmp_path / "c.txt").write_text("one\ntwo\none\nthree\n")
    with Store.open(tmp_path / "home", create=True, writable=True) as s:
        s.bind_model(encoder.fingerprint)
        r = add_corpus(s, encoder, tmp_path / "c.txt", corpus="c")
        assert (r.added, r.duplicates) == (3, 1)
        r = add_corpus(s, encoder, tmp_path / "c.txt", corpus="c")
        assert (r.added, r.duplicates) == (0, 4)
        r = add_corpus(s, encoder, tmp_path / "c.txt", corpus="other")  # corpora are independent
        assert r.added == 3
        assert s.corpora() == {"c": 3, "other": 3}
        with pytest.raises(CorpusError):
            add_corpus(s, encoder, tmp_path / "c.txt", corpus="builtin:imagenet")
