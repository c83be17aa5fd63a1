"""Greedy / stochastic acceptance: Triton == reference (compiled on CUDA tensors where CUDA
exists, the interpreter on CPU tensors elsewhere: ``kernel_device``), and statistical exactness.

The statistics run on a batched re-implementation of the reference (``BatchedReference``),
which is first checked to reproduce ``reference.stochastic_accept`` draw for draw; then
>= 20,000 draws per configuration test by chi-square that the emitted tokens follow the
verifier's distribution. All seeds are fixed, so every p-value is deterministic.
"""

import textwrap
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_device import call
from scipy.stats import chisquare
from triton_compile import run_compile_script

from pipespec_fast import ops, reference
from pipespec_fast.kernels import acceptance as tk

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
M32 = 0xFFFFFFFF
P_MIN = 1e-3  # chi-square acceptance threshold (deterministic: fixed seeds)

# A tree with several children per node: root children 0, 1, 2; 0 -> 3, 4; 1 -> 5; 3 -> 6, 7.
TREE = [-1, -1, -1, 0, 0, 1, 3, 3]
CHAIN = [-1, 0, 1, 2]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def random_tree(data, n: int, chain: bool) -> torch.Tensor:
    if chain:
        return reference.chain_parents(n).long()
    par = [data.draw(st.integers(-1, i - 1)) for i in range(n)]
    return torch.tensor(par, dtype=torch.int64)


# ----------------------------------------------------------------------------- greedy


def greedy_python(toks: list, parents: list, target: list):
    """Plain Python walk: at each node take the first child (lowest index) matching target."""
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        children.setdefault(p, []).append(i)
    path, node = [], -1
    while True:
        want = target[node + 1]
        match = [c for c in children.get(node, []) if toks[c] == want]
        if not match:
            return path, want
        node = match[0]
        path.append(node)


@SETTINGS
@given(data=st.data(), n=st.integers(0, 20), chain=st.booleans(), vocab=st.integers(1, 4))
def test_greedy_reference_python_and_triton_agree(data, n, chain, vocab):
    parents = random_tree(data, n, chain)
    toks = torch.tensor(
        data.draw(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n)), dtype=torch.int64
    )
    target = torch.tensor(
        data.draw(st.lists(st.integers(0, vocab - 1), min_size=n + 1, max_size=n + 1)),
        dtype=torch.int64,
    )
    path, nxt = greedy_python(toks.tolist(), parents.tolist(), target.tolist())
    ref = reference.greedy_accept(toks, parents, target)
    assert ref[0].tolist() == path + [-1] * (n - len(path))
    assert ref[1].dtype == torch.int64 and ref[1].shape == () and int(ref[1]) == len(path)
    assert ref[2].dtype == torch.int64 and ref[2].shape == () and int(ref[2]) == nxt
    tri = call(tk.greedy_accept, toks, parents, target)
    assert same(tri, ref), (tri, ref)


def test_greedy_full_chain_of_64_gives_the_bonus_token():
    toks = torch.arange(64, dtype=torch.int32)  # int32 tokens and parents are accepted too
    target = torch.cat([toks.long(), torch.tensor([999])])
    parents = reference.chain_parents(64)
    for fn in (reference.greedy_accept, lambda *a: call(tk.greedy_accept, *a)):
        path, num, nxt = fn(toks, parents, target)
        assert path.tolist() == list(range(64)) and int(num) == 64 and int(nxt) == 999


# ----------------------------------------------------------------------------- stochastic, exact


def random_probs(gen, rows, V, zeros: bool):
    logits = torch.randn(rows, V, generator=gen) * 2.0
    if zeros and V > 2:  # top-k style support holes
        k = max(1, V // 2)
        kth = torch.topk(logits, k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, -1)


@SETTINGS
@given(
    data=st.data(),
    n=st.integers(0, 24),
    chain=st.booleans(),
    V=st.integers(2, 70),
    zeros=st.booleans(),
    mode=st.sampled_from(["sampled", "random_tokens", "q_equals_p"]),
    seed=st.integers(0, 2**40),
    offset=st.integers(0, 2**33),
)
def test_stochastic_triton_equals_reference(data, n, chain, V, zeros, mode, seed, offset):
    parents = random_tree(data, n, chain)
    gen = torch.Generator().manual_seed(seed % 2**31)
    dp = random_probs(gen, n, V, zeros)
    tp = random_probs(gen, n + 1, V, zeros)
    if mode == "q_equals_p" and n:
        dp = tp[parents + 1].clone()  # drafter == verifier along each edge
    if mode == "random_tokens":
        toks = torch.randint(0, V, (n,), generator=gen)
    else:
        toks = reference.sample_from_probs(dp, seed, offset) if n else torch.zeros(0).long()
    ref = reference.stochastic_accept(toks, parents, dp, tp, seed, offset)
    tri = call(tk.stochastic_accept, toks, parents, dp, tp, seed, offset, block_v=16)
    assert same(tri, ref), (tri, ref)
    if mode == "q_equals_p":
        # p == q on the drafted edges: every draft is accepted down to a leaf.
        assert int(ref[1]) >= (1 if n else 0)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # U == 1.0, see below
def test_stochastic_triton_equals_reference_large_vocab():
    V, n = 49152, 10
    gen = torch.Generator().manual_seed(7)
    parents = torch.tensor([-1, -1, 0, 0, 1, 2, 2, 4, 5, 8])
    tp = torch.softmax(torch.randn(n + 1, V, generator=gen) * 3, -1)
    dp = 0.5 * tp[parents + 1] + 0.5 * torch.softmax(torch.randn(n, V, generator=gen) * 3, -1)
    for offset in range(4):
        toks = reference.sample_from_probs(dp, 11, offset)
        ref = reference.stochastic_accept(toks, parents, dp, tp, 11, offset)
        tri = call(tk.stochastic_accept, toks, parents, dp, tp, 11, offset)  # default BLOCK_V
        assert same(tri, ref), (offset, tri, ref)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 0 / 0
def test_stochastic_chunked_race_merges_like_one_sweep():
    """The race runs over vocabulary chunks and merges their winners: whatever the chunk
    size, ties go to the lowest index across chunks (an all-zero residual: every value ties
    at 0), a NaN anywhere wins at its lowest index, and a residual taken after rejections
    (scratch) is raced as the reference races it."""
    V = 100
    empty = torch.zeros(0).long()
    zero = torch.zeros(1, V)
    nan = torch.full((1, V), 0.01)
    nan[0, 70], nan[0, 45] = float("nan"), float("nan")
    gen = torch.Generator().manual_seed(3)
    tp = torch.softmax(torch.randn(4, V, generator=gen) * 2, -1)
    dp = torch.softmax(torch.randn(3, V, generator=gen) * 2, -1)
    par = torch.tensor([-1, -1, -1])
    toks = (dp / tp[0]).argmax(-1)  # tokens the verifier rejects: the race runs on scratch
    assert int(reference.stochastic_accept(toks, par, dp, tp, 4, 0)[1]) == 0
    for block_v in (16, 32, 128):
        for args in ((empty, empty, torch.zeros(0, V), zero, 1, 2),
                     (empty, empty, torch.zeros(0, V), nan, 1, 2),
                     (toks, par, dp, tp, 4, 0)):
            ref = reference.stochastic_accept(*args)
            assert same(call(tk.stochastic_accept, *args, block_v=block_v), ref), block_v
    assert int(reference.stochastic_accept(empty, empty, torch.zeros(0, V), zero, 1, 2)[2]) == 0
    assert int(reference.stochastic_accept(empty, empty, torch.zeros(0, V), nan, 1, 2)[2]) == 45


def test_stochastic_non_contiguous_probs():
    gen = torch.Generator().manual_seed(1)
    parents = torch.tensor([-1, 0, 0, 1])
    dp = torch.softmax(torch.randn(6, 4, generator=gen), -1).t()  # [4, 6], stride (1, 4)
    tp = torch.softmax(torch.randn(6, 5, generator=gen), -1).t()  # [5, 6]
    toks = torch.tensor([1, 2, 3, 4])
    for offset in range(5):
        ref = reference.stochastic_accept(toks, parents, dp, tp, 3, offset)
        assert same(call(tk.stochastic_accept, toks, parents, dp, tp, 3, offset), ref)


# ----------------------------------------------------------------------------- batched reference


def batched_keys(seed: int, offsets: torch.Tensor, stream: int) -> torch.Tensor:
    """``rng_key`` for many offsets at once (int64 tensor of uint32 values)."""
    f = reference._fmix32
    k = f(torch.tensor((seed & M32) ^ 0x9E3779B9, dtype=torch.int64))
    k = f(k ^ (offsets.to(torch.int64) & M32))
    return f(k ^ ((stream * 0x27D4EB2F) & M32))


def _fmix32_np(x: np.ndarray) -> np.ndarray:
    """murmur3 fmix32 on uint32 arrays (numpy wraps uint32 products, like the kernels)."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> np.uint32(16))


def batched_uniform(keys: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``counter_uniform`` with one key per row: ``[B] x [K] -> [B, K]`` (checked against the
    reference in ``test_batched_helpers_match_reference``)."""
    x = index.numpy().astype(np.uint32) * np.uint32(0x9E3779B1)
    x = _fmix32_np(x[None, :] ^ keys.numpy().astype(np.uint32)[:, None])
    x = _fmix32_np(x ^ np.uint32(0x5BD1E995))
    u = ((x >> np.uint32(9)).astype(np.float32) + np.float32(0.5)) * np.float32(1.0 / 8388608.0)
    return torch.from_numpy(u)


@dataclass
class Bigram:
    """A toy verifier / drafter: next-token distributions given the last token."""

    P: torch.Tensor  # [V, V] verifier
    Qs: list  # per sibling rank: [V, V] drafter (siblings are drawn from their own q)

    @staticmethod
    def make(V, seed, temperature=1.0, top_k=None, top_p=None, n_ranks=3):
        gen = torch.Generator().manual_seed(seed)
        t_logits = torch.randn(V, V, generator=gen)
        P = reference.probs_from_logits(t_logits, temperature, top_k, top_p)
        Qs = []
        for r in range(n_ranks):
            d_logits = t_logits + (0.6 + 0.4 * r) * torch.randn(V, V, generator=gen)
            Qs.append(reference.probs_from_logits(d_logits, temperature, top_k, top_p))
        return Bigram(P, Qs)


class BatchedReference:
    """``reference.stochastic_accept`` for B draws at once (same arithmetic, same RNG)."""

    def __init__(self, parents: list, model: Bigram, seed: int):
        self.parents = parents
        self.model = model
        self.seed = seed
        seen: dict[int, int] = {}
        self.rank = []
        for p in parents:
            self.rank.append(seen.get(p, 0))
            seen[p] = seen.get(p, 0) + 1

    def draft(self, ctx: torch.Tensor, offsets: torch.Tensor):
        """Draft tokens node by node (``sample_from_probs`` rows), and the prob tables."""
        n, V = len(self.parents), self.model.P.shape[0]
        B = ctx.shape[0]
        keys = batched_keys(self.seed, offsets, reference.STREAM_DRAFT)
        toks = torch.zeros(B, n, dtype=torch.int64)
        dp = torch.zeros(B, n, V)
        tp = torch.zeros(B, n + 1, V)
        tp[:, 0] = self.model.P[ctx]
        for i, p in enumerate(self.parents):
            last = ctx if p < 0 else toks[:, p]
            dp[:, i] = self.model.Qs[self.rank[i]][last]
            e = -torch.log(batched_uniform(keys, i * V + torch.arange(V)))
            toks[:, i] = (dp[:, i] / e).argmax(-1)
            tp[:, i + 1] = self.model.P[toks[:, i]]
        return toks, dp, tp

    def accept(self, toks, dp, tp, offsets):
        B, n, V = dp.shape
        u = batched_uniform(
            batched_keys(self.seed, offsets, reference.STREAM_ACCEPT), torch.arange(max(n, 1))
        )
        cur = torch.full((B,), -1, dtype=torch.int64)
        count = torch.zeros(B, dtype=torch.int64)
        path = torch.full((B, n), -1, dtype=torch.int64)
        r = tp[:, 0].clone()
        rows = torch.arange(B)
        for c, p in enumerate(self.parents):
            active = cur == p
            if not bool(active.any()):
                continue
            x = toks[:, c]
            q = dp[:, c]
            mass = r.sum(-1)
            ok = active & (u[:, c] * q[rows, x] * mass < r[rows, x])
            rej = active & ~ok
            r_rej = torch.clamp(r - q * mass[:, None], min=0.0)
            r = torch.where(ok[:, None], tp[:, c + 1], torch.where(rej[:, None], r_rej, r))
            path[rows[ok], count[ok]] = c
            count = count + ok.to(torch.int64)
            cur = torch.where(ok, torch.full_like(cur, c), cur)
        keys_res = batched_keys(self.seed, offsets, reference.STREAM_RESIDUAL)
        e = -torch.log(batched_uniform(keys_res, torch.arange(V)))
        nxt = (r / e).argmax(-1)
        return path, count, nxt

    def emitted(self, ctx, offsets, how_many: int, offset_stride: int):
        """The first ``how_many`` emitted tokens per draw (more rounds where needed)."""
        B = ctx.shape[0]
        out = torch.full((B, how_many), -1, dtype=torch.int64)
        filled = torch.zeros(B, dtype=torch.int64)
        rnd = 0
        while bool((filled < how_many).any()):
            toks, dp, tp = self.draft(ctx, offsets + rnd * offset_stride)
            path, count, nxt = self.accept(toks, dp, tp, offsets + rnd * offset_stride)
            n = len(self.parents)
            acc_toks = torch.where(path >= 0, toks.gather(1, path.clamp(min=0)), -1)
            seq = torch.cat([acc_toks, torch.full((B, 1), -1, dtype=torch.int64)], 1)
            seq[torch.arange(B), count] = nxt  # accepted drafts then the extra token
            for j in range(n + 1):
                take = (j <= count) & (filled < how_many)
                out[torch.arange(B)[take], filled[take]] = seq[take, j]
                filled = filled + take.to(torch.int64)
            ctx = seq[torch.arange(B), count]  # last emitted token
            rnd += 1
        return out


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness of fit; zero-probability cells must be empty, cells with an
    expected count below 5 are pooled."""
    counts = np.asarray(counts, dtype=np.float64).ravel()
    probs = np.asarray(probs, dtype=np.float64).ravel()
    probs = probs / probs.sum()
    assert counts[probs == 0].sum() == 0, "a token with zero verifier probability was emitted"
    keep = probs > 0
    counts, exp = counts[keep], probs[keep] * counts.sum()
    small = exp < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        exp = np.append(exp[~small], exp[small].sum())
    return float(chisquare(counts, exp).pvalue)


SAMPLING = {
    "plain": dict(temperature=1.0),
    "tempered_topk_topp": dict(temperature=0.7, top_k=6, top_p=0.9),
}


def test_batched_helpers_match_reference():
    offsets = torch.tensor([0, 1, 5, 2**32 + 3, 123456789])
    for stream in (0, 1, 2):
        keys = batched_keys(42, offsets, stream)
        for b, off in enumerate(offsets.tolist()):
            assert int(keys[b]) == reference.rng_key(42, off, stream)
            assert torch.equal(
                batched_uniform(keys, torch.arange(50))[b],
                reference.counter_uniform(42, off, stream, torch.arange(50)),
            )


@pytest.mark.parametrize("shape", ["chain", "tree"])
@pytest.mark.parametrize("sampling", list(SAMPLING))
def test_batched_reference_reproduces_reference_draw_for_draw(shape, sampling):
    parents = CHAIN if shape == "chain" else TREE
    model = Bigram.make(10, 1, **SAMPLING[sampling])
    sim = BatchedReference(parents, model, seed=9)
    B = 300
    ctx = torch.randint(0, 10, (B,), generator=torch.Generator().manual_seed(2))
    offsets = torch.arange(B) * 7 + 1
    toks, dp, tp = sim.draft(ctx, offsets)
    path, count, nxt = sim.accept(toks, dp, tp, offsets)
    par = torch.tensor(parents)
    for b in range(B):
        off = int(offsets[b])
        assert torch.equal(toks[b], reference.sample_from_probs(dp[b], 9, off))
        ref = reference.stochastic_accept(toks[b], par, dp[b], tp[b], 9, off)
        assert same((path[b], count[b], nxt[b]), ref), b


# ----------------------------------------------------------------------------- statistics


N_DRAWS = 20_000


@pytest.mark.parametrize("shape", ["chain", "tree"])
@pytest.mark.parametrize("sampling", list(SAMPLING))
def test_first_emitted_token_follows_the_verifier(shape, sampling):
    V, ctx0 = 12, 3
    parents = CHAIN if shape == "chain" else TREE
    model = Bigram.make(V, 5, **SAMPLING[sampling])
    sim = BatchedReference(parents, model, seed=2024)
    offsets = torch.arange(N_DRAWS)
    first = sim.emitted(torch.full((N_DRAWS,), ctx0), offsets, 1, N_DRAWS)[:, 0]
    counts = torch.bincount(first, minlength=V).numpy()
    p = model.P[ctx0].numpy()
    assert chi2_pvalue(counts, p) > P_MIN
    # Power check: the drafter's own first tokens fit q but are clearly told apart from p.
    q = model.Qs[0][ctx0].numpy()
    draft_first = torch.bincount(
        sim.draft(torch.full((N_DRAWS,), ctx0), offsets)[0][:, 0], minlength=V
    ).numpy()
    assert chi2_pvalue(draft_first, q) > P_MIN
    assert draft_first[p == 0].sum() > 0 or chi2_pvalue(draft_first, p) < P_MIN


@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_first_two_emitted_tokens_jointly_follow_the_verifier(shape):
    V, ctx0, B = 8, 1, 40_000
    parents = CHAIN if shape == "chain" else TREE
    model = Bigram.make(V, 11)
    sim = BatchedReference(parents, model, seed=77)
    two = sim.emitted(torch.full((B,), ctx0), torch.arange(B), 2, B)
    counts = torch.bincount(two[:, 0] * V + two[:, 1], minlength=V * V).numpy()
    joint = (model.P[ctx0][:, None] * model.P).numpy()  # P(a | ctx0) P(b | a)
    assert chi2_pvalue(counts, joint) > P_MIN


def test_triton_kernel_statistics_and_draws_match_batched_reference():
    """Fewer draws through the (interpreted) kernel: each equals the batched reference, and the
    first emitted token passes the same chi-square test."""
    V, ctx0, B = 8, 2, 600
    model = Bigram.make(V, 21, **SAMPLING["tempered_topk_topp"])
    sim = BatchedReference(TREE, model, seed=5)
    offsets = torch.arange(B)
    ctx = torch.full((B,), ctx0)
    toks, dp, tp = sim.draft(ctx, offsets)
    path, count, nxt = sim.accept(toks, dp, tp, offsets)
    par = torch.tensor(TREE)
    firsts = []
    for b in range(B):
        got = call(tk.stochastic_accept, toks[b], par, dp[b], tp[b], 5, b)
        assert same(got, (path[b], count[b], nxt[b])), b
        firsts.append(int(toks[b, path[b, 0]]) if int(got[1]) > 0 else int(got[2]))
    counts = np.bincount(firsts, minlength=V)
    assert chi2_pvalue(counts, model.P[ctx0].numpy()) > P_MIN


# ----------------------------------------------------------------------------- ops


def test_ops_dispatches_to_triton_when_forced(configure):
    configure(backend="triton")
    parents = torch.tensor(TREE)
    toks = torch.tensor([3, 1, 2, 0, 4, 4, 1, 2])
    target = torch.tensor([1, 0, 4, 5, 5, 5, 5, 5, 5])
    assert same(
        call(ops.greedy_accept, toks, parents, target),
        reference.greedy_accept(toks, parents, target),
    )
    gen = torch.Generator().manual_seed(0)
    dp, tp = random_probs(gen, 8, 6, False), random_probs(gen, 9, 6, False)
    toks = reference.sample_from_probs(dp, 1, 2)
    assert same(
        call(ops.stochastic_accept, toks, parents, dp, tp, 1, 2),
        reference.stochastic_accept(toks, parents, dp, tp, 1, 2),
    )


def _greedy_args():
    return dict(
        draft_tokens=torch.tensor([1, 2, 3]),
        parents=torch.tensor([-1, 0, 0]),
        target_ids=torch.tensor([1, 2, 3, 4]),
    )


def _stochastic_args():
    gen = torch.Generator().manual_seed(0)
    return dict(
        draft_tokens=torch.tensor([1, 2, 3]),
        parents=torch.tensor([-1, 0, 0]),
        draft_probs=random_probs(gen, 3, 5, False),
        target_probs=random_probs(gen, 4, 5, False),
        seed=1,
        offset=2,
    )


COMMON_BAD = [
    ("draft_tokens", lambda a: a.update(draft_tokens=a["draft_tokens"][None])),
    ("draft_tokens", lambda a: a.update(draft_tokens=a["draft_tokens"].float())),
    (
        "draft_tokens",
        lambda a: a.update(
            draft_tokens=torch.zeros(65, dtype=torch.int64), parents=reference.chain_parents(65)
        ),
    ),
    ("parents", lambda a: a.update(parents=torch.tensor([-1, 0]))),
    ("parents", lambda a: a.update(parents=torch.tensor([-1.0, 0.0, 0.0]))),
    ("parents", lambda a: a.update(parents=torch.tensor([-1, 2, 0]))),  # not topological
    ("parents", lambda a: a.update(parents=torch.tensor([0, 0, 1]))),  # self-parent
    ("parents", lambda a: a.update(parents=torch.tensor([-1, -2, 0]))),
]


@pytest.mark.parametrize(
    "name,mutate",
    COMMON_BAD
    + [
        ("target_ids", lambda a: a.update(target_ids=a["target_ids"][:3])),
        ("target_ids", lambda a: a.update(target_ids=a["target_ids"].float())),
        ("target_ids", lambda a: a.update(target_ids=a["target_ids"].to("meta"))),
    ],
)
def test_greedy_validation_names_the_argument(name, mutate):
    args = _greedy_args()
    mutate(args)
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        ops.greedy_accept(**args)


@pytest.mark.parametrize(
    "name,mutate",
    COMMON_BAD
    + [
        ("draft_probs", lambda a: a.update(draft_probs=a["draft_probs"][:2])),
        ("draft_probs", lambda a: a.update(draft_probs=a["draft_probs"].double())),
        ("draft_probs", lambda a: a.update(draft_probs=a["draft_probs"].to("meta"))),
        ("target_probs", lambda a: a.update(target_probs=a["target_probs"][:, :4])),
        ("target_probs", lambda a: a.update(target_probs=a["target_probs"].half())),
        ("seed", lambda a: a.update(seed=1.5)),
        ("offset", lambda a: a.update(offset=None)),
    ],
)
def test_stochastic_validation_names_the_argument(name, mutate):
    args = _stochastic_args()
    mutate(args)
    if args["draft_tokens"].dim() == 1 and args["draft_tokens"].shape[0] == 65:
        args["draft_probs"] = torch.full((65, 5), 0.2)
        args["target_probs"] = torch.full((66, 5), 0.2)
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        ops.stochastic_accept(**args)


def test_kernels_compile_for_sm80_and_sm90_without_a_gpu():
    """PTX + cubin for sm_80 and sm_90 without a device (subprocess: TRITON_INTERPRET=1 is set
    here): greedy, and the four stochastic passes. The walk must contain no fused multiply-add
    (bit-exact ``r - q * mass``); the race divides with IEEE ``div.rn``. The draft count and
    the per-call RNG keys are not specialised on (no compile mid-generation)."""
    script = textwrap.dedent(
        """
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from pipespec_fast.kernels import acceptance as A
        FLOATS = ("dp_ptr", "tp_ptr", "scratch_ptr", "sums_ptr", "cmax_ptr")
        def sig(k, consts):
            s = {}
            for a in k.arg_names:
                if a in consts:
                    s[a] = "constexpr"
                elif a in FLOATS:
                    s[a] = "*fp32"
                elif a in ("tok_ptr", "tgt_ptr", "path_ptr", "num_ptr", "next_ptr"):
                    s[a] = "*i64"
                elif a.endswith("_ptr"):
                    s[a] = "*i32"
                else:
                    s[a] = "i32"
            return s
        def fixed(k):
            return {p.name for p in k.params if p.do_not_specialize}
        assert fixed(A._greedy_kernel) == {"n"}
        assert fixed(A._stochastic_walk_kernel) == {"n", "key_acc_i32"}
        assert fixed(A._race_chunks_kernel) == {"key_res_i32"}
        no_fusion = dict(enable_fp_fusion=False)
        for arch in (80, 90):
            tgt = GPUTarget("cuda", arch, 32)
            for k, c, opts in (
                (A._greedy_kernel, dict(BLOCK=64), {}),
                (A._row_sums_kernel, dict(BLOCK_V=2048), no_fusion),
                (A._stochastic_walk_kernel, dict(BLOCK=16, BLOCK_V=2048, BLOCK_C=64), no_fusion),
                (A._race_chunks_kernel, dict(BLOCK_V=2048), no_fusion),
                (A._race_combine_kernel, dict(BLOCK_C=64), {}),
            ):
                out = triton.compile(ASTSource(k, sig(k, c), c), target=tgt, options=opts)
                ptx = out.asm["ptx"]
                assert "cubin" in out.asm, (arch, k)
                if k is A._stochastic_walk_kernel:
                    assert "fma.rn.f32" not in ptx
                if k is A._race_chunks_kernel:
                    assert "div.rn.f32" in ptx
        print("OK")
        """
    )
    run_compile_script(script)


# ----------------------------------------------------------------------------- RNG edge case

# (seed 0, offset 4694): counter_uniform(..., STREAM_RESIDUAL, 153) == 1.0 exactly, because
# (2**24 - 1) + 0.5 rounds to 2**24 in fp32. Then E = -log(U) = 0 and r / E is NaN where r == 0.
EDGE_SEED, EDGE_OFFSET, EDGE_INDEX, EDGE_V = 0, 4694, 153, 256


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the 0 / 0
def test_backends_agree_when_a_residual_uniform_is_exactly_one():
    """Whatever the reference does at U == 1.0 (torch.argmax takes the NaN), Triton does too."""
    gen = torch.Generator().manual_seed(4)
    tp = torch.softmax(torch.randn(3, EDGE_V, generator=gen), -1)
    tp[:, EDGE_INDEX] = 0.0  # r(153) == 0: 0 / 0 at the U == 1.0 entry
    tp = tp / tp.sum(-1, keepdim=True)
    dp = torch.softmax(torch.randn(2, EDGE_V, generator=gen), -1)
    for parents, toks in (
        (torch.zeros(0).long(), torch.zeros(0).long()),
        (torch.tensor([-1, -1]), torch.tensor([7, 9])),
    ):
        n = parents.shape[0]
        args = (toks, parents, dp[:n], tp[: n + 1], EDGE_SEED, EDGE_OFFSET)
        ref = reference.stochastic_accept(*args)
        assert same(call(tk.stochastic_accept, *args, block_v=64), ref), (ref,)


def test_counter_uniform_is_strictly_below_one():
    # 23 bits + 0.5 ulp: exact in fp32, so U can never round to 1.0 (E = -log U > 0)
    u = reference.counter_uniform(
        EDGE_SEED, EDGE_OFFSET, reference.STREAM_RESIDUAL, torch.arange(EDGE_V)
    )
    assert float(u.max()) < 1.0
