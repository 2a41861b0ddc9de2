"""Text tokenizers that need only numpy and the standard library.

`ClipTokenizer` is the byte-level BPE tokenizer of OpenAI CLIP (and open_clip's
`SimpleTokenizer`, Long-CLIP, ...), written from scratch so that the runtime
needs neither torch, ftfy nor the third-party `regex` package.  Its ids equal
the reference's for every text except (a) text that ftfy's heuristic mojibake
repair would rewrite (see the comment above `_ftfy_lite`) and (b) literal
special-token strings such as "<|endoftext|>", which we always tokenize as
plain text (see the comment above `_clip_pattern`).

`HFTokenizer` wraps a Hugging Face `tokenizer.json` (SigLIP and friends) with
the same call signature and padding / truncation rules; it needs the optional
`tokenizers` package, imported only when one is built.

    >>> tokenize(["a photo of a cat", "a dog"]).shape
    (2, 77)
"""
from __future__ import annotations

import gzip
import heapq
import html
import html.entities
import json
import re
import threading
import unicodedata
import warnings
import zlib
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import InputError, TextTooLongError, TokenizerError

__all__ = [
    "ClipTokenizer",
    "HFTokenizer",
    "check_token_ids",
    "load_tokenizer",
    "tokenize",
    "trim",
    "MAX_WORD_BYTES",
    "DEFAULT_CONTEXT_LENGTH",
    "TOKENIZER_KINDS",
]

DEFAULT_CONTEXT_LENGTH = 77
TOKENIZER_KINDS = ("clip_bpe", "hf")

_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# The reference keeps lines 1 .. 49152-256-2 of the vocabulary file as merges.
_N_MERGES = 49152 - 256 - 2
_SOT = "<|startoftext|>"
_EOT = "<|endoftext|>"
_CACHE_LIMIT = 200_000  # words; the BPE cache is cleared when it grows past this
_CACHE_WORD_CHARS = 64  # only words up to this long are cached (captions' words are short)
# One pre-token (a run of letters, or of punctuation/symbols) longer than this many UTF-8
# bytes raises TextTooLongError, with or without truncate: CLIP's longest vocabulary entry
# is 16 bytes, so 77 tokens never need more than ~1.2 kB of one word, and BPE of such a word
# stays well under 0.1 s.  A word past the bound is hostile or garbage (base64, Zalgo text).
MAX_WORD_BYTES = 16_384
# With truncate=False, ids are counted up to this many so the error can give the exact
# length of an over-long text; past it the message says "more than".
_COUNT_LIMIT = 1024


# --------------------------------------------------------------------------- helpers


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_text_list(texts) -> list[str]:
    """str | list/tuple of str -> list of str, else InputError."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (list, tuple)):
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InputError(
                    f"texts[{i}] is a {type(t).__name__}, expected str. "
                    "Pass a string or a list of strings."
                )
        return list(texts)
    raise InputError(
        f"texts must be a string or a list of strings, got {type(texts).__name__}. "
        "Wrap a single text as a str, or convert other containers with list(...)."
    )


def _check_context_length(context_length) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)):
        raise InputError(
            f"context_length must be a positive int, got {context_length!r} "
            f"({type(context_length).__name__})."
        )
    if context_length < 1:
        raise InputError(f"context_length must be a positive int, got {context_length}.")
    return int(context_length)


def _too_long_error(
    texts: Sequence[str], lengths: Sequence[int], bad: list[int], L: int, counted: int | None = None
) -> TextTooLongError:
    """`counted`: lengths were counted only up to this many (then the text has "more than")."""
    i = bad[0]
    more = f" ({len(bad)} of {len(texts)} texts are too long; this is texts[{i}])" if len(bad) > 1 else ""
    n = f"more than {counted - 1}" if counted is not None and lengths[i] >= counted else str(lengths[i])
    return TextTooLongError(
        f"Text {_shorten(texts[i])!r} has {n} tokens (including the start/end tokens), "
        f"more than the context length {L}{more}. Shorten it, or pass truncate=True to cut it "
        f"to {L} tokens keeping the end token."
    )


def _warn_truncated(n: int, total: int, L: int) -> None:
    warnings.warn(
        f"{n} of {total} text{'s' if total != 1 else ''} exceeded the context length {L} "
        f"and {'was' if n == 1 else 'were'} truncated to {L} tokens (end token kept).",
        UserWarning,
        stacklevel=3,
    )


def check_token_ids(ids, vocab_size: int, context_length: int) -> np.ndarray:
    """Check pre-made token ids before they reach a text graph; return them as int64.

    `ids` must be a 2-D integer array (N >= 1 rows, 1 <= L <= context_length columns) of
    ids in [0, vocab_size).  A negative id would silently wrap around in the embedding
    Gather (row -1 is the last vocabulary entry) and one >= vocab_size reads out of range,
    so both raise InputError naming the value and its [row, column].
    """
    if not isinstance(ids, np.ndarray):
        raise InputError(
            f"token ids must be a numpy integer array of shape (N, L), got a {type(ids).__name__}; "
            "tokenize texts with tokenize(texts) or pass np.asarray(ids, dtype=np.int64)."
        )
    if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(
            f"token ids must have an integer dtype, got {ids.dtype}; pass ids.astype(np.int64) "
            "only if the values are whole numbers, or tokenize the texts."
        )
    if ids.ndim != 2:
        raise InputError(
            f"token ids must be 2-D (N texts, L positions), got shape {ids.shape}; "
            "wrap one row as ids[None, :]."
        )
    n, length = ids.shape
    if n < 1:
        raise InputError(f"token ids have no rows (shape {ids.shape}); pass at least one text.")
    if not 1 <= length <= context_length:
        raise InputError(
            f"token ids have {length} positions per row, the model takes 1 to {context_length}; "
            "tokenize(texts, truncate=True) cuts longer texts to the context."
        )
    bad = np.argwhere((ids < 0) | (ids >= vocab_size))
    if bad.size:
        r, c = (int(v) for v in bad[0])
        raise InputError(
            f"token id {int(ids[r, c])} at [{r}, {c}] is outside the vocabulary [0, {vocab_size}) "
            f"({len(bad)} bad id{'s' if len(bad) > 1 else ''} in all); ids must come from this "
            "model's tokenizer."
        )
    return ids.astype(np.int64, copy=False)


# --------------------------------------------------------------------------- byte level


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode character table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# str.translate table: latin-1 char of a byte -> its byte-level unicode char
_BYTE_TRANSLATION = {b: c for b, c in bytes_to_unicode().items()}


def _byte_encode(token: str) -> str:
    return token.encode("utf-8").decode("latin-1").translate(_BYTE_TRANSLATION)


# --------------------------------------------------------------------------- text clean-up
#
# The reference runs `ftfy.fix_text` (defaults), then `html.unescape` twice, strips,
# collapses whitespace with str.split() and lower-cases with str.lower().  We do not
# depend on ftfy.  Instead `_ftfy_lite` reproduces the deterministic, table-driven part
# of ftfy 6's fix_text, in ftfy's order and repeated to a fixed point like ftfy:
#   * unescape_html="auto": HTML entities that end in ';' (plus the all-caps Latin ones
#     ftfy accepts) are decoded, unless the line -- or an earlier line -- contains '<';
#   * fix_c1_controls (U+0080..U+009F -> their Windows-1252 characters),
#     fix_latin_ligatures, fix_character_width (fullwidth/halfwidth forms, U+3000 -> ' '),
#     uncurl_quotes, fix_line_breaks, fix_surrogates, remove_terminal_escapes,
#     remove_control_chars;
#   * unicode NFC normalisation (ftfy's default normalization="NFC").
# What we do NOT reproduce is ftfy's heuristic mojibake repair (`fix_encoding`,
# restore_byte_a0, replace_lossy_sequences, decode_inconsistent_utf8): text such as
# "cafÃ©" that ftfy would guess to be mis-decoded UTF-8 is tokenized as written.
# For well-formed text this is identical to the reference.

_SINGLE_QUOTES = "\u02bc\u2018\u2019\u201a\u201b"
_DOUBLE_QUOTES = "\u201c\u201d\u201e\u201f"
_LIGATURES = {
    "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž",
    "ǆ": "dž", "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj",
    "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st",
}
_CONTROL_CHARS = [
    *range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F,
    *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD),
]
_ANSI_RE = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")
_HTML_ENTITY_RE = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_SURROGATE_PAIR_RE = re.compile("[\ud800-\udbff][\udc00-\udfff]")
# Characters that can make a fix-up step do something; text without any is left alone.
_FIXABLE_RE = re.compile(
    "[&\x00-\x08\x0b\x0d-\x1f\x7f-\x9f\u0132\u0133\u0149\u01c4-\u01cc\u01f1-\u01f3"
    "\u02bc\u2018-\u201f\u2028\u2029\u206a-\u206f\u3000\ud800-\udfff\ufb00-\ufb06"
    "\ufeff\uff01-\uffef\ufff9-\ufffc]"
)


@lru_cache(maxsize=1)
def _fix_tables() -> tuple[dict, dict]:
    table: dict[int, str | None] = {}
    # C1 controls -> Windows-1252 ("sloppy": the 5 undefined bytes stay as they are)
    for b in range(0x80, 0xA0):
        try:
            table[b] = bytes([b]).decode("cp1252")
        except UnicodeDecodeError:
            pass
    table.update({ord(k): v for k, v in _LIGATURES.items()})
    table[0x3000] = " "
    for cp in range(0xFF01, 0xFFF0):
        alt = unicodedata.normalize("NFKC", chr(cp))
        if alt != chr(cp):
            table[cp] = alt
    table.update({ord(q): "'" for q in _SINGLE_QUOTES})
    table.update({ord(q): '"' for q in _DOUBLE_QUOTES})
    controls = {cp: None for cp in _CONTROL_CHARS}

    entities: dict[str, str] = {}
    for name, char in html.entities.html5.items():
        if name.endswith(";"):
            entities["&" + name] = char
            if name == name.lower():
                upper = "&" + name.upper()
                if html.unescape(upper) == upper:
                    entities[upper] = char.upper()
    return (table, controls), entities


def _unescape_entity(match: re.Match) -> str:
    text = match.group(0)
    entities = _fix_tables()[1]
    if text in entities:
        return entities[text]
    if text.startswith("&#"):
        out = html.unescape(text)
        return text if ";" in out else out
    return text


# "&amp;amp;amp;...;" loses one level per pass of the fixed-point loop below, so k levels
# cost k passes over the text: quadratic (a 400 kB chain would take minutes).  Every such
# level decodes to "&" again, so k >= 2 levels are cut to one before each pass; the loop
# then reaches the same fixed point in a few passes.  (The {0,22} bounds keep every level
# an entity _HTML_ENTITY_RE itself matches.)
_AMP_CHAIN_RE = re.compile(r"&(?:(?:amp|AMP|#0{0,22}38|#[xX]0{0,21}26);){2,}")


def _fix_segment(text: str, unescape: bool) -> str:
    (table, controls), _ = _fix_tables()
    while True:
        orig = text
        if unescape:
            text = _AMP_CHAIN_RE.sub("&amp;", text)
            text = _HTML_ENTITY_RE.sub(_unescape_entity, text)
        text = text.translate(table)  # c1 controls, ligatures, width, quotes
        text = (
            text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n")
            .replace("\u2029", "\n").replace("\u0085", "\n")
        )
        if _SURROGATE_RE.search(text):
            text = _SURROGATE_PAIR_RE.sub(
                lambda m: chr(0x10000 + (ord(m.group(0)[0]) - 0xD800) * 0x400 + (ord(m.group(0)[1]) - 0xDC00)),
                text,
            )
            text = _SURROGATE_RE.sub("\ufffd", text)
        text = _ANSI_RE.sub("", text)
        text = text.translate(controls)
        text = _nfc(text)
        if text == orig:
            return text


# CPython's normalize() puts a run of combining marks in canonical order with an insertion
# sort: a run of alternating classes (U+0301 U+0316 ...) is quadratic, 400k marks took 78 s.
# A long run is replaced first by its canonical order (each mark decomposed, then a stable
# sort by combining class, O(n log n)): a canonically equivalent string, so NFC gives the
# same text, and normalize() then finds the run already sorted.  Valid because every
# non-starter decomposes into non-starters only (checked over all of Unicode in the tests).
_LONG_RUN = 32  # Unicode's stream-safe format allows 30 non-starters in a row


@lru_cache(maxsize=1)
def _long_mark_run_re() -> re.Pattern:
    marks = [(cp, cp + 1) for cp in range(0x110000)
             if not 0xD800 <= cp < 0xE000 and unicodedata.combining(chr(cp))]
    return re.compile(f"[{_ranges_to_class(_merge_ranges(marks))}]{{{_LONG_RUN},}}")


def _canonical_run(match: re.Match) -> str:
    marks = "".join(unicodedata.normalize("NFD", c) for c in match.group(0))
    return "".join(sorted(marks, key=unicodedata.combining))


def _nfc(text: str) -> str:
    if text.isascii():
        return text
    return unicodedata.normalize("NFC", _long_mark_run_re().sub(_canonical_run, text))


def _ftfy_lite(text: str) -> str:
    """The deterministic part of ftfy.fix_text (see the comment above)."""
    if not _FIXABLE_RE.search(text):
        return _nfc(text)
    out = []
    unescape = True  # ftfy's unescape_html="auto" turns off for good at the first '<'
    pos = 0
    while pos < len(text):
        brk = text.find("\n", pos) + 1 or len(text)
        segment = text[pos:brk]
        if unescape and "<" in segment:
            unescape = False
        out.append(_fix_segment(segment, unescape))
        pos = brk
    return "".join(out)


def _clean(text: str) -> str:
    """Reference CLIP clean-up: ftfy(-lite), html.unescape x2, whitespace collapse, lower."""
    text = _ftfy_lite(text)
    if "&" in text:
        text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


# --------------------------------------------------------------------------- pre-tokenizer
#
# The reference splits with the `regex` package:
#   <special>|<special>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
# compiled with IGNORECASE.  Stdlib `re` has no \p{..}; we build exact classes of the
# Unicode general categories L* and N* from unicodedata.  Only the literal alternatives are
# case-insensitive ((?i:...)), as in the reference (e.g. "'ſ" matches 's).
#
# Special tokens are never made from text.  OpenAI's tokenizer (and transformers') turns a
# literal "<|endoftext|>" in the text into the end token, open_clip's a literal
# "<end_of_text>"; either lets a caption move the position CLIP pools at.  We tokenize both
# literals as plain text -- exactly what open_clip does with "<|endoftext|>" and OpenAI with
# "<end_of_text>".  For all other text the two references agree with each other and with us.


def _merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged list of half-open [start, stop) code point ranges."""
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _ranges_to_class(ranges: Iterable[tuple[int, int]]) -> str:
    """Body of a regex character class for half-open code point ranges."""

    def esc(cp: int) -> str:
        return f"\\U{cp:08x}"

    return "".join(esc(a) if b == a + 1 else f"{esc(a)}-{esc(b - 1)}" for a, b in ranges)


@lru_cache(maxsize=1)
def _letter_number_ranges() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Code point ranges of the unicode categories L* and N*, found quickly (~0.1 s).

    Every L* or N* character is matched by stdlib re's `\\w` (str.isalnum()), and `\\d`
    is exactly Nd -- verified against a full scan of unicodedata.category in the tests --
    so only the few runs that mix letters with other numerics are classified one by one.
    """
    cps = np.arange(0x110000, dtype="<u4")
    cps[0xD800:0xE000] = 0x20  # surrogates (category Cs) cannot be decoded; use a space
    everything = cps.tobytes().decode("utf-32-le")
    letters: list[tuple[int, int]] = []
    numbers: list[tuple[int, int]] = [m.span() for m in re.finditer(r"\d+", everything)]
    category = unicodedata.category
    for m in re.finditer(r"[^\W\d_]+", everything):  # L* plus non-decimal numerics
        a, b = m.span()
        if everything[a:b].isalpha():
            letters.append((a, b))
            continue
        for cp in range(a, b):
            ch = everything[cp]
            if ch.isalpha():
                letters.append((cp, cp + 1))
            elif category(ch)[0] == "N":
                numbers.append((cp, cp + 1))
    return _merge_ranges(letters), _merge_ranges(numbers)


@lru_cache(maxsize=1)
def _clip_pattern() -> re.Pattern:
    letters, numbers = _letter_number_ranges()
    L = _ranges_to_class(letters)
    N = _ranges_to_class(numbers)
    return re.compile(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
        # U+0345 (combining ypogegrammeni) case-folds to a letter, so under the reference's
        # IGNORECASE it is in none of the classes and findall drops it; so do we.
        rf"|[{L}]+|[{N}]|[^\s{L}{N}\u0345]+"
    )


# --------------------------------------------------------------------------- CLIP BPE


def _read_merges(bpe_path, data: bytes | None = None) -> list[tuple[str, str]]:
    hint = (
        "Reinstall edgeclip (pip install --force-reinstall edgeclip) to restore the shipped "
        f"{_VOCAB_FILE}, or pass bpe_path= pointing to an intact copy of OpenAI CLIP's "
        "vocabulary file."
    )
    try:
        if data is not None:
            where, raw = str(bpe_path or "the given vocabulary bytes"), data
        elif bpe_path is None:
            where = f"edgeclip.runtime/{_VOCAB_FILE}"
            raw = resources.files(__package__).joinpath(_VOCAB_FILE).read_bytes()
        else:
            where = str(bpe_path)
            raw = Path(bpe_path).read_bytes()
    except (OSError, ModuleNotFoundError) as e:
        raise TokenizerError(f"CLIP BPE vocabulary {where} could not be read ({e}). {hint}") from e
    try:
        lines = gzip.decompress(raw).decode("utf-8").split("\n")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise TokenizerError(f"CLIP BPE vocabulary {where} is corrupt ({e}). {hint}") from e
    merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]
    if len(merges) != _N_MERGES or any(len(m) != 2 for m in merges):
        raise TokenizerError(
            f"CLIP BPE vocabulary {where} is corrupt: expected {_N_MERGES} merge lines of two "
            f"symbols after the header. {hint}"
        )
    return merges  # type: ignore[return-value]


class ClipTokenizer:
    """OpenAI CLIP's byte-level BPE tokenizer (ids identical to the reference).

    Args:
        bpe_path: the gzipped merges file; default is the one shipped with edgeclip.
        context_length: default row length of `__call__` (77 for CLIP, 248 for Long-CLIP).
    """

    def __init__(self, bpe_path=None, context_length: int = DEFAULT_CONTEXT_LENGTH, data: bytes | None = None):
        self.context_length = _check_context_length(context_length)
        merges = _read_merges(bpe_path, data)
        vocab = list(bytes_to_unicode().values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab.extend("".join(m) for m in merges)
        vocab.extend([_SOT, _EOT])
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        if len(self.encoder) != len(vocab):
            raise TokenizerError(
                f"CLIP BPE vocabulary is corrupt: it has duplicate merges. Reinstall edgeclip "
                f"or pass bpe_path= pointing to an intact {_VOCAB_FILE}."
            )
        self.decoder: list[str] = vocab
        self.bpe_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self._merges: list[tuple[str, str]] = merges
        self.sot_token_id: int = self.encoder[_SOT]
        self.eot_token_id: int = self.encoder[_EOT]
        self.pad_token_id: int = 0
        self.vocab_size: int = len(vocab)
        self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        self._pattern = _clip_pattern()
        self._cache: dict[str, tuple[int, ...]] = {}

    def __repr__(self) -> str:
        return f"ClipTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"

    # -- BPE
    def _bpe(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-token (raw text, not yet byte-encoded).

        The reference loop ("merge every occurrence of the lowest-ranked adjacent pair,
        left to right; repeat") rescans the word per merge, O(n^2); a 100 kB word took
        40 s.  Here the pairs sit in a heap keyed by (rank, position) over a linked list of
        symbols, O(n log n).  All occurrences of one rank are taken off the heap before any
        of them is merged, so pairs a merge creates (even lower-ranked ones) wait for the
        next round, exactly as in the reference.  A merge never re-creates its own pair
        (first+second is longer than either side), so one round is one rank.
        """
        chars = _byte_encode(word)
        if len(chars) > MAX_WORD_BYTES:
            raise TextTooLongError(
                f"a single word of {len(chars)} UTF-8 bytes ({_shorten(word, 40)!r}) is longer than "
                f"the {MAX_WORD_BYTES}-byte limit of one CLIP BPE word (no caption needs more); "
                "split it with spaces or shorten it"
            )
        symbols: list = list(chars)
        symbols[-1] += "</w>"
        n = len(symbols)
        ranks, merges = self.bpe_ranks, self._merges
        heap = [(r, i) for i, pair in enumerate(zip(symbols, symbols[1:])) if (r := ranks.get(pair)) is not None]
        heapq.heapify(heap)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        while heap:
            rank = heap[0][0]
            batch = []
            while heap and heap[0][0] == rank:
                batch.append(heapq.heappop(heap)[1])
            first, second = merges[rank]
            merged = first + second
            for i in batch:  # ascending positions = left to right
                j = nxt[i]
                # stale entry: i was merged away (None) or into something else
                if j < 0 or symbols[i] != first or symbols[j] != second:
                    continue
                symbols[i], symbols[j] = merged, None
                k = nxt[i] = nxt[j]
                if k >= 0:
                    prv[k] = i
                    r = ranks.get((merged, symbols[k]))
                    if r is not None:
                        heapq.heappush(heap, (r, i))
                p = prv[i]
                if p >= 0:
                    r = ranks.get((symbols[p], merged))
                    if r is not None:
                        heapq.heappush(heap, (r, p))
        enc = self.encoder
        return tuple(enc[s] for s in symbols if s is not None)

    def _word_ids(self, word: str) -> tuple[int, ...]:
        cache = self._cache
        toks = cache.get(word)
        if toks is None:
            toks = self._bpe(word)
            if len(word) <= _CACHE_WORD_CHARS:  # long (hostile) words would pin memory
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[word] = toks
        return toks

    def _encode_upto(self, text: str, limit: int | None) -> list[int]:
        """Ids of `text`, stopping as soon as at least `limit` exist (None: all of them).

        Words are tokenized in order and each word's ids do not depend on later words, so
        the first `limit` ids are those of the whole text: a long text costs only its
        clean-up, not its BPE.
        """
        ids: list[int] = []
        for word in self._pattern.findall(_clean(text)):
            ids.extend(self._word_ids(word))
            if limit is not None and len(ids) >= limit:
                break
        return ids

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without the start/end tokens."""
        if not isinstance(text, str):
            raise InputError(f"encode() takes a str, got {type(text).__name__}.")
        return self._encode_upto(text, None)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (a list or 1-D array). Words are separated by single spaces.

        With skip_special_tokens (default) the start token is dropped and decoding stops
        at the first end token, so a padded row of `__call__` decodes to its text.
        """
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise InputError(f"decode() takes a 1-D sequence of int ids, got shape {arr.shape} {arr.dtype}.")
        seq = arr.tolist()
        bad = [i for i in seq if not 0 <= i < self.vocab_size]
        if bad:
            raise InputError(f"decode(): ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size}).")
        if skip_special_tokens:
            if self.eot_token_id in seq:
                seq = seq[: seq.index(self.eot_token_id)]
            seq = [i for i in seq if i != self.sot_token_id]
        # like the reference: special tokens are spelled out, '</w>' ends a word
        text = "".join(self.decoder[i] for i in seq)
        data = bytearray(self._byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    # -- batch
    def __call__(self, texts, context_length: int | None = None, truncate: bool = False) -> np.ndarray:
        """Token ids, int64 of shape (N, context_length): [sot] ids [eot] 0 0 ...

        A text longer than the context raises TextTooLongError unless truncate=True, which
        keeps the first context_length-1 tokens and ends the row with the end token.
        """
        texts = _as_text_list(texts)
        L = self.context_length if context_length is None else _check_context_length(context_length)
        # L - 1 content ids are enough to fill a truncated row and to know it was cut; without
        # truncate, count far enough to report the length (a few hundred tokens) exactly.
        limit = L - 1 if truncate else max(L - 1, _COUNT_LIMIT + 1)
        rows = []
        for i, t in enumerate(texts):
            try:
                rows.append([self.sot_token_id, *self._encode_upto(t, limit), self.eot_token_id])
            except TextTooLongError as e:  # an over-long word: say which text holds it
                raise TextTooLongError(f"texts[{i}]: {e}") from None
        lengths = [len(r) for r in rows]
        bad = [i for i, n in enumerate(lengths) if n > L]
        if bad and not truncate:
            raise _too_long_error(texts, lengths, bad, L, counted=limit + 2)
        out = np.full((len(rows), L), self.pad_token_id, dtype=np.int64)
        for i, row in enumerate(rows):
            if len(row) > L:
                row = row[:L]
                row[-1] = self.eot_token_id
            out[i, : len(row)] = row
        if bad:
            _warn_truncated(len(bad), len(texts), L)
        return out


_default: ClipTokenizer | None = None
_default_lock = threading.Lock()


def _default_tokenizer() -> ClipTokenizer:
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = ClipTokenizer()
    return _default


def tokenize(texts, context_length: int = DEFAULT_CONTEXT_LENGTH, truncate: bool = False) -> np.ndarray:
    """CLIP-tokenize `texts` (str or list of str) to int64 (N, context_length)."""
    return _default_tokenizer()(texts, context_length=_check_context_length(context_length), truncate=truncate)


# --------------------------------------------------------------------------- HF tokenizer.json


def _token_name(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (e.g. SigLIP) with ClipTokenizer's call semantics.

    Rows are the tokenizer's ids including the special tokens its post-processor adds
    (SigLIP appends `</s>`), padded with the pad id to `context_length` (pad_to_max=True,
    SigLIP style) or to the longest row of the batch (pad_to_max=False).  Over-long texts
    raise TextTooLongError unless truncate=True, which truncates the text's tokens so that
    the special tokens still fit (as transformers' truncation=True does).

    The pad id is, in order: `pad_token_id=`, the "pad_token" of a tokenizer_config.json
    or special_tokens_map.json next to tokenizer.json, the padding configured in
    tokenizer.json, a token named <pad> / [PAD] / <|pad|>, else 0.
    """

    _PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>")

    def __init__(self, path, context_length: int = 64, pad_to_max: bool = True, pad_token_id: int | None = None,
                 data: bytes | None = None):
        from .._lazy import require

        tokenizers = require("tokenizers", "loading tokenizer.json")
        self.context_length = _check_context_length(context_length)
        self.pad_to_max = bool(pad_to_max)
        if path is None:
            raise TokenizerError("HFTokenizer needs the path of a tokenizer.json or of the model folder holding it.")
        p = Path(path)
        if p.is_dir() and data is None:
            p = p / "tokenizer.json"
        if data is None and not p.is_file():
            raise TokenizerError(
                f"tokenizer file {p} not found. Pass the path of a tokenizer.json or of a model "
                "folder that holds one (save it with tokenizer.save_pretrained(folder))."
            )
        try:
            tok = tokenizers.Tokenizer.from_file(str(p)) if data is None else \
                tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # the Rust side raises plain Exceptions
            raise TokenizerError(f"{p} is not a valid tokenizer.json ({e}). Re-save it with the tokenizers library.") from e
        self.path = p
        configured_padding = tok.padding
        tok.no_padding()
        tok.no_truncation()
        self._tok = tok
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        self._n_special = tok.num_special_tokens_to_add(False)

        config: dict = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            f = p.parent / name
            if f.is_file():
                try:
                    for k, v in json.loads(f.read_text(encoding="utf-8")).items():
                        config.setdefault(k, v)
                except (OSError, ValueError):
                    pass

        self.pad_token_id: int = self._find_pad_id(pad_token_id, config, configured_padding)
        empty = tok.encode("")
        specials = [i for i, m in zip(empty.ids, empty.special_tokens_mask) if m]
        self.sot_token_id: int | None = specials[0] if len(specials) >= 2 else None
        eot = specials[-1] if specials and empty.ids and empty.special_tokens_mask[-1] else None
        if eot is None:
            name = _token_name(config.get("eos_token"))
            eot = tok.token_to_id(name) if name else None
        self.eot_token_id: int | None = eot

    def _find_pad_id(self, explicit, config, configured_padding) -> int:
        if explicit is not None:
            return int(explicit)
        name = _token_name(config.get("pad_token"))
        if name is not None and self._tok.token_to_id(name) is not None:
            return self._tok.token_to_id(name)
        if configured_padding and configured_padding.get("pad_id") is not None:
            return int(configured_padding["pad_id"])
        for name in self._PAD_NAMES:
            i = self._tok.token_to_id(name)
            if i is not None:
                return i
        return 0

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, context_length={self.context_length}, pad_id={self.pad_token_id})"

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without the post-processor's special tokens."""
        if not isinstance(text, str):
            raise InputError(f"encode() takes a str, got {type(text).__name__}.")
        return list(self._encode_batch([text], add_special_tokens=False)[0].ids)

    def _encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list:
        """`tokenizers`' encode_batch with its plain TypeError/Exception (e.g. on a lone
        surrogate, which Rust strings cannot hold) turned into an InputError naming the text."""
        try:
            return self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)
        except Exception as e:  # noqa: BLE001 - the Rust side raises plain exceptions
            for i, t in enumerate(texts):
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError as bad:
                    raise InputError(
                        f"texts[{i}] {_shorten(t)!r} holds the lone surrogate {t[bad.start]!r} at "
                        f"character {bad.start}, which is not valid Unicode text; decode the bytes "
                        "it came from with errors='replace'."
                    ) from None
            raise TokenizerError(f"{self.path} could not tokenize the texts ({type(e).__name__}: {e}).") from e

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; by default without padding and start/end tokens."""
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise InputError(f"decode() takes a 1-D sequence of int ids, got shape {arr.shape} {arr.dtype}.")
        seq = arr.tolist()
        if skip_special_tokens:
            while seq and seq[-1] == self.pad_token_id:  # the padding of a row of __call__
                seq.pop()
            seq = [i for i in seq if i not in (self.sot_token_id, self.eot_token_id)]
        return self._tok.decode(seq, skip_special_tokens=skip_special_tokens)

    def __call__(self, texts, context_length: int | None = None, truncate: bool = False) -> np.ndarray:
        texts = _as_text_list(texts)
        L = self.context_length if context_length is None else _check_context_length(context_length)
        rows = [list(e.ids) for e in self._encode_batch(texts)]
        lengths = [len(r) for r in rows]
        bad = [i for i, n in enumerate(lengths) if n > L]
        if bad and not truncate:
            raise _too_long_error(texts, lengths, bad, L)
        if bad:
            room = L - self._n_special
            if room < 0:
                raise InputError(
                    f"context_length {L} is smaller than the {self._n_special} special tokens "
                    "this tokenizer adds; use a larger context_length."
                )
            for i in bad:
                enc = self._encode_batch([texts[i]], add_special_tokens=False)[0]
                enc.truncate(room)
                rows[i] = list(self._tok.post_process(enc, None, True).ids)[:L]
        width = L if self.pad_to_max else max([len(r) for r in rows], default=0)
        out = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        if bad:
            _warn_truncated(len(bad), len(texts), L)
        return out


# --------------------------------------------------------------------------- trimming

def trim(ids: np.ndarray, eot_token_id: int | None) -> np.ndarray:
    """Keep columns up to the batch's last end token: later positions cannot change pooled features
    under a causal mask, so this is exact and cuts text-encoder work for short prompts."""
    if eot_token_id is None:
        ends = ids.argmax(axis=1)
    else:
        hit = ids == eot_token_id
        ends = np.where(hit.any(axis=1), hit.argmax(axis=1), ids.shape[1] - 1)
    return np.ascontiguousarray(ids[:, : max(2, int(ends.max()) + 1)])


# --------------------------------------------------------------------------- factory


def load_tokenizer(kind: str, context_length: int, path=None, data: bytes | None = None):
    """"clip_bpe" -> ClipTokenizer(bpe_path=path); "hf" -> HFTokenizer(path).

    `data`: the file's bytes, already verified (an artifact's tokenizer); `path` then only names it."""
    if kind == "clip_bpe":
        return ClipTokenizer(bpe_path=path, context_length=context_length, data=data)
    if kind == "hf":
        if path is None:
            raise TokenizerError(
                "tokenizer kind 'hf' needs path= (a tokenizer.json or the model folder holding it)."
            )
        return HFTokenizer(path, context_length=context_length, data=data)
    raise TokenizerError(f"unknown tokenizer kind {kind!r}; known kinds: {', '.join(TOKENIZER_KINDS)}.")
