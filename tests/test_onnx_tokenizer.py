"""The light tokenizer (no torch, no open_clip) gives open_clip's token ids, string for string."""

from __future__ import annotations

import os

import numpy as np
import pytest

from retrieval.model.bpe import BpeTokenizer, read_merges

open_clip = pytest.importorskip("open_clip")

BPE = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")

FIXED = [
    "", " ", "a", "a dog", "A Dog RUNNING on the beach!!", "  lots   of\twhite\nspace\r\n ",
    "café crème brûlée", "naïve façade Ångström", "日本語のテキスト", "中文 文本", "한국어",
    "Ελληνικά Русский עברית العربية",
    "emoji 🐶🏖️👩‍👩‍👧 test", "Tom &amp; Jerry &lt;b&gt; &amp;amp;lt;", "AT&T 5 & 6", "mojibake: cafÃ© â€œquotedâ€\x9d",
    "ﬁne ﬂow ligatures", "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ", "\x00\x01\x1bcontrol\x7f chars", "vertical\x0btab\x0cfeed",
    "<start_of_text>hi<end_of_text>", "1234567890 3.14 1e-5 #42 @user", "“curly” ‘quotes’ — dashes…",
    "don't won't they're I'll we've you'd it's", "UPPER lower MiXeD", "snake_case kebab-case CamelCase",
    "x" * 500, " ".join(["word"] * 100), "a photo of a tench, Tinca tinca.", "\u200bzero\u200dwidth",
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789 .,;:!?'\"-_&#()[]") + list(
        "éüñçåøßœæ日本語中文한국Ωλπд🐶🌊✓€£\t\n")
    return ["".join(rng.choice(alphabet, size=int(rng.integers(0, 120)))) for _ in range(n)]


@pytest.fixture(scope="module")
def pair():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(), BpeTokenizer(BPE)


def test_vocabulary_and_merges_equal(pair) -> None:
    ref, light = pair
    assert light.encoder == ref.encoder
    assert light.bpe_ranks == {f"{a} {b}": r for (a, b), r in ref.bpe_ranks.items()}
    assert len(read_merges(BPE)) == 48894
    assert (light.sot_token_id, light.eot_token_id) == (ref.sot_token_id, ref.eot_token_id)


def test_fixed_strings_equal_open_clip(pair) -> None:
    ref, light = pair
    got = light(FIXED)
    assert got.dtype == np.int64 and got.shape == (len(FIXED), 77)
    np.testing.assert_array_equal(got, ref(FIXED).numpy())
    assert light("")[0, :3].tolist() == [light.sot_token_id, light.eot_token_id, 0]


def test_long_texts_truncate_to_context_with_end_token(pair) -> None:
    ref, light = pair
    texts = ["word " * 200, "日本語" * 100]
    got = light(texts)
    np.testing.assert_array_equal(got, ref(texts).numpy())
    assert (got[:, -1] == light.eot_token_id).all()
    np.testing.assert_array_equal(light(texts, context_length=16), ref(texts, context_length=16).numpy())


def test_random_strings_equal_open_clip(pair) -> None:
    ref, light = pair
    texts = _random_texts(400)
    np.testing.assert_array_equal(light(texts), ref(texts).numpy())


def test_imagenet_prompts_equal_open_clip(pair) -> None:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, SIMPLE_IMAGENET_TEMPLATES

    ref, light = pair
    prompts = [t(c) for c in IMAGENET_CLASSNAMES[::5] for t in SIMPLE_IMAGENET_TEMPLATES[:3]]
    np.testing.assert_array_equal(light(prompts), ref(prompts).numpy())


@pytest.mark.parametrize("mode", ["whitespace", "canonicalize"])
def test_other_clean_modes_equal_open_clip(mode: str) -> None:
    from open_clip.tokenizer import SimpleTokenizer

    texts = FIXED + _random_texts(100, seed=1)
    np.testing.assert_array_equal(BpeTokenizer(BPE, clean=mode)(texts), SimpleTokenizer(clean=mode)(texts).numpy())
