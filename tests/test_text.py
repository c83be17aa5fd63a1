"""Detokenisation for the caller (``pipespec_fast.text``) with a real byte-level tokenizer:
incremental pieces, incomplete UTF-8 held back, stop strings (also cut across tokens, and a
held-back stop prefix released when the text moves on), the ids a stop keeps, and where
``Output`` ends a generation."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from pipespec_fast.text import Detokenizer, Output

TEXT = "héllo wörld"  # 'é' and 'ö' are two bytes, so two tokens each


@pytest.fixture(scope="module")
def tok():
    """One token per byte (GPT-2's byte alphabet, no merges): a multi-byte character always
    spans two tokens, as rare characters do in real byte-level BPE vocabularies."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    t = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=t)


def feed_one_by_one(d: Detokenizer, ids: list[int]) -> list[tuple[str, bool]]:
    """What the caller sees as the target verifies one more token at a time."""
    return [d.feed(ids[:k]) for k in range(1, len(ids) + 1)]


def test_pieces_concatenate_to_the_full_text(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert len(ids) == 13
    d = Detokenizer(tok, None)
    pieces = [p for p, hit in feed_one_by_one(d, ids)]
    assert "".join(pieces) + d.flush(ids) == TEXT
    assert d.text == TEXT


def test_incomplete_utf8_is_held_back_until_the_character_completes(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    d = Detokenizer(tok, None)
    seen = feed_one_by_one(d, ids[:4])
    # 'h', then the first byte of 'é' (decodes to U+FFFD: held), then 'é' whole, then 'l'
    assert seen == [("h", False), ("", False), ("é", False), ("l", False)]
    assert "\ufffd" not in d.text


def test_stop_string_cut_across_two_tokens(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    d = Detokenizer(tok, ["lo"])
    seen = feed_one_by_one(d, ids[:6])
    # 'l' may start the stop string: held until the next token decides; 'll': the first 'l'
    # is text, the second may start it; 'llo' completes it
    assert seen == [("h", False), ("", False), ("é", False), ("", False), ("l", False),
                    ("", True)]
    assert d.text == "hél"
    assert d.flush(ids[:6]) == ""  # nothing after a stop
    assert d.kept_ids(ids[:6]) == ids[:4]  # h, é (two tokens), l: the shortest prefix


def test_held_back_stop_prefix_is_released_when_the_next_token_breaks_it(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    d = Detokenizer(tok, ["wörx"])
    seen = feed_one_by_one(d, ids[:11])  # up to "héllo wör": it may still become "wörx"
    assert [p for p, _ in seen] == ["h", "", "é", "l", "l", "o", " ", "", "", "", ""]
    assert d.text == "héllo "
    assert d.feed(ids[:12]) == ("wörl", False)  # 'l' breaks it: the held text comes out
    assert d.feed(ids) == ("d", False)
    assert d.text == TEXT


def test_kept_ids_of_a_stop_inside_the_text(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    d = Detokenizer(tok, [" wö", "xyz"])
    pieces = feed_one_by_one(d, ids)
    hit_at = next(k for k, (_, hit) in enumerate(pieces) if hit)
    assert hit_at == 9  # the token that completes 'ö'
    assert d.text == "héllo"
    assert d.kept_ids(ids[: hit_at + 1]) == ids[:6]


def test_not_incremental_decodes_once_at_the_end(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    d = Detokenizer(tok, None, incremental=False)
    assert feed_one_by_one(d, ids) == [("", False)] * len(ids)
    assert d.flush(ids) == TEXT


def test_output_ends_at_eos_length_or_stop(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    out = Output(Detokenizer(tok, None), max_new_tokens=100, eos_ids={ids[5]})
    out.feed(ids[:3])
    assert not out.done
    assert out.feed(ids[3:9]) == "llo"  # the eos token ('o') ends it; the rest is dropped
    assert out.done and out.reason == "eos" and out.ids == ids[:6]
    assert out.finish() == "" and out.detok.text == "héllo"

    out = Output(Detokenizer(tok, None), max_new_tokens=7, eos_ids=set())
    assert out.feed(ids[:4]) == "hél" and not out.done
    out.feed(ids[4:])  # cut mid-chunk at 7 tokens
    assert out.done and out.reason == "length" and out.ids == ids[:7]

    out = Output(Detokenizer(tok, ["wö"]), max_new_tokens=100, eos_ids=set())
    out.feed(ids)
    assert out.done and out.reason == "stop"
    assert out.finish() == "" and out.ids == ids[:7] and out.detok.text == "héllo "
