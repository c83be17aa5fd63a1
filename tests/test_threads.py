"""The CPU thread policy as a pure function (``threads.plan_threads``) and the context manager
that applies a plan for one generation and restores the previous settings."""

from __future__ import annotations

import sys

import pytest
import torch
from tiny import family

from pipespec_fast import LlamaStage, NGramStage, threads
from pipespec_fast.config import RuntimeConfig, from_env
from pipespec_fast.cpu import linear
from pipespec_fast.threads import ThreadPlan, plan_threads

DEFAULT = RuntimeConfig()
NG_DRAFT_TARGET = (True, False, False)  # n-gram -> draft -> target
MODELS3 = (False, False, False)

# id, model_free, mode, free cores, total cores, config, expected plan
# (matmul_threads, stage_threads, idle_stages, torch_threads); every plan here is active
CASES = [
    ("2 cores, 3 stages: target keeps both, drafter idle", NG_DRAFT_TARGET, "pipespec", 2, 2,
     DEFAULT, (1, (None, 1, 2), (False, True, False), 1)),
    ("2 cores, 3 models: both drafters idle", MODELS3, "pipespec", 2, 2, DEFAULT,
     (1, (1, 1, 2), (True, True, False), 1)),
    ("8 free cores: drafter one core, target the rest", NG_DRAFT_TARGET, "pipespec", 8, 8,
     DEFAULT, (1, (None, 1, 7), (False, False, False), 1)),
    ("8 free cores, 3 models", MODELS3, "pipespec", 8, 8, DEFAULT,
     (1, (1, 1, 6), (False, False, False), 1)),
    ("loaded machine: 1 of 2 cores free, no idle drafters", NG_DRAFT_TARGET, "pipespec", 1, 2,
     DEFAULT, (1, (None, 1, 1), (False, False, False), 1)),
    ("loaded machine: 2 of 4 free", NG_DRAFT_TARGET, "pipespec", 2, 4, DEFAULT,
     (1, (None, 1, 1), (False, False, False), 1)),
    ("loaded machine: 3 of 4 free", NG_DRAFT_TARGET, "pipespec", 3, 4, DEFAULT,
     (1, (None, 1, 2), (False, False, False), 1)),
    ("AR: one thread per free core", (False,), "ar", 2, 2, DEFAULT,
     (2, (None,), (False,), 1)),
    ("sync: one thread per free core", NG_DRAFT_TARGET, "sync", 6, 8, DEFAULT,
     (6, (None, None, None), (False, False, False), 1)),
    ("PipeSpec with one model stage computes alone", (True, False), "pipespec", 4, 4, DEFAULT,
     (4, (None, None), (False, False), 1)),
    ("cpu_threads replaces the free-core count", (False, False), "pipespec", 1, 8,
     DEFAULT.replace(cpu_threads=4), (1, (1, 3), (False, False), 1)),
    ("cpu_threads in AR", (False,), "ar", 1, 8, DEFAULT.replace(cpu_threads=3),
     (3, (None,), (False,), 1)),
    ("stage_threads override", NG_DRAFT_TARGET, "pipespec", 2, 2,
     from_env({"PIPESPEC_STAGE_THREADS": "1,1,1"}), (1, (1, 1, 1), (False, True, False), 1)),
    ("idle_drafters=0 on 2 cores", NG_DRAFT_TARGET, "pipespec", 2, 2,
     DEFAULT.replace(idle_drafters=False), (1, (None, 1, 2), (False, False, False), 1)),
    ("idle_drafters=1 on 8 cores", MODELS3, "pipespec", 8, 8,
     DEFAULT.replace(idle_drafters=True), (1, (1, 1, 6), (True, True, False), 1)),
    ("split system: one core per model stage", NG_DRAFT_TARGET, "pipespec", 2, 2,
     DEFAULT.replace(idle_drafters=False, stage_threads=(1, 1, 1)),
     (1, (1, 1, 1), (False, False, False), 1)),
    ("torch threads", NG_DRAFT_TARGET, "pipespec", 2, 2, DEFAULT.replace(torch_threads=3),
     (1, (None, 1, 2), (False, True, False), 3)),
    ("overrides unused where the stages do not run concurrently", (True, False), "pipespec", 2,
     2, DEFAULT.replace(stage_threads=(5,), idle_drafters=True), (2, (None, None),
                                                                   (False, False), 1)),
]


@pytest.mark.parametrize("model_free,mode,free,total,cfg,want",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan(model_free, mode, free, total, cfg, want):
    assert plan_threads(model_free, mode, free, total, cfg) == ThreadPlan(True, *want)


@pytest.mark.parametrize("mode,want_matmul", [("pipespec", 1), ("sync", 2), ("ar", 2)])
def test_inactive_plan_changes_no_stage(mode, want_matmul):
    """Torch's F.linear or a non-CPU stage: no per-stage threads, no idle priority."""
    plan = plan_threads(NG_DRAFT_TARGET, mode, 2, 2, DEFAULT, active=False)
    assert plan == ThreadPlan(False, want_matmul, (None,) * 3, (False,) * 3, 1)


def test_stage_threads_must_give_one_entry_per_stage():
    cfg = DEFAULT.replace(stage_threads=(1, 2))
    with pytest.raises(ValueError, match=r"^PIPESPEC_STAGE_THREADS \(stage_threads\) 1,2: "
                       "expected 3 comma-separated integers >= 1, one per stage"):
        plan_threads(NG_DRAFT_TARGET, "pipespec", 2, 2, cfg)
    assert plan_threads(NG_DRAFT_TARGET, "sync", 2, 2, cfg).stage_threads == (None,) * 3


def test_cpu_threads_applies_the_plan_and_restores(monkeypatch):
    """CpuThreads sets torch's threads, the matmul threads and the switch interval from its
    plan inside the block and puts the previous values back."""
    monkeypatch.setattr(threads, "_cores", lambda: 2)
    stages = [NGramStage(64, max_len=64)] + [LlamaStage(m, max_len=64) for m in family(2)]
    cfg = DEFAULT.replace(cpu_threads=2, torch_threads=3)
    torch_before, switch_before = torch.get_num_threads(), sys.getswitchinterval()
    matmul_before = linear.set_threads(5)
    try:
        ct = threads.CpuThreads(stages, "pipespec", cfg)
        assert ct.plan == ThreadPlan(linear.own_cpu_matmuls(), 1, (None, 1, 2),
                                     (False, True, False), 3)
        assert ct.stage_threads == (None, 1, 2) and ct.idle_stages == (False, True, False)
        with ct:
            assert torch.get_num_threads() == 3 and linear.current_threads() == 1
            assert sys.getswitchinterval() == pytest.approx(threads.SWITCH_INTERVAL_S)
        assert torch.get_num_threads() == torch_before
        assert sys.getswitchinterval() == switch_before
        assert linear.current_threads() == 5
        with threads.CpuThreads(stages[-1:], "ar", cfg):  # AR: both cores, no idle drafter
            assert linear.current_threads() == 2 and sys.getswitchinterval() == switch_before
        assert linear.current_threads() == 5
    finally:
        linear.set_threads(matmul_before)


@pytest.mark.parametrize("cores,env,kwargs,with_draft", [
    (2, {}, {}, False), (3, {}, {}, False), (4, {}, {}, True), (16, {}, {}, True),
    (2, {}, {"device": "cuda"}, True), (2, {}, {"device": torch.device("cuda:1")}, True),
    (2, {}, {"distributed": True}, True), (2, {}, {"devices": ["cpu", "cpu"]}, True),
    (2, {}, {"windows": [0, 6, 6]}, True), (2, {}, {"max_leads": [4, 4, 4]}, True),
    (2, {}, {"threads": [1, 1, 1]}, True), (2, {}, {"ngram": False}, True),
    (16, {}, {"draft": False}, False), (2, {}, {"draft": True}, True),
    (2, {}, {"config": {"cpu_threads": 4}}, True), (16, {}, {"config": {"cpu_threads": 3}}, False),
    (2, {"PIPESPEC_CPU_THREADS": "4"}, {}, True), (16, {"PIPESPEC_CPU_THREADS": "2"}, {}, False),
    (2, {"PIPESPEC_STAGE_THREADS": "1,1,1"}, {}, True),
    (2, {}, {"config": {"stage_threads": (1, 1, 1)}}, True)])
def test_the_default_includes_its_draft_where_it_gets_a_core(monkeypatch, cores, env, kwargs,
                                                            with_draft):
    """``from_default()`` leaves the draft out on a CPU with fewer than 4 usable cores (the
    affinity mask, or ``cpu_threads`` where configured: argument or environment), keeps it on
    a GPU and wherever the request is sized for it (distributed, per-stage arguments, per-stage
    threads, no n-gram drafter), and obeys ``draft=``; nothing loads here."""
    from pipespec_fast import FastPipeline
    from pipespec_fast import config as runtime_config
    from pipespec_fast.models import defaults

    seen = {}
    monkeypatch.setattr(threads, "_cores", lambda: cores)
    monkeypatch.setattr(defaults, "default_model_dirs", lambda: ["/d/draft", "/d/target"])
    monkeypatch.setattr(defaults, "default_target_dir", lambda: "/d/target")
    monkeypatch.setattr(FastPipeline, "from_pretrained",
                        classmethod(lambda cls, paths, **kw: seen.update(paths=paths, kw=kw)))
    kwargs = dict(kwargs)
    if "config" in kwargs:
        kwargs["config"] = RuntimeConfig().replace(**kwargs["config"])
    with runtime_config.use(from_env(env)):  # not the environment this test runs in
        FastPipeline.from_default(**kwargs)
    assert seen["paths"] == (["/d/draft", "/d/target"] if with_draft else ["/d/target"])
    assert seen["kw"]["ngram"] is kwargs.get("ngram", True)


@pytest.mark.parametrize("draft,needle", [(1, "draft: expected True, False or None, got 1"),
                                          ("yes", "draft: expected"),
                                          (None, "config: expected a RuntimeConfig")])
def test_from_default_refuses_a_bad_draft_or_config_before_loading(monkeypatch, draft, needle):
    from pipespec_fast import FastPipeline

    def refuse(cls, *a, **k):
        raise AssertionError("loaded before the arguments were checked")

    monkeypatch.setattr(FastPipeline, "from_pretrained", classmethod(refuse))
    with pytest.raises(ValueError, match=f"^{needle}"):
        FastPipeline.from_default(draft=draft, config={"cpu_threads": 4})
