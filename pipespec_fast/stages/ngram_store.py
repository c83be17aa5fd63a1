"""``NGramStore``: what the target said after each short context in a corpus of its own answers,
a read-only continuation table the n-gram drafter consults where the text so far has no match.

Prompt lookup (:mod:`~pipespec_fast.stages.ngram_index`) can only propose what the current
text already contains: on a fresh answer it matches nothing, or one token, and its one-token
matches are right 15-18% of the time. A model's phrasing repeats across answers, though
("Here's a Python function that", a docstring's layout, a closing sentence), so a table of
what the target itself wrote after each context of 2-6 tokens, over answers to many prompts,
proposes the next token for free (retrieval-based drafting, REST's datastore idea, with the
target's own answers as the data). Measured with the default target's 1.9M answer tokens
(``docs/DRAFT.md``), teacher-forced: prompt lookup consulting this table before it falls back
to a one-token match guesses 58% / 34% of the benchmark answers' tokens (HumanEval /
MT-Bench) where prompt lookup alone guesses 44% / 21%, and the distilled draft model 52% /
32%.

Layout: per context length ``n`` (``min_order .. max_order``), ``keys[n]`` are the sorted
32-bit hashes of the corpus's ``n``-token contexts and ``best[n]`` the token that most often
followed each (ties to the smallest id). A lookup hashes the text's last ``n`` tokens, longest
first, and bisects: ``O(max_order * log(size))``, a few microseconds each. Two contexts can
share a hash; that can only make a proposal wrong, never an output (the verifier decides).

On disk (:meth:`save`, :meth:`load`): ``tokens.npy``, the corpus as one array (the answers one
after another, each followed by a separator: ``65535`` in ``uint16``, ``-1`` in ``int32``),
read with ``allow_pickle=False``; ``store.json``, the vocabulary size, the vocabulary it was
made with (:func:`vocab_fingerprint`) and how it was made. The tables are built from the
tokens at load (about 1.5 s for 1.9M tokens) and kept in a cache folder for the next load
(~0.1 s).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

_MULT = 1000003
_MASK = (1 << 64) - 1
MAX_ORDER = 16  # the longest context a store may keep (a file asking for more is refused)
FORMAT = 1
# how the tables are made (the hash, the fold, the tie rule): part of a cache file's name, so a
# change to any of them makes a new cache instead of reading old tables as new
TABLES_VERSION = 1
CACHE_MIN_TOKENS = 100_000  # smaller stores build in milliseconds: not worth a cache file
TOKENS_FILE, META_FILE = "tokens.npy", "store.json"


def vocab_fingerprint(vocab: dict[str, int]) -> str:
    """SHA-256 of a tokenizer's vocabulary (``get_vocab()``: token -> id, added tokens
    included), independent of how its files are written: what a store's ids mean."""
    text = "\n".join(f"{i}\t{t}" for t, i in sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _fold(h: int) -> int:
    """A 64-bit context hash to the table's 32 bits."""
    return (h ^ (h >> 32)) & 0xFFFFFFFF


class NGramStore:
    """The continuation table of a token corpus.

    Args:
        sequences: the corpus, as token-id sequences (answers); contexts never span two.
        vocab_size: ids must lie in ``[0, vocab_size)``.
        min_order, max_order: the shortest / longest context kept (``1 <= min <= max``).
        meta: provenance recorded by :meth:`save` (the vocabulary's fingerprint, how it was
            made).
        tables: lookup tables built before (:meth:`tables`, from :meth:`load`'s cache), used
            instead of building them when they are well formed.
    """

    def __init__(self, sequences: Sequence[Sequence[int]], vocab_size: int, min_order: int = 2,
                 max_order: int = 6, meta: dict | None = None, tables=None) -> None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        for name, v in (("min_order", min_order), ("max_order", max_order)):
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_ORDER:
                raise ValueError(f"{name} must be an integer in [1, {MAX_ORDER}], got {v!r}")
        if max_order < min_order:
            raise ValueError(f"max_order ({max_order}) must be >= min_order ({min_order})")
        self.vocab_size, self.min_order, self.max_order = vocab_size, min_order, max_order
        self.meta = dict(meta or {})
        parts = [np.asarray(s, dtype=np.int64).reshape(-1) for s in sequences]
        for i, s in enumerate(parts):
            if s.size and (s.min() < 0 or s.max() >= vocab_size):
                raise ValueError(f"sequences[{i}]: ids outside [0, {vocab_size})")
        flat = np.concatenate([np.append(s, -1) for s in parts]) if parts else \
            np.zeros(0, np.int64)
        self.sequences, self.tokens = len(parts), int(flat.size - len(parts))
        small = vocab_size < 65535  # save()'s format: uint16 with 65535 separators
        self._flat = np.where(flat < 0, 65535 if small else -1, flat).astype(
            np.uint16 if small else np.int32)  # kept for save(), in that format
        self._pow = [pow(_MULT, i, 1 << 64) for i in range(max_order)]
        self.keys: dict[int, np.ndarray] = {}
        self.best: dict[int, np.ndarray] = {}
        taken = _valid_tables(tables, min_order, max_order, vocab_size)
        self.from_cache = taken is not None  # else built here
        if taken is not None:
            self.keys, self.best = taken
            return
        best_dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
        for n in range(min_order, max_order + 1):
            self.keys[n], self.best[n] = _table(flat, n, best_dtype)

    def tables(self) -> dict[str, np.ndarray]:
        """The lookup tables as named arrays (what :meth:`load` caches)."""
        return {**{f"keys{n}": k for n, k in self.keys.items()},
                **{f"best{n}": b for n, b in self.best.items()}}

    def __len__(self) -> int:
        """Contexts held, over every order."""
        return sum(k.size for k in self.keys.values())

    def lookup(self, tokens: Sequence[int], end: int | None = None) -> tuple[int, int]:
        """``(token, n)``: the token that most often followed the longest context of
        ``tokens[:end]`` the store holds (``n`` its length), or ``(-1, 0)``."""
        end = len(tokens) if end is None else end
        hashes: list[int] = []
        h = 0
        for n in range(1, min(self.max_order, end) + 1):
            h = (int(tokens[end - n]) * self._pow[n - 1] + h) & _MASK
            hashes.append(h)
        for n in range(len(hashes), self.min_order - 1, -1):
            keys = self.keys[n]
            k = _fold(hashes[n - 1])
            i = int(keys.searchsorted(np.uint32(k)))
            if i < keys.size and int(keys[i]) == k:
                return int(self.best[n][i]), n
        return -1, 0

    # ------------------------------------------------------------------ files

    def save(self, directory: str | Path) -> Path:
        """Write ``tokens.npy`` and ``store.json`` into ``directory`` (made if missing)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / TOKENS_FILE, self._flat, allow_pickle=False)
        meta = {**self.meta, "format": FORMAT, "vocab_size": self.vocab_size,
                "min_order": self.min_order, "max_order": self.max_order,
                "sequences": self.sequences, "tokens": self.tokens}
        (d / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | Path, cache_dir: str | Path | None = None) -> NGramStore:
        """A store saved by :meth:`save`; a ``ValueError`` naming the file for anything
        missing or malformed (nothing in the folder is executed: plain JSON and an array
        read without pickle). ``cache_dir``: keep the built tables there
        (``ngram-store-<hash of TABLES_VERSION and the two files>.npz``, read without pickle
        and checked; a missing or damaged one is rebuilt): ~0.1 s to load instead of ~1.5 s
        to build the default store."""
        d = Path(directory)
        meta_path, tok_path = d / META_FILE, d / TOKENS_FILE
        for p in (meta_path, tok_path):
            if not p.is_file():
                raise ValueError(f"ngram store: {p} not found")
        try:
            meta_bytes = meta_path.read_bytes()
            meta = json.loads(meta_bytes.decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"ngram store: {meta_path} is not JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"ngram store: {meta_path}: expected format {FORMAT}, got "
                             f"{meta.get('format') if isinstance(meta, dict) else meta!r}")
        try:
            flat = np.load(tok_path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"ngram store: {tok_path} is not a token array ({e})") from None
        if flat.ndim != 1 or flat.dtype not in (np.uint16, np.int32):
            raise ValueError(f"ngram store: {tok_path}: expected a 1-D uint16 or int32 array, "
                             f"got {flat.dtype} {flat.shape}")
        sep = 65535 if flat.dtype == np.uint16 else -1
        flat = flat.astype(np.int64)
        cuts = np.flatnonzero(flat == sep)
        if flat.size and (cuts.size == 0 or cuts[-1] != flat.size - 1):
            raise ValueError(f"ngram store: {tok_path}: the last sequence has no separator")
        seqs = np.split(flat, cuts + 1)[:-1] if flat.size else []
        counts = (meta.get("sequences"), meta.get("tokens"))
        if counts != (len(seqs), int(flat.size - len(seqs))):
            raise ValueError(f"ngram store: {tok_path} holds {len(seqs)} sequences of "
                             f"{flat.size - len(seqs)} tokens; {meta_path} says {counts[0]} of "
                             f"{counts[1]}")
        cached = None
        if cache_dir is not None and flat.size >= CACHE_MIN_TOKENS:
            digest = hashlib.sha256(f"{TABLES_VERSION}\0".encode() + meta_bytes + b"\0"
                                    + tok_path.read_bytes())
            cached = Path(cache_dir) / f"ngram-store-{digest.hexdigest()[:24]}.npz"
        tables = _read_tables(cached)
        try:
            store = cls([s[:-1] for s in seqs], meta.get("vocab_size"),
                        meta.get("min_order", 2), meta.get("max_order", 6), meta, tables)
        except ValueError as e:
            raise ValueError(f"ngram store {d}: {e}") from None
        if cached is not None and not store.from_cache:
            _write_tables(cached, store.tables())
        return store


def _table(flat: np.ndarray, n: int, best_dtype) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, best)`` of the ``n``-token contexts of ``flat`` (``-1`` separates sequences)."""
    m = flat.size - n
    if m <= 0:
        return np.zeros(0, np.uint32), np.zeros(0, best_dtype)
    h = np.zeros(m, dtype=np.uint64)
    bad = np.zeros(m, dtype=bool)
    for j in range(n):
        col = flat[j:j + m]
        bad |= col < 0
        h = h * np.uint64(_MULT) + col.astype(np.uint64)  # mod 2**64, as lookup() computes
    nxt = flat[n:n + m]
    bad |= nxt < 0
    h, nxt = h[~bad], nxt[~bad]
    key = ((h ^ (h >> np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    o = np.lexsort((nxt, key))
    key, nxt = key[o], nxt[o]
    if key.size == 0:
        return key, nxt.astype(best_dtype)
    # runs of equal (key, next): their counts; then per key the most frequent next token
    starts = np.flatnonzero(np.r_[True, (key[1:] != key[:-1]) | (nxt[1:] != nxt[:-1])])
    counts = np.diff(np.r_[starts, key.size])
    k2, n2 = key[starts], nxt[starts]
    o = np.lexsort((n2, -counts, k2))
    k2, n2 = k2[o], n2[o]
    first = np.r_[True, k2[1:] != k2[:-1]]
    return k2[first], n2[first].astype(best_dtype)


def _read_tables(path: Path | None) -> dict | None:
    """A cache file's arrays (``None``: no cache, or it cannot be read for any reason, a
    truncated or corrupted file included: then it is rebuilt)."""
    if path is None:
        return None
    try:
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception:  # BadZipFile, a bad CRC, MemoryError on a crafted header, ...
        return None


def _write_tables(path: Path, tables: dict[str, np.ndarray]) -> None:
    """Write the cache atomically (a temporary file, readable as the umask allows, renamed);
    a cache that cannot be written only costs the next load its build, and leaves no
    temporary file behind."""
    import os
    import tempfile

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **tables)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o644 & ~umask)
        os.replace(tmp, path)
        tmp = None
    except Exception:
        pass
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _valid_tables(tables, min_order: int, max_order: int, vocab_size: int):
    """``(keys, best)`` from ``tables`` (``keys<n>`` / ``best<n>`` arrays, a cache's) when they
    are well formed for these orders and vocabulary (every order, keys strictly ascending
    uint32, ids in range), else ``None`` (nothing taken)."""
    if tables is None:
        return None
    keys, best = {}, {}
    for n in range(min_order, max_order + 1):
        k, b = tables.get(f"keys{n}"), tables.get(f"best{n}")
        if not isinstance(k, np.ndarray) or not isinstance(b, np.ndarray) or \
                k.dtype != np.uint32 or k.ndim != 1 or b.shape != k.shape or \
                b.dtype not in (np.uint16, np.int32) or \
                (k.size > 1 and not bool((k[1:] > k[:-1]).all())) or \
                (b.size and (int(b.min()) < 0 or int(b.max()) >= vocab_size)):
            return None
        keys[n], best[n] = k, b
    return keys, best

