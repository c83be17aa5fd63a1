"""The int8 compute mode on fp16-stored matrices (a draft's): ``set_compute(m, "int8")`` gives
each a Q8_0 copy (``Linear.packed_int8``) that the fused layers and the head run through the
int8 GEMM; exact mode frees the copies and is unchanged; batch invariance and greedy
losslessness hold with such a draft."""

from __future__ import annotations

import pytest
import torch

from pipespec_fast import FastPipeline, LlamaStage
from pipespec_fast.cpu import decoder as cpu_decoder
from pipespec_fast.cpu import quant
from pipespec_fast.cpu.quant import F16, Q8_0, PackedWeight
from pipespec_fast.models import hf_names
from pipespec_fast.models.packed import set_compute
from tests.test_int8_decoder import CFG, PROMPT, packed_model
from tests.tiny import build, noisy_copy, random_hf_state, tiny_config

pytestmark = pytest.mark.skipif(
    not (cpu_decoder.available() and quant.available()),
    reason="fused decoder and packed kernel need gcc and an AVX-512F/FMA/F16C CPU")


def blocks_model(sd: dict[str, torch.Tensor], cfg, kind_of, compute: str = "int8"):
    """Every matrix held only in the blocks ``kind_of(name)`` says (fp16: as a draft
    checkpoint stored in fp16 is)."""
    return packed_model(sd, cfg, compute, kinds=kind_of)


def fp16_model(sd: dict[str, torch.Tensor], cfg, compute: str = "int8"):
    return blocks_model(sd, cfg, lambda name: F16, compute)


def test_int8_mode_runs_fp16_matrices_as_q8_0_copies_and_exact_mode_frees_them() -> None:
    cfg = tiny_config(**CFG)
    sd = random_hf_state(cfg, 21, std=0.2)
    m, exact = fp16_model(sd, cfg, "int8"), fp16_model(sd, cfg, "exact")
    ids = torch.arange(13)
    y8 = m(ids, m.new_cache(16))
    kinds = {row.kind[j] for row in m._plan.table for j in range(4)}
    assert kinds == {Q8_0}
    for mod in (m.layers[0].attention.wqkv, m.layers[2].feed_forward.w2, m.output):
        assert mod.packed.kind == F16 and mod.packed_int8.kind == Q8_0
        want = quant.quantize(mod.packed.dequantize(), Q8_0)
        assert torch.equal(mod.packed_int8.data, want)
    # the head and the layers alike: the same logits as a model whose matrices were stored
    # as those Q8_0 blocks in the first place (the embedding's rows are gathered, not
    # multiplied: they stay fp16)
    as_q8 = {name: PackedWeight(quant.quantize(w.float(), F16), F16, w.shape[1]).dequantize()
             for name, w in sd.items() if w.dim() == 2 and name != hf_names.FINAL_NORM}
    ref = blocks_model({**sd, **as_q8}, cfg,
                       lambda name: F16 if name == hf_names.EMBED else Q8_0)
    assert torch.equal(y8, ref(ids, ref.new_cache(16)))
    set_compute(m, "exact")
    assert all(getattr(mod, "packed_int8", None) is None for mod in m.modules())
    y = m(ids, m.new_cache(16))
    assert {row.kind[j] for row in m._plan.table for j in range(4)} == {F16}
    assert torch.equal(y, exact(ids, exact.new_cache(16)))
    assert not torch.equal(y, y8)


def test_int8_fp16_block_equals_tokens_one_by_one() -> None:
    m = fp16_model(random_hf_state(tiny_config(**CFG), 22, std=0.2), tiny_config(**CFG))
    ids = torch.randint(0, 80, (20,), generator=torch.Generator().manual_seed(23))
    c = m.new_cache(64)
    m(ids[:7], c)
    singles = torch.cat([m(ids[i : i + 1], c) for i in range(7, 16)])
    c.rollback(7)
    assert torch.equal(m(ids[7:16], c), singles)


@pytest.mark.parametrize("mode", ["pipespec", "sync"])
def test_int8_pipeline_with_an_fp16_draft_equals_int8_ar(mode) -> None:
    cfg = tiny_config(**CFG)
    target = random_hf_state(cfg, 24, std=0.2)
    draft = fp16_model(noisy_copy(target, 0.05, 25), cfg)
    stages = [LlamaStage(draft, name="draft", max_len=256),
              LlamaStage(packed_model(target, cfg), name="target", max_len=256)]
    want = FastPipeline(stages[-1:]).generate(PROMPT, 40, ignore_eos=True).token_ids
    res = FastPipeline(stages, mode=mode, adaptive_windows=False).generate(
        PROMPT, 40, ignore_eos=True)
    assert res.token_ids == want
    tgt = res.stage_stats[-1]
    assert tgt.proposed > 0 and 0 < tgt.accepted < tgt.proposed


def test_default_modes_drafts_follow_an_int8_target() -> None:
    """``from_pretrained``'s default: the target's own default; a draft holding packed
    matrices (fp16 here) follows an int8 target, and keeps its own default otherwise."""
    from pipespec_fast.models.packed import default_modes

    cfg = tiny_config(**CFG)
    sd = random_hf_state(cfg, 26, std=0.2)
    half, q = fp16_model(sd, cfg, "exact"), packed_model(sd, cfg, "exact")
    dense = build(cfg, sd)
    assert default_modes([half, dense, q]) == ["int8", "exact", "int8"]
    assert default_modes([half, half]) == ["exact", "exact"]  # an fp16 target stays exact
    assert default_modes([q]) == ["int8"] and default_modes([]) == []


@pytest.mark.parametrize("tie", [False, True])
def test_requantize_fp16_holds_q8_0_blocks_only(tie) -> None:
    """A draft's fp16 matrices replaced by their Q8_0 blocks (embedding included; a tied head
    keeps sharing the embedding's rows): the logits of a model stored as those blocks, in
    both modes, and no fp16 copy left."""
    from pipespec_fast.models.packed import requantize_fp16

    cfg = tiny_config(**CFG, tie=tie)
    sd = random_hf_state(cfg, 27, std=0.2)
    m = fp16_model(sd, cfg, "exact")
    before = m.packed_bytes()
    assert requantize_fp16(m) == 4 * cfg.n_layers + (1 if tie else 2)
    assert m.packed_bytes() < 0.6 * before
    kinds = {mod.packed.kind for mod in m.modules() if getattr(mod, "packed", None) is not None}
    assert kinds == {Q8_0}
    if tie:
        assert m.output.packed.data.data_ptr() == m.tok_embeddings.packed.data.data_ptr()
    as_q8 = {name: PackedWeight(quant.quantize(w.float(), F16), F16, w.shape[1]).dequantize()
             for name, w in sd.items() if w.dim() == 2 and name != hf_names.FINAL_NORM}
    ids = torch.arange(13)
    for mode in ("exact", "int8"):
        ref = blocks_model({**sd, **as_q8}, cfg, lambda name: Q8_0, mode)
        set_compute(m, mode)
        assert torch.equal(m(ids, m.new_cache(16)), ref(ids, ref.new_cache(16))), mode


def test_default_compute_is_exact_where_only_the_portable_int8_path_runs() -> None:
    """Without AVX-512 VNNI or AVX2 the int8 products run in portable C, slower than the exact
    path: the default is then exact (int8 stays available by name, with the same bits)."""
    from pipespec_fast.cpu import int8
    from pipespec_fast.models.packed import default_compute

    cfg = tiny_config(**CFG)
    m = packed_model(random_hf_state(cfg, 28, std=0.2), cfg, "exact")
    assert default_compute(m) == "int8"
    try:
        assert int8.set_isa("scalar") == "scalar"
        assert default_compute(m) == "exact"
    finally:
        int8.set_isa("auto")
    assert default_compute(m) == "int8"
