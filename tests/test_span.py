"""``TokenSpan`` (tokens, rows and confidence flags kept in step) and ``Mirror`` (a stage's
copy of the stage below): adoption of chunks inside, at and after the agreement, the agreement
moving, and the drafts offered stopping at the first guess."""

import pytest
import torch

from pipespec_fast.decoding.span import TokenSpan
from pipespec_fast.pipespec.messages import Chunk
from pipespec_fast.pipespec.mirror import Mirror


def row(i: int) -> torch.Tensor:
    return torch.full((4,), float(i))


def drafted(tokens, confident=None) -> TokenSpan:
    """Tokens a stage drafted itself: each with its own row."""
    return TokenSpan(list(tokens), [row(t) for t in tokens],
                     list(confident) if confident is not None else None)


# ----------------------------------------------------------------------------- TokenSpan


def test_known_tokens_have_no_rows_and_are_confident():
    prompt = [5, 6, 7]
    s = TokenSpan.known(prompt)
    prompt.append(8)  # a copy: the caller's list is not shared
    assert s.tokens == [5, 6, 7] and s.rows == [None] * 3 and s.confident == [True] * 3
    assert len(s) == 3


def test_changes_keep_the_three_lists_in_step():
    s = TokenSpan.known([1, 2])
    s.append(3, row(3), False)
    s.extend_known([4, 5], [row(4), row(5)])
    s.extend(drafted([6], [False]))
    s.extend_known([7])
    assert s.tokens == [1, 2, 3, 4, 5, 6, 7]
    assert s.confident == [True, True, False, True, True, False, True]
    assert [r if r is None else int(r[0]) for r in s.rows] == [None, None, 3, 4, 5, 6, None]
    s.truncate(3)
    assert (s.tokens, s.confident, s.rows[2] is not None) == ([1, 2, 3], [True, True, False],
                                                             True)
    assert len(s.rows) == 3


def test_a_slice_is_a_span_of_copies():
    s = drafted([1, 2, 3, 4], [True, False, True, True])
    part = s[1:3]
    assert isinstance(part, TokenSpan)
    assert part.tokens == [2, 3] and part.confident == [False, True]
    assert part.rows[0] is s.rows[1]  # rows are shared tensors, the lists are new
    part.truncate(0)
    assert s.tokens == [1, 2, 3, 4] and len(s.rows) == 4
    assert s[3:].tokens == [4] and s[9:].tokens == []
    with pytest.raises(TypeError):
        s[1]
    with pytest.raises(TypeError):
        s[::2]


def test_lists_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="2 tokens, 1 rows"):
        TokenSpan([1, 2], [None])


def test_common_prefix():
    s = TokenSpan.known([1, 2, 3, 4])
    assert s.common_prefix([1, 2, 9, 4]) == 2
    assert s.common_prefix([1, 2, 3, 4, 5, 6]) == 4  # the shorter one ends
    assert s.common_prefix([1, 2]) == 2
    assert s.common_prefix([1, 2, 3, 9], start=2) == 3  # known to agree before start
    assert s.common_prefix([1], start=3) == 3  # start already past the shorter end


def test_usable_drafts_stop_at_the_first_guess():
    s = TokenSpan.known([1, 2])
    s.extend(drafted([3, 4, 5, 6], [True, True, False, True]))
    assert s.usable(2, 10) == ([3, 4], None)
    assert s.usable(2, 1) == ([3], None)
    assert s.usable(4, 3) == ([], None)  # the guess comes first
    assert s.usable(5, 3) == ([6], None)
    assert s.usable(2, 0) == ([], None) and s.usable(2, -3) == ([], None)
    assert s.usable(6, 4) == ([], None)  # at the end
    toks, rows = s.usable(2, 10, with_rows=True)
    assert toks == [3, 4] and [int(r[0]) for r in rows] == [3, 4]


def test_usable_with_rows_stops_at_the_first_token_without_one():
    s = drafted([3, 4])
    s.extend_known([5])  # adopted: confident, but no row to verify it with under sampling
    s.extend(drafted([6]))
    assert s.usable(0, 9) == ([3, 4, 5, 6], None)  # greedy needs no rows
    toks, rows = s.usable(0, 9, with_rows=True)
    assert toks == [3, 4] and len(rows) == 2
    assert s.usable(2, 9, with_rows=True) == ([], [])


# ----------------------------------------------------------------------------- Mirror


def mirror_agreeing_to(n: int) -> Mirror:
    """A mirror of [1..4] + drafts [5, 6, 7] whose stage holds [1..4] + [5, 6]: agree = 6."""
    m = Mirror([1, 2, 3, 4])
    m.apply(Chunk(4, drafted([5, 6, 7])))
    assert m.common_prefix([1, 2, 3, 4, 5, 6]) == 6 and m.agree == 6
    return m


def test_chunk_inside_the_agreement_replaces_the_tail_and_lowers_it():
    m = mirror_agreeing_to(6)
    m.apply(Chunk(5, drafted([8, 9])))  # the stage below rolled back to 5 and redrafted
    assert m.span.tokens == [1, 2, 3, 4, 5, 8, 9] and m.agree == 5
    assert [int(r[0]) for r in m.span.rows[5:]] == [8, 9]
    assert m.common_prefix([1, 2, 3, 4, 5, 6]) == 5  # 8 != 6: it stays


def test_chunk_at_or_after_the_agreement_keeps_it():
    m = mirror_agreeing_to(6)
    m.apply(Chunk(6, drafted([8])))  # at: replaces the draft past our sequence
    assert m.span.tokens == [1, 2, 3, 4, 5, 6, 8] and m.agree == 6
    m.apply(Chunk(7, drafted([9, 10])))  # after: appends
    assert m.span.tokens == [1, 2, 3, 4, 5, 6, 8, 9, 10] and m.agree == 6
    assert len(m.span.rows) == len(m.span.confident) == 9


def test_agreement_moves_forward_with_our_sequence_and_back_on_our_change():
    m = mirror_agreeing_to(6)
    assert m.common_prefix([1, 2, 3, 4, 5, 6, 7, 11]) == 7
    m.own_changed(3)  # we adopted a sync from above from position 3
    assert m.agree == 3
    assert m.common_prefix([1, 2, 3, 9]) == 3


def test_offer_drafts_past_our_sequence_only_when_the_mirror_agrees():
    m = Mirror([1, 2, 3])
    m.apply(Chunk(3, drafted([4, 5, 6], [True, True, False])))
    assert m.offer([1, 2, 3], 8, with_rows=False) == ([4, 5], None, True)
    toks, rows, spoke = m.offer([1, 2, 3, 4], 8, with_rows=True)
    assert toks == [5] and int(rows[0][0]) == 5 and spoke
    assert m.offer([1, 2, 3, 4, 5], 8, with_rows=False) == ([], None, True)  # only a guess
    assert m.offer([1, 2, 3, 4, 5, 6], 8, with_rows=False) == ([], None, False)  # silent
    # our sequence went another way: nothing until the stage below follows (its next Chunk)
    m = Mirror([1, 2, 3])
    m.apply(Chunk(3, drafted([4, 5])))
    assert m.offer([1, 2, 3, 9], 8, with_rows=True) == ([], None, False)
    m.apply(Chunk(3, drafted([9, 7])))
    assert m.offer([1, 2, 3, 9], 8, with_rows=False) == ([7], None, True)


def test_forget_rows_drops_rows_before_a_position_and_survives_truncation():
    s = drafted([5, 6, 7, 8])
    s.forget_rows(2)
    assert [r is None for r in s.rows] == [True, True, False, False]
    s.forget_rows(1)  # never un-forgets, never moves back
    assert s.rows_from == 2
    s.truncate(1)
    s.append(9, row(9), True)
    assert s.rows_from == 1 and s.rows[1] is not None
    s.forget_rows(10)  # past the end: every row
    assert s.rows == [None, None]


def test_the_mirror_forgets_rows_of_positions_we_hold():
    m = Mirror([1, 2])
    m.apply(Chunk(2, drafted([3, 4, 5])))
    drafts, rows, _ = m.offer([1, 2, 3], 4, with_rows=True)
    assert drafts == [4, 5] and len(rows) == 2
    assert m.span.rows[2] is None and m.span.rows[3] is not None


def test_the_target_keeps_no_rows_and_a_synced_stage_drops_them():
    from tiny import family

    from pipespec_fast.decoding.sampling import SamplingParams
    from pipespec_fast.decoding.sequence import Sequencer
    from pipespec_fast.stages import LlamaStage

    params = SamplingParams(temperature=1.0, seed=1)
    top = Sequencer(LlamaStage(family(1)[0], max_len=64), params, 1, keep_rows=False)
    low = Sequencer(LlamaStage(family(1, seed=2)[0], max_len=64), params, 0)
    for s in (top, low):
        s.start([1, 2, 3])
        s.draft(4)
    assert all(r is None for r in top.span.rows)
    assert [r is not None for r in low.span.rows] == [False] * 3 + [True] * 4
    top.verify(low.seq[3:5], low.span.rows[3:5])
    assert all(r is None for r in top.span.rows)
    low.apply_sync(3, top.seq[3:])  # the stage above now holds these positions
    held = len(top.seq)
    assert all(r is None for r in low.span.rows[:held])
    assert all(r is not None for r in low.span.rows[held:])
