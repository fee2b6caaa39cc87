"""CLIP's byte-level BPE tokenizer without torch: the same token ids as open_clip's SimpleTokenizer.

open_clip's tokenizer is pure Python, but importing open_clip imports torch (seconds); the query path must
not. This is the same algorithm (OpenAI CLIP, MIT licence, as vendored by open_clip) reading the same BPE
merges file, returning numpy int64 ids. ftfy, which only matters for text that is not plain ASCII, is
imported on first need.

CLIP reads 77 tokens, but BPE's merge loop is quadratic in the length of one word (a 100 KB query without
spaces took a minute). `cap_text` cuts what can never reach the context before any of that runs: the text
to CHARS_PER_TOKEN characters per context position, and every run of letters (or of other symbols, which
BPE also takes whole) to BYTES_PER_TOKEN characters per position, the most one token can cover, so a capped
run still fills the context. The torch path applies the same caps before open_clip's tokenizer, so both
give the ids open_clip gives for the capped text, and the same as for the uncut text whenever its first 77
tokens lie inside the caps (every text but pathological ones).
"""

from __future__ import annotations

import html
import string
import zlib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import regex

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes x2 (plain, word-final), merges, 2 special tokens
CLEAN_MODES = ("lower", "whitespace", "canonicalize")
_PLAIN = frozenset(string.printable) - {"&", "\x0b", "\x0c"}
_PUNCTUATION = str.maketrans("", "", string.punctuation)
BYTES_PER_TOKEN = 32  # the longest token of CLIP's vocabulary covers 32 bytes (eight 4-byte emoji)
CHARS_PER_TOKEN = 64  # text kept per context position: room for whitespace, markup and long tokens
_RUN = r"[\p{L}]{%d}[\p{L}]+|[^\s\p{L}\p{N}]{%d}[^\s\p{L}\p{N}]+"  # what BPE merges as one word


@lru_cache
def _long_run(chars: int) -> regex.Pattern[str]:
    return regex.compile(_RUN % (chars, chars))


def cap_text(text: str, context_length: int = 77) -> str:
    """`text` cut to what can reach a context of `context_length` tokens (see the module doc): at most
    CHARS_PER_TOKEN * context_length characters, each run BPE takes as one word at most BYTES_PER_TOKEN *
    (context_length - 1) characters (which make that many tokens or more). Short texts come back unchanged."""
    text = text[:CHARS_PER_TOKEN * context_length]
    run = BYTES_PER_TOKEN * max(1, context_length - 1)
    if len(text) <= run:
        return text
    return str(_long_run(run).sub(lambda m: m.group()[:run], text))


def cap_texts(texts: Sequence[str], context_length: int = 77) -> list[str]:
    return [cap_text(t, context_length) for t in texts]


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """Reversible byte -> printable unicode map, so BPE never sees whitespace or control bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _basic_clean(text: str) -> str:
    if not all(c in _PLAIN for c in text):
        # ftfy (and entity unescaping) can only change text with non-ASCII, control characters or '&'.
        import ftfy

        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text))
    return text.strip()


def _whitespace_clean(text: str) -> str:
    return " ".join(text.split()).strip()


def _canonicalize(text: str) -> str:
    text = text.replace("_", " ").translate(_PUNCTUATION).lower()
    return " ".join(text.split()).strip()


def clean(text: str, mode: str = "lower") -> str:
    """open_clip's clean functions: 'lower' (default), 'whitespace' and 'canonicalize'."""
    if mode == "lower":
        return _whitespace_clean(_basic_clean(text)).lower()
    if mode == "whitespace":
        return _whitespace_clean(_basic_clean(text))
    if mode == "canonicalize":
        return _canonicalize(_basic_clean(text))
    raise ValueError(f"unknown clean mode {mode!r} (choose from {', '.join(CLEAN_MODES)})")


def read_merges(path: str | Path, count: int = MERGES) -> list[str]:
    """The first `count` merge rules of the gzipped BPE file, decompressing only as far as they go."""
    raw = Path(path).read_bytes()
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    chunks: list[bytes] = []
    lines = pos = 0
    while lines <= count and pos < len(raw):
        chunk = inflate.decompress(raw[pos:pos + 65536])
        pos += 65536
        chunks.append(chunk)
        lines += chunk.count(b"\n")
    return b"".join(chunks).decode("utf-8").split("\n", count + 1)[1:count + 1]  # line 0 is a header


class BpeTokenizer:
    """Texts -> (n, context_length) int64 token ids: start token, BPE ids, end token, zero padding.

    Texts longer than the context are truncated and end with the end token, as open_clip does; input that
    cannot reach the context is cut first (`cap_text`), so no text takes long.
    """

    def __init__(self, bpe_path: str | Path, context_length: int = 77, clean: str = "lower",
                 additional_special_tokens: Sequence[str] = ()) -> None:
        if clean not in CLEAN_MODES:
            raise ValueError(f"unknown clean mode {clean!r}")
        self.byte_encoder = bytes_to_unicode()
        merges = read_merges(bpe_path)  # "first second" lines, in rank order
        base = list(self.byte_encoder.values())
        vocab = base + [v + "</w>" for v in base] + [m.replace(" ", "") for m in merges]
        special = ["<start_of_text>", "<end_of_text>", *additional_special_tokens]
        vocab.extend(special)
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.bpe_ranks = dict(zip(merges, range(len(merges)), strict=True))
        self.cache = {t: t for t in special}
        self.pat = regex.compile("|".join(special) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                 regex.IGNORECASE)
        self.sot_token_id = self.encoder["<start_of_text>"]
        self.eot_token_id = self.encoder["<end_of_text>"]
        self.vocab_size = len(self.encoder)
        self.context_length = context_length
        self.clean_mode = clean

    def bpe(self, token: str) -> str:
        """Merge the characters of one pre-token by rank until no known pair is left."""
        cached = self.cache.get(token)
        if cached is not None:
            return cached
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _pairs(word)
        if not pairs:
            return token + "</w>"
        ranks = self.bpe_ranks
        inf = float("inf")
        while True:
            bigram = min(pairs, key=lambda p: ranks.get(f"{p[0]} {p[1]}", inf))
            if f"{bigram[0]} {bigram[1]}" not in ranks:
                break
            first, second = bigram
            new_word: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        """One text -> BPE ids, without start and end tokens."""
        ids: list[int] = []
        for token in self.pat.findall(clean(text, self.clean_mode)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        out = np.zeros((len(texts), n), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(cap_text(text, n)), self.eot_token_id]
            if len(ids) > n:
                ids = ids[:n]
                ids[-1] = self.eot_token_id
            out[row, :len(ids)] = ids
        return out


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(zip(word[:-1], word[1:], strict=True))
