"""Hostile input at the command line (issue 13): markup and terminal escapes in captions and names, date
filters that compared as text, `remove ""`, runaway CSV quotes, JSON objects as captions, endless files, and
`crossmodal ui` outliving a SIGTERM.

Most run in-process through typer's CliRunner (the same code path as the console script, minus the process);
only the SIGTERM test needs a child process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from retrieval.errors import CorpusError, UserError
from retrieval.store import Store
from tests.helpers import GOOD, free_port, start_cli
from tests.helpers import cli_in_process as cli

pytestmark = pytest.mark.usefixtures("cli_state")

HOSTILE = ["[/b] closes nothing", "[red]kept in brackets[/red]", "clear \x1b[2J screen", "title \x1b]0;pwned\x07",
           "bidi \u202eexe.txt", "c1 \x9b31m"]
RAW_CONTROLS = ("\x1b", "\x07", "\u202e", "\x9b")


def user_error(r, *needles: str) -> str:  # noqa: ANN001
    """Exit 2, exactly one line on stderr (holding each needle), no traceback."""
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr, r.exception)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.output, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def images(home: Path) -> int:
    with Store.open(home) as store:
        return store.count("image")


@pytest.fixture
def own_home(built_index: Path, tmp_path: Path) -> Path:
    """A private copy of the built index (images + corpora alpha, beta), free to change."""
    dst = tmp_path / "home"
    shutil.copytree(built_index, dst, ignore=shutil.ignore_patterns("index.lock", "*-shm", "*-wal"))
    return dst


@pytest.fixture
def hostile_home(home: Path, tmp_path: Path, encoder) -> tuple[Path, str]:  # noqa: ANN001
    """A copy of the ONNX-exported index with a corpus whose name and captions carry markup and escapes."""
    from indexer.texts import add_corpus

    dst = tmp_path / "home"
    shutil.copytree(home, dst, ignore=shutil.ignore_patterns("index.lock", "*-shm", "*-wal", "vocab"))
    caps = tmp_path / "hostile.jsonl"
    caps.write_text("\n".join(json.dumps(t) for t in HOSTILE) + "\n")
    name = "[bold]x\x1b[31m"
    with Store.open(dst, writable=True) as store:
        add_corpus(store, encoder, caps, corpus=name)
    return dst, name


# ---- 2: markup and control characters in tables and stderr lines --------------------------------------
def test_tables_show_markup_literally_and_controls_visibly(hostile_home: tuple[Path, str], photos) -> None:
    home, corpus = hostile_home
    r = cli("caption", str(photos["img01"]), "--corpus", corpus, "-k", str(len(HOSTILE)), "--no-rerank",
            home=home)
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    out = r.stdout
    assert not any(c in out for c in RAW_CONTROLS), repr(out)
    for needle in ("[/b] closes nothing", "[red]kept in brackets[/red]", "clear \\x1b[2J screen",
                   "\\x1b]0;pwned\\x07", "bidi \\u202eexe.txt", "c1 \\x9b31m"):
        assert needle in out, (needle, out)
    assert "[bold]x\\x1b[31m" in out  # the corpus column

    r = cli("info", home=home)
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    assert "corpus [bold]x\\x1b[31m" in r.stdout and "\x1b" not in r.stdout

    # JSON keeps the exact text
    r = cli("caption", str(photos["img01"]), "--corpus", corpus, "-k", str(len(HOSTILE)), "--no-rerank", "--json",
            home=home)
    assert r.exit_code == 0, r.stderr
    hits = json.loads(r.stdout)
    assert sorted(h["text"] for h in hits) == sorted(HOSTILE)
    assert {h["corpus"] for h in hits} == {corpus}


def test_error_lines_escape_user_text(home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "no\x1b[2Jsuch\u202e.jpg"
    line = user_error(cli("search", "--image", str(bad), home=home), "no such file", "\\x1b[2J", "\\u202e")
    assert not any(c in line for c in RAW_CONTROLS)


# ---- 5: dates are parsed, never compared as text -------------------------------------------------------
@pytest.mark.parametrize("value", ["20230101", "2023-W01-1", "2023-06-15T12", "15/06/2023", "2023-02-30"])
def test_dates_in_other_forms_are_refused(home: Path, value: str) -> None:
    user_error(cli("search", "x", "--after", value, home=home), "not a date", "YYYY-MM-DD", "YYYY-MM-DDTHH:MM")
    user_error(cli("search", "x", "--before", value, home=home), "not a date")


def test_date_and_time_filters_compare_times(home: Path, photos) -> None:
    """The rotated photo's EXIF says 2021-06-15 10:30:00; every other photo has today's file time."""
    def paths(*flags: str) -> set[str]:
        r = cli("search", "x", "-k", "50", "--no-rerank", "--json", *flags, home=home)
        assert r.exit_code == 0, (r.stderr, r.exception)
        return {h["path"] for h in json.loads(r.stdout)}

    rotated = str(photos["rotated"])
    assert paths("--before", "2021-06-15 12:00") == {rotated}  # a space instead of 'T'
    assert paths("--before", "2021-06-15 10:30") == set()  # exclusive
    assert paths("--before", "2021-06-15T10:30:00.5") == {rotated}
    after = paths("--after", "2021-06-15 12:00")
    assert rotated not in after and len(after) == GOOD - 1
    assert rotated in paths("--after", "2021-06-15 10:30", "--before", "2021-06-16")  # inclusive


@pytest.fixture
def utc_plus_9(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time fixed to UTC+9 (a POSIX TZ string: no tz database needed), whatever the machine says."""
    monkeypatch.setenv("TZ", "XST-9")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_date_bound_is_local_time_in_the_stored_exif_form(utc_plus_9: None) -> None:
    from retrieval.store.records import date_bound

    noon = datetime(2021, 6, 15, 3, 0, tzinfo=timezone.utc).timestamp()  # 12:00 at UTC+9
    assert date_bound("2021-06-15 12:00") == ("2021-06-15T12:00:00", noon)
    assert date_bound("2021-06-15T12:00:00") == ("2021-06-15T12:00:00", noon)
    assert date_bound("2021-06-15") == ("2021-06-15T00:00:00", noon - 12 * 3600)
    # an offset is converted to local time, as cameras record it (EXIF dates carry none)
    assert date_bound("2021-06-15T05:00:00+02:00") == ("2021-06-15T12:00:00", noon)
    assert date_bound("2021-06-15T03:00Z") == ("2021-06-15T12:00:00", noon)
    for bad in ("20210615", "2021-W24-2", "2021-06-15T12", "2021-06-15T12:00+25:00", "٢٠٢١-06-15"):
        with pytest.raises(UserError, match="not a date"):
            date_bound(bad)


# ---- 6: remove refuses an empty path and asks before a large removal ----------------------------------
def test_remove_refuses_an_empty_path(own_home: Path, photos, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(photos["root"].parent)  # where `remove ""` used to drop everything below
    for empty in ("", "   "):
        user_error(cli("remove", empty, home=own_home), "empty path")
    user_error(cli("remove", str(photos["img01"]), "", home=own_home), "empty path")
    assert images(own_home) == GOOD


def test_remove_of_most_of_the_index_needs_yes(own_home: Path, photos) -> None:
    root = photos["root"]
    line = user_error(cli("remove", str(root), "--json", home=own_home),
                      f"would remove {GOOD} of the {GOOD} indexed images", "--yes")
    assert f"{root}: {GOOD - 4}" in line and f"{root / 'sub'}: 4" in line, line
    assert images(own_home) == GOOD
    r = cli("remove", str(root / "sub"), "--json", home=own_home)  # 4 of 11: not more than half
    assert r.exit_code == 0 and json.loads(r.stdout) == {"removed": 4}, r.stderr
    user_error(cli("remove", str(root), home=own_home), f"would remove {GOOD - 4} of the {GOOD - 4}")
    r = cli("remove", str(root), "--yes", "--json", home=own_home)
    assert r.exit_code == 0 and json.loads(r.stdout) == {"removed": GOOD - 4}, r.stderr
    assert images(own_home) == 0


def test_remove_of_more_than_a_thousand_images_needs_yes() -> None:
    from cli.index_cmds import _refuse_large_removal
    from retrieval.store import ItemView

    class Big:
        """A store of 100,000 images in 10 folders (only what the check reads)."""

        def count(self, modality: str) -> int:
            return 100_000

        def items(self, ids: set[int]) -> dict[int, ItemView]:
            return {i: ItemView(i, "image", f"/p/{i % 10}/{i}.jpg", None, None, None, 1, 1, None, 1) for i in ids}

    _refuse_large_removal(Big(), set(range(1000)))  # type: ignore[arg-type]
    with pytest.raises(UserError, match=r"1,001 of the 100,000 indexed images \(/p/\d: 101, .*, \.\.\.\)"):
        _refuse_large_removal(Big(), set(range(1001)))  # type: ignore[arg-type]


# ---- 17: caption files and query images that must not be read as asked ---------------------------------
def test_unclosed_csv_quote_is_refused_with_its_row(tmp_path: Path) -> None:
    from indexer.texts import read_corpus

    p = tmp_path / "caps.csv"
    p.write_text('id,caption\n1,fine\n2,"never closed\n3,swallowed\n4,"also swallowed"\n5,too\n')
    with pytest.raises(CorpusError, match=r"row 2 \(from line 3\).*unclosed quote"):
        read_corpus(p)
    p.write_text('id,caption\n1,"open\n' + "".join(f"{i},x\n" for i in range(2, 100)) + '100,y",\n101,z\n')
    with pytest.raises(CorpusError, match="row 1 runs from line 2 to line 101.*unclosed quote"):
        read_corpus(p)  # closed much later, next to a comma: only the length gives it away
    p.write_text('id,caption\n1,"a caption\nover two lines, with ""quotes"""\n\n2,next\n')
    assert read_corpus(p) == [(1, 'a caption\nover two lines, with "quotes"'), (2, "next")]  # still fine


@pytest.mark.parametrize("value,kind", [({"en": "a dog"}, "an object"), (["a", "dog"], "a list"),
                                        (True, "true/false")])
def test_jsonl_field_that_is_not_text_is_refused(tmp_path: Path, value: object, kind: str) -> None:
    from indexer.texts import read_corpus

    p = tmp_path / "caps.jsonl"
    p.write_text(json.dumps({"caption": "fine"}) + "\n" + json.dumps({"caption": value}) + "\n")
    with pytest.raises(CorpusError, match=f"line 2: field 'caption' holds {kind}, not text"):
        read_corpus(p)


def test_caption_files_and_query_images_are_read_up_to_a_cap(home: Path, photos, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from indexer import texts
    from retrieval.fsutil import read_bytes

    with pytest.raises(UserError, match="/dev/zero is larger than .* MB, the limit for a test"):
        read_bytes("/dev/zero", 4096, "a test")  # an endless file: at most cap+1 bytes are read
    assert read_bytes(photos["img01"], photos["img01"].stat().st_size) == photos["img01"].read_bytes()

    monkeypatch.setattr(texts, "MAX_CORPUS_BYTES", 100)
    (tmp_path / "big.txt").write_text("x\n" * 51)
    with pytest.raises(UserError, match="limit for a caption file"):
        texts.read_corpus(tmp_path / "big.txt")

    big = tmp_path / "huge.jpg"
    with open(big, "wb") as f:  # sparse: 50 MB + 1 byte without writing them
        f.truncate(50 * 2**20 + 1)
    user_error(cli("search", "--image", str(big), home=home), "larger than 50 MB", "query image")
    user_error(cli("caption", str(big), home=home), "larger than 50 MB")


# ---- `crossmodal ui` goes away with a SIGTERM --------------------------------------------------------
@pytest.mark.slow
@pytest.mark.subprocess
def test_ui_server_is_gone_after_sigterm(tmp_path: Path) -> None:
    port = free_port()
    with open(tmp_path / "server.log", "wb") as log:
        proc = start_cli("ui", "--port", str(port), home=tmp_path / "home", stdout=log, stderr=subprocess.STDOUT)
    group = proc.pid  # start_cli gives the CLI a session (and process group) of its own
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.3)
        os.kill(proc.pid, signal.SIGTERM)  # the CLI only, as a service manager or `kill PID` does
        proc.wait(30)
        deadline = time.monotonic() + 30
        while True:  # every process of the group (the server included) must be gone
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "the Streamlit server outlived `crossmodal ui`"
            time.sleep(0.2)
    finally:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
