"""``NGramStore`` (the target's answers as a continuation table) and the n-gram drafter that
consults it: lookups against brute force, files, the order of proposals, trees, losslessness,
loading."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
from test_ngram import REPETITIVE, greedy, rows_to_tokens
from tiny import family

from pipespec_fast import FastPipeline, LlamaStage
from pipespec_fast.loading import load_store
from pipespec_fast.stages.ngram import NGramStage
from pipespec_fast.stages.ngram_index import SuffixIndex
from pipespec_fast.stages.ngram_store import NGramStore, vocab_fingerprint
from pipespec_fast.stages.ngram_tree import ngram_tree


def brute_lookup(seqs, text, min_order, max_order):
    """The most frequent follower (ties: smallest id) of the longest context of ``text`` that
    occurs inside one of ``seqs`` with a token after it."""
    for n in range(min(max_order, len(text)), min_order - 1, -1):
        ctx = tuple(text[len(text) - n:])
        follow = Counter(s[i + n] for s in seqs for i in range(len(s) - n)
                         if tuple(s[i:i + n]) == ctx)
        if follow:
            return min(follow.items(), key=lambda kv: (-kv[1], kv[0]))[0], n
    return -1, 0


@pytest.mark.parametrize("vocab, min_order, max_order", [(5, 2, 6), (9, 1, 3), (40, 2, 4)])
def test_lookup_matches_brute_force(vocab, min_order, max_order):
    rng = random.Random(vocab)
    seqs = [[rng.randrange(vocab) for _ in range(rng.randrange(0, 60))] for _ in range(30)]
    store = NGramStore(seqs, vocab, min_order, max_order)
    found = 0
    for _ in range(400):
        text = [rng.randrange(vocab) for _ in range(rng.randrange(0, 9))]
        want = brute_lookup(seqs, text, min_order, max_order)
        assert store.lookup(text) == want, text
        assert store.lookup(text + [0, 1], len(text)) == want  # ``end`` cuts the text
        found += want[1] > 0
    assert found > 100  # the queries really hit the table, at several orders


def test_contexts_never_span_two_answers():
    store = NGramStore([[1, 2], [3, 4]], 8)
    assert store.lookup([1, 2]) == (-1, 0)  # [1, 2] is followed by nothing in its answer
    assert store.lookup([2, 3]) == (-1, 0)  # not a context: the answers are apart
    assert store.lookup([7, 3, 4, 1]) == (-1, 0)
    assert NGramStore([[1, 2, 5]], 8).lookup([1, 2]) == (5, 2)


@pytest.mark.parametrize("vocab", [100, 70000])  # uint16 and int32 on disk
def test_save_load_round_trip(tmp_path, vocab):
    rng = random.Random(1)
    seqs = [[rng.randrange(vocab) for _ in range(40)] for _ in range(20)] + [[]]
    seqs[3][10:14] = seqs[5][20:24] = [vocab - 1, 0, vocab - 1, 7]
    store = NGramStore(seqs, vocab, 2, 5, {"made_by": "test"})
    loaded = NGramStore.load(store.save(tmp_path / "s"))
    assert np.load(tmp_path / "s" / "tokens.npy").dtype == (np.uint16 if vocab < 65535
                                                            else np.int32)
    assert (loaded.sequences, loaded.tokens, len(loaded)) == (21, 800, len(store))
    assert loaded.meta["made_by"] == "test" and (loaded.min_order, loaded.max_order) == (2, 5)
    for s in seqs[:5]:
        for end in range(len(s)):
            assert loaded.lookup(s, end) == store.lookup(s, end)
    assert loaded.lookup([vocab - 1, 0, vocab - 1]) == (7, 3)


def _saved(tmp_path):
    return NGramStore([[1, 2, 3]], 10).save(tmp_path / "s")


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / "store.json").unlink(), "store.json not found"),
    (lambda d: (d / "tokens.npy").unlink(), "tokens.npy not found"),
    (lambda d: (d / "store.json").write_text("{"), "store.json is not JSON"),
    (lambda d: (d / "store.json").write_text('{"format": 9}'), "expected format 1"),
    (lambda d: np.save(d / "tokens.npy", np.array([{"a": 1}], dtype=object)),
     "tokens.npy is not a token array"),
    (lambda d: np.save(d / "tokens.npy", np.array([[1, 2]], dtype=np.uint16)), "1-D"),
    (lambda d: np.save(d / "tokens.npy", np.array([1, 2], dtype=np.uint16)), "no separator"),
    (lambda d: np.save(d / "tokens.npy", np.array([1, 2, 12, 65535], dtype=np.uint16)),
     r"ids outside \[0, 10\)"),
    (lambda d: np.save(d / "tokens.npy", np.array([1, 2, 65535], dtype=np.uint16)),
     "holds 1 sequences of 2 tokens"),
])
def test_a_damaged_store_is_refused_naming_its_file(tmp_path, damage, match):
    d = _saved(tmp_path)
    damage(d)
    with pytest.raises(ValueError, match=match) as e:
        NGramStore.load(d)
    assert str(tmp_path) in str(e.value)


def test_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        NGramStore([[1]], 0)
    with pytest.raises(ValueError, match="max_order"):
        NGramStore([[1]], 5, 3, 2)
    with pytest.raises(ValueError, match=r"sequences\[1\]: ids outside"):
        NGramStore([[1], [5]], 5)


# ----------------------------------------------------------------------------- the drafter

STORE_SEQS = [[20, 21, 22, 23], [30, 31, 32], [30, 31, 32], [30, 31, 33]]


def proposal(store, text):
    st = NGramStage(64, store=store)
    rows = st.forward(text)
    return rows_to_tokens(rows)[-1], st.last_match_len


def test_the_texts_two_token_matches_come_before_the_store_and_the_store_before_one():
    store = NGramStore(STORE_SEQS, 64)
    # [30, 31] occurred in this text, followed by 5: the text's own match wins
    assert proposal(store, [30, 31, 5, 30, 31]) == (5, 2)
    # only the last token (31) occurred before in the text: the store's [30, 31] -> 32 wins
    assert proposal(store, [31, 9, 30, 31]) == (32, 2)
    # no match in the text at all: the store's longest context, [20, 21, 22] -> 23
    assert proposal(store, [20, 21, 22]) == (23, 3)
    # neither: the text's one-token match, then the bigram fallback
    assert proposal(store, [7, 8, 7]) == (8, 1)
    assert proposal(store, [40, 41])[1] == 0
    assert proposal(None, [31, 9, 30, 31]) == (9, 1)  # no store: prompt lookup as before


def test_drafter_checks_and_shares_its_store():
    store = NGramStore(STORE_SEQS, 64)
    with pytest.raises(ValueError, match="store: made for a vocabulary of 64"):
        NGramStage(65, store=store)
    with pytest.raises(TypeError, match="NGramStore"):
        NGramStage(64, store="models/store")
    st = NGramStage(64, store=store)
    assert st.clone().store is store and st.clone().index.store is store
    assert st.without_store().store is None and st.without_store().index.store is None


def test_tree_without_a_text_match_starts_with_the_stores_chain():
    store = NGramStore(STORE_SEQS * 2, 64, 2, 4)
    idx = SuffixIndex(1, 4, store)
    for t in [20, 21]:
        idx.append(t)
    tree, n = ngram_tree(idx, budget=8, max_depth=4)
    assert (tree.tokens, tree.parents, n) == ((22, 23), (-1, 0), 2)
    # a two-token match in the text keeps the text's continuations only
    idx = SuffixIndex(1, 4, store)
    for t in [20, 21, 9, 20, 21]:
        idx.append(t)
    tree, n = ngram_tree(idx, budget=8, max_depth=4)
    assert tree.tokens[0] == 9 and n == 2 and 22 not in tree.tokens


def test_tree_respects_a_higher_confidence_threshold():
    store = NGramStore(STORE_SEQS * 2, 64, 2, 4)
    idx = SuffixIndex(1, 4, store)
    for t in [20, 21, 9, 20, 21]:  # a 2-token match in the text, the store's 2-token context
        idx.append(t)
    tree, n = ngram_tree(idx, budget=8, max_depth=4, min_match=3)
    assert len(tree) == 0 and n == 0  # neither reaches 3 tokens: no guesses in a tree
    idx = SuffixIndex(1, 4, store)
    for t in [5, 20, 21, 22]:  # the store holds [20, 21, 22] -> 23: 3 tokens
        idx.append(t)
    tree, n = ngram_tree(idx, budget=8, max_depth=4, min_match=3)
    assert tree.tokens[:1] == (23,) and n == 3


@pytest.mark.parametrize("mode", ["pipespec", "sync"])
def test_a_drafter_with_a_store_is_lossless(mode):
    """The store holds the target's own greedy answers (its proposals are mostly right) and
    a corrupted copy of them (mostly wrong): greedy output equals the target alone."""
    draft_m, target_m = family(2, noise=0.05, seed=4)
    target = LlamaStage(target_m, name="target", max_len=256)
    draft = LlamaStage(draft_m, name="draft", max_len=256)
    prompts = ([2, 9], [4, 8, 15, 16], [11, 3, 11])
    answers = [greedy([target], p, 40).token_ids for p in prompts]
    rng = random.Random(0)
    wrong = [[t if rng.random() < 0.7 else rng.randrange(target.vocab_size) for t in a]
             for a in answers]
    store = NGramStore(answers + wrong, target.vocab_size)
    for stages in ([NGramStage(target.vocab_size, store=store), target],
                   [NGramStage(target.vocab_size, store=store), draft, target]):
        for p, ref in zip((*prompts, REPETITIVE), (*answers, None), strict=True):
            ref = ref or greedy([target], p, 40).token_ids
            res = greedy(stages, p, 40, mode)
            assert res.token_ids == ref
            if stages[1] is target:  # the n-gram drafter's trees, the store's chain first
                tree = FastPipeline(stages, mode=mode, adaptive_windows=False, tree_budget=6)
                assert tree.generate(p, 40, ignore_eos=True).token_ids == ref
    assert res.stage_stats[-1].accepted > 0 and stages[0].matched > 0


# ----------------------------------------------------------------------------- loading

class _Tok:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)


def test_load_store_checks_vocabulary_and_drafter(tmp_path):
    target_dir = tmp_path / "target"
    target_dir.mkdir()
    (target_dir / "config.json").write_text('{"vocab_size": 10}')
    vocab = {f"t{i}": i for i in range(10)}
    meta = {"vocab_sha256": vocab_fingerprint(vocab)}
    d = NGramStore([[1, 2, 3]], 10, meta=meta).save(tmp_path / "s")
    assert load_store(d, target_dir, tokenizer=_Tok(vocab)).lookup([1, 2]) == (3, 2)
    assert load_store(None, target_dir) is None
    # the same vocabulary in another order of the dict: the same fingerprint
    assert vocab_fingerprint(dict(reversed(vocab.items()))) == meta["vocab_sha256"]
    with pytest.raises(ValueError, match="made with another vocabulary"):
        load_store(d, target_dir, tokenizer=_Tok({**vocab, "t9": 10, "x": 9}))
    (target_dir / "config.json").write_text('{"vocab_size": 12}')
    with pytest.raises(ValueError, match=r"ids of a 10-token vocabulary; the target .* has 12"):
        load_store(d, target_dir)
    with pytest.raises(ValueError, match="ngram=True"):
        load_store(d, target_dir, ngram=False)
    with pytest.raises(TypeError, match="ngram_store"):
        load_store(3, target_dir)
    assert load_store(d, None).vocab_size == 10  # no folder at hand (a distributed rank 0)


def test_store_file_counts_and_orders_are_checked(tmp_path):
    d = NGramStore([[1, 2, 3], [4, 5]], 10).save(tmp_path / "s")
    meta = json.loads((d / "store.json").read_text())
    (d / "store.json").write_text(json.dumps({**meta, "tokens": 7}))
    with pytest.raises(ValueError, match="holds 2 sequences of 5 tokens.*says 2 of 7"):
        NGramStore.load(d)
    (d / "store.json").write_text(json.dumps({**meta, "max_order": 1000}))
    with pytest.raises(ValueError, match=r"max_order must be an integer in \[1, 16\]"):
        NGramStore.load(d)


def test_from_pretrained_refuses_a_bad_store_before_loading(tmp_path, monkeypatch):
    from pipespec_fast.stages import llama

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the store was checked")

    monkeypatch.setattr(llama.LlamaStage, "from_pretrained", no_load)
    target_dir = tmp_path / "m"
    target_dir.mkdir()
    (target_dir / "config.json").write_text('{"vocab_size": 20}')
    with pytest.raises(ValueError, match="ngram store: .*store.json not found"):
        FastPipeline.from_pretrained([target_dir], ngram=True, ngram_store=tmp_path / "none")
    other = NGramStore([[1, 2]], 10).save(tmp_path / "s10")
    with pytest.raises(ValueError, match="10-token vocabulary; the target"):
        FastPipeline.from_pretrained([target_dir], ngram=True, ngram_store=other)


def test_the_embedded_store_is_the_default_targets():
    from pipespec_fast.loading import load_tokenizers
    from pipespec_fast.models.defaults import DRAFT_DIR, NGRAM_STORE_DIR

    meta = json.loads((NGRAM_STORE_DIR / "store.json").read_text())
    vocab = load_tokenizers([DRAFT_DIR])[0].get_vocab()  # the target's, by check_tokenizers
    cfg = json.loads((DRAFT_DIR / "config.json").read_text())
    assert meta["vocab_sha256"] == vocab_fingerprint(vocab)
    assert meta["vocab_size"] == cfg["vocab_size"]
    store = NGramStore.load(NGRAM_STORE_DIR)
    assert store.tokens == meta["tokens"] > 500_000 and len(store) > 1_000_000


def test_load_keeps_the_built_tables_in_a_cache(tmp_path, monkeypatch):
    from pipespec_fast.stages import ngram_store

    monkeypatch.setattr(ngram_store, "CACHE_MIN_TOKENS", 0)  # cache even this small store
    rng = random.Random(5)
    seqs = [[rng.randrange(30) for _ in range(50)] for _ in range(20)]
    d = NGramStore(seqs, 30).save(tmp_path / "s")
    cache = tmp_path / "cache"
    first = NGramStore.load(d, cache)
    (f,) = cache.glob("ngram-store-*.npz")
    second = NGramStore.load(d, cache)
    assert (first.from_cache, second.from_cache) == (False, True)
    for s in seqs[:4]:
        for end in range(len(s)):
            assert second.lookup(s, end) == first.lookup(s, end)
    # a damaged cache, or one whose arrays do not fit the store, is rebuilt and rewritten
    f.write_bytes(b"not an npz")
    assert not NGramStore.load(d, cache).from_cache and NGramStore.load(d, cache).from_cache
    np.savez(f, **{**first.tables(), "best2": first.best[2].astype(np.int64)})
    assert not NGramStore.load(d, cache).from_cache
    np.savez(f, **{**first.tables(), "keys3": first.keys[3][::-1].copy()})  # not sorted
    assert not NGramStore.load(d, cache).from_cache
    tables = first.tables()
    damaged = [
        {k: v for k, v in tables.items() if k != "keys4"},  # an order missing
        {**tables, "keys2": np.sort(np.r_[tables["keys2"], tables["keys2"][:1]]),
         "best2": np.r_[tables["best2"], tables["best2"][:1]]},  # a key twice
        {**tables, "best5": np.full_like(tables["best5"], 30)},  # ids outside [0, 30)
    ]
    for bad in damaged:
        np.savez(f, **bad)
        assert not NGramStore.load(d, cache).from_cache
    assert NGramStore.load(d, cache).from_cache  # rewritten whole
    whole = f.read_bytes()
    for broken in (whole[: len(whole) // 2],  # truncated
                   whole[:-30] + bytes([whole[-30] ^ 0xFF]) + whole[-29:],  # a bit flipped
                   b"PK\x03\x04" + whole[4:200]):  # a zip header and little else
        f.write_bytes(broken)
        store = NGramStore.load(d, cache)
        assert not store.from_cache and store.lookup(seqs[0], 10) == first.lookup(seqs[0], 10)
        assert NGramStore.load(d, cache).from_cache
    assert not list(cache.glob("*.tmp"))
    # another store's files make another cache entry; a store under the size bar makes none
    NGramStore.load(NGramStore(seqs[:5], 30).save(tmp_path / "t"), cache)
    assert len(list(cache.glob("ngram-store-*.npz"))) == 2
    monkeypatch.setattr(ngram_store, "CACHE_MIN_TOKENS", 10_000)
    NGramStore.load(NGramStore(seqs[:6], 30).save(tmp_path / "u"), cache)
    assert len(list(cache.glob("ngram-store-*.npz"))) == 2
