"""A stage's tree steps: a tree drafter proposes a token tree after its sequence, and the stage
above verifies it in one forward, keeps the accepted path's KV and commits the path plus its
own token.

``Sequencer.verify`` stays the chain step (a chain is the tree ``parents = [-1, 0, ...]`` and
needs no compaction and no ancestor masks beyond the cached chain ones); a tree that happens to
be a chain is sent there.

Verification of tree ``T`` (``n`` nodes) after ``u`` uncached tokens of the verifier's sequence:
the forward feeds ``u + n`` tokens, the uncached ones as a chain and the tree below the last of
them (``parents`` shifted by ``u``); logits of the last ``n + 1`` rows are the verifier's
distribution after its sequence (row 0) and after each node (row ``i + 1``): exactly the rows
the acceptance kernels take. The kernel returns the accepted path; the KV of its nodes is
moved to the slots right after the uncached tokens (``keep_path``: ``kv_compact``), so the
cache ends up as if the path had been fed as a chain. Under sampling each committed token keeps
the verifier's row it was accepted or drawn from: row 0 for the first, row ``path[j - 1] + 1``
for the next ones, the row after the path's last node for the verifier's own token.
"""

from __future__ import annotations

import time

import torch

from pipespec_fast.decoding.captured import MAX_N as MAX_BLOCK
from pipespec_fast.decoding.sampling import NON_FINITE, POINT_MASS, is_point_mass
from pipespec_fast.errors import NonFiniteLogitsError, StageError
from pipespec_fast.stages.tree import DraftTree


def draft_tree(seqr, budget: int, max_depth: int, decay: float = 1.0) -> DraftTree:
    """A tree drafter's proposal after all of ``seqr``'s sequence (its stage declares
    ``tree_drafts``): the uncached tokens are fed first, then ``propose_tree`` (``decay``: the
    verifier's per-level acceptance, ordering the nodes). A model-free drafter's forward is
    its history (no rows); a model drafter's tree grows from the row after the sequence's
    last token, so that token is fed (again, when cached) with its row kept. The sequence
    does not change."""
    stage, seq = seqr.stage, seqr.seq
    model = not stage.capabilities.model_free
    t = time.perf_counter()
    if model and stage.cache_len == len(seq):
        stage.rollback(len(seq) - 1)
    fed = len(seq) - stage.cache_len
    if fed:
        stage.forward(seqr.dev.upload(seq[stage.cache_len :]), last_n=1 if model else 0)
        if model:  # the tree's first level (or a catch-up on what the stage above committed)
            kind = "prefill" if fed > seqr.CATCH_UP else "draft"
            seqr.stats.record_forward(kind, fed, t, time.perf_counter(), seqr.t0)
    try:
        tree = stage.propose_tree(budget, max_depth, decay)
    except NonFiniteLogitsError as e:
        raise StageError(seqr.label, e) from e
    if model:  # the chain's forwards, one per level after the first (LlamaStage)
        steps = getattr(stage, "tree_step_times", ())
        for a, b in steps:
            seqr.stats.record_forward("draft", 1, a, b, seqr.t0)
        if tree and fed <= seqr.CATCH_UP:
            seqr.note_draft_cost((time.perf_counter() - t) / (1 + len(steps)))
    seqr.stats.drafted += len(tree)
    return tree


def tree_rows(seqr, tree: DraftTree) -> torch.Tensor | None:
    """What ``tree``'s nodes were drawn from (sampling): point masses, the drafter being
    deterministic: :data:`~pipespec_fast.decoding.sampling.POINT_MASS`, which the acceptance
    reads as the one-hot rows (``DraftTree.one_hot_rows``) without building them; ``None``
    when greedy."""
    return None if seqr.params.greedy else POINT_MASS


def worth_verifying(policy, tree: DraftTree, uncached: int) -> int:
    """How many of ``tree``'s first nodes to verify (0: decode one token alone): the prefix
    that maximises expected committed tokens per second, ``(1 + sum_i P_i) / L(uncached +
    m)``, with ``P_i = a ** (depth_i + 1) * weight_i`` (the chain model's ``a ** (d + 1)`` for
    the drafter's path of weight 1, scaled by its share of the other branches) and ``L`` the
    verifier's latency line. A verify costs about one token's work per node on a CPU, so
    unlikely branches cost more than they return; on an accelerator (flat ``L``) the line
    keeps them all. All nodes where the policy keeps fixed windows or has no line yet; at
    least the first (a primary node, weight 1): the caller's window (> 0) already decided that
    one draft pays, or explores (an exploratory draft cut away would never re-measure ``a``)."""
    line = policy.line() if policy.adaptive and policy.timed else None
    if line is None or len(tree) == 0:
        return len(tree)
    c0, c1 = line
    a = policy.acceptance
    gain, best_m, best = 1.0, 0, 0.0
    for m, (w, d) in enumerate(zip(tree.weights, tree.depths(), strict=True), 1):
        gain += w * a ** (d + 1)
        rate = gain / (c0 + c1 * (uncached + m))
        if m == 1 or rate > best:
            best, best_m = rate, m
    return best_m


# long: one verify step in order (feed, forward, acceptance, the host read, compaction, commit,
# measurements), the tree twin of Sequencer.verify; split, its locals would be passed around
def verify_tree(seqr, tree: DraftTree, rows: torch.Tensor | None = None) -> int:
    """Verify ``tree`` with ``seqr``'s stage in one forward and commit the outcome (module
    doc); returns the number of drafts accepted. ``rows`` ``[n, V]`` (sampling): the
    distributions the nodes were drawn from (default: :func:`tree_rows`). A block stays within
    ``MAX_BLOCK`` rows (one captured step; batch-invariant mode takes no larger tree): a long
    catch-up is fed first, and the tree is cut to fit after the tokens still uncached."""
    stage, dev = seqr.stage, seqr.dev
    base = stage.cache_len
    if len(seqr.seq) - base > 1 and len(seqr.seq) - base + len(tree) > MAX_BLOCK:
        stage.forward(dev.upload(seqr.seq[base:-1]), last_n=1)  # logits unused
        base = stage.cache_len
    fit = MAX_BLOCK - (len(seqr.seq) - base)
    tree = tree.prefix(min(fit, worth_verifying(seqr.policy, tree, len(seqr.seq) - base)))
    n = len(tree)
    if rows is None:
        rows = tree_rows(seqr, tree)
    point = is_point_mass(rows)
    rows = rows if rows is None or point else rows[:n]
    if tree.is_chain:  # no masks, no compaction: the chain step
        return seqr.verify(list(tree.tokens), None if rows is None else
                           [POINT_MASS] * n if point else list(rows.unbind(0)))
    uncached = seqr.span.tokens[base:]
    u = len(uncached)
    t = time.perf_counter()
    # ids, the tree's parents and the block's (the uncached chain, then the tree below its
    # last token): host lists, uploaded without blocking
    ids = dev.upload(uncached + list(tree.tokens))
    both = dev.upload(list(range(-1, u - 1)) + [p + u for p in tree.parents] + list(tree.parents))
    parents, tree_parents = both[: u + n], both[u + n :]
    logits = stage.forward(ids, parents=parents, last_n=n + 1)  # [n + 1, V]
    path, num, nxt, finite, p = seqr.sampler.accept_tree(ids[u:], tree_parents, logits, rows,
                                                         on_host=not dev.deferred_reads)
    num_i, nxt_i, ok, *path_ids = dev.read(num, nxt, finite, path)  # the step's one host sync
    if not ok:
        e = NonFiniteLogitsError(NON_FINITE)
        raise StageError(seqr.label, e) from e
    kept = path_ids[:num_i]
    stage.keep_path(base + u, path, num_i, chain=kept == list(range(num_i)))
    now = time.perf_counter()
    seqr.stats.record_forward("tree", u + n, t, now, seqr.t0)  # a verify, over a tree
    if u <= seqr.CATCH_UP:  # not a catch-up on many tokens: a verify latency
        seqr.policy.note_latency(u + n, now - t)
    committed = tree.path_tokens(kept)
    committed.append(nxt_i)
    keep = None
    if p is not None and seqr.keep_rows:
        keep = p.index_select(0, dev.upload([0] + [c + 1 for c in kept])).unbind(0)
    seqr.span.extend_known(committed, keep)
    # the walk ended in a rejection unless it reached a leaf: the per-depth acceptance the
    # window rule reads counts the path's levels tried, not the branches never reached
    leaf = bool(kept) and kept[-1] not in tree.parents
    seqr.policy.note_verify(num_i if leaf else num_i + 1, num_i)
    seqr.stats.record_verify(n, num_i, rejected=not leaf, tree=True)
    return num_i
