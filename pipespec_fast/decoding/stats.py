"""``StageStats``: what one stage did during a generation, and its translation into the
analytical model's input (``FastPipeline.predict``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipespec_fast.analysis import acceptance_estimate


@dataclass
class StageStats:
    """What one stage did during a generation (all counts in tokens unless named otherwise)."""

    name: str
    drafted: int = 0  # tokens this stage generated with its own model (not by verifying)
    proposed: int = 0  # draft tokens from the stage below that this stage verified
    accepted: int = 0  # of those, accepted
    rejected: int = 0  # verification steps that ended in a rejection
    rollbacks: int = 0  # times a sync from above truncated this stage's sequence
    forwards: int = 0  # model forward calls
    verify_steps: int = 0  # verify steps, those without drafts (a token alone) included
    tree_steps: int = 0  # of those, over a tree with branches (decoding/tree_step.py)
    busy_s: float = 0.0
    idle_s: float = 0.0
    timeline: list[tuple[float, float, str]] = field(default_factory=list)
    forward_latency: dict[int, list[float]] = field(default_factory=dict)
    # per draft depth d (index d - 1): verifications whose walk tried a draft at depth d, and
    # those that accepted it (a chain tries depths 1..accepted + 1; a tree the same along
    # the path it walked, one try per depth whatever the number of siblings)
    depth_tried: list[int] = field(default_factory=list)
    depth_accepted: list[int] = field(default_factory=list)
    # the target under a regime bandit (decoding/regime.py): the regime of its current step,
    # and the same counts and latencies per regime (each verifies other drafts, and runs beside
    # other threads), for the per-regime prediction (analysis.predict_regimes)
    arm: str | None = None
    by_arm: dict[str, StageStats] = field(default_factory=dict)

    def set_arm(self, arm: str) -> None:
        """The following steps run in regime ``arm``."""
        if arm not in self.by_arm:
            self.by_arm[arm] = StageStats(self.name)
        self.arm = arm

    def record_forward(self, kind: str, n: int, start: float, end: float, t0: float) -> None:
        """A forward of ``n`` tokens (``kind``: prefill, draft, verify, or tree: a verify over
        a token tree) ran from ``start`` to ``end`` (``perf_counter`` seconds; ``t0``: the
        generation's start)."""
        self.forwards += 1
        self.busy_s += end - start
        self.timeline.append((start - t0, end - t0, kind))
        self.forward_latency.setdefault(n, []).append(end - start)
        if self.arm is not None:  # (no timeline: the stage's own holds every forward)
            sub = self.by_arm[self.arm]
            sub.forwards += 1
            sub.busy_s += end - start
            sub.forward_latency.setdefault(n, []).append(end - start)

    def record_verify(self, drafts: int, accepted: int, rejected: bool | None = None,
                      tree: bool = False) -> None:
        """A verification of ``drafts`` drafts (``tree``: tree nodes) accepted ``accepted`` of
        them; ``rejected``: it ended in a rejection (default: ``accepted < drafts``, a chain's
        rule; a tree's walk may stop at a leaf with other branches untried)."""
        self.verify_steps += 1
        self.tree_steps += int(tree)
        self.proposed += drafts
        self.accepted += accepted
        rejected = accepted < drafts if rejected is None else rejected
        self.rejected += int(rejected)
        tried = accepted + int(rejected)
        while len(self.depth_tried) < tried:
            self.depth_tried.append(0)
            self.depth_accepted.append(0)
        for d in range(tried):
            self.depth_tried[d] += 1
        for d in range(accepted):
            self.depth_accepted[d] += 1
        if self.arm is not None:
            self.by_arm[self.arm].record_verify(drafts, accepted, rejected, tree)

    @property
    def acceptance_rate(self) -> float:
        """Fraction of proposed draft tokens accepted (alpha of the stage below vs this one)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def alpha(self) -> float:
        """Per-token acceptance estimate (``analysis.acceptance_estimate``, maximum likelihood
        under i.i.d. acceptance): accepted / (accepted + verification steps that ended in a
        rejection). Unlike ``acceptance_rate`` it is not biased low by drafts after a
        rejection, which are never tested."""
        return acceptance_estimate(self.accepted, self.rejected)

    @property
    def depth_acceptance(self) -> list[float]:
        """Per draft depth (first = depth 1): the share of the verifications that tried a
        draft at that depth which accepted it. A chain whose drafts are accepted independently
        with probability ``alpha`` shows ``alpha`` at every depth; a tree's siblings raise it."""
        return [a / t for a, t in zip(self.depth_accepted, self.depth_tried, strict=True)]

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per verification step (accepted drafts + the verifier's token)."""
        return (self.accepted + self.verify_steps) / self.verify_steps if self.verify_steps else 0.0

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in (
            "name", "drafted", "proposed", "accepted", "rejected", "rollbacks", "forwards",
            "verify_steps", "tree_steps", "busy_s", "idle_s")}
        d["acceptance_rate"] = self.acceptance_rate
        d["alpha"] = self.alpha
        d["mean_accepted_length"] = self.mean_accepted_length
        d["depth_tried"] = list(self.depth_tried)
        d["depth_accepted"] = list(self.depth_accepted)
        d["depth_acceptance"] = self.depth_acceptance
        if self.by_arm:
            d["by_arm"] = {a: sub.as_dict() for a, sub in self.by_arm.items()}
        return d


VERIFY_MAX_N = 64  # forwards over more positions are prefills and catch-ups, not steps


def step_overhead_s(target: StageStats, seconds: float) -> float:
    """The target's host time per step outside its forwards and its waits for messages: a
    PipeSpec generation's ``seconds`` less the target's prefill, its other forwards and its
    idle time, over its steps (bookkeeping, acceptance's host side, messages, the caller's
    tokens; a regime switch's catch-up too). ``analysis.StageProfile.step_overhead_s``."""
    if not target.verify_steps:
        return 0.0
    prefill = sum(b - a for a, b, kind in target.timeline if kind == "prefill")
    first = next((a for a, _, kind in target.timeline if kind != "prefill"), None)
    # from the first step on (the wait for the stage below's first drafts is not a step's)
    start = prefill if first is None else max(prefill, first)
    decode_busy = target.busy_s - prefill
    return max(0.0, (seconds - start - decode_busy - target.idle_s) / target.verify_steps)


def analysis_input(stats: list[StageStats], windows: list[int], overhead_s: float = 0.0
                   ) -> dict:
    """``analysis.predict_from_stats``'s input from a generation's measured stages: per stage
    the median latency of each forward size up to ``VERIFY_MAX_N`` (a prompt's prefill is not
    a step), and for a verifier its ``alpha``, the mean window it verified (its configured
    window before it verified any) and the share of its steps that had drafts
    (``verify_share``, once it stepped); a verifier of trees adds its measured tokens per
    verification and positions per verify forward (``analysis.StageProfile``); ``overhead_s``:
    the last stage's host time per step outside its forwards (``step_overhead_s``)."""
    stages = []
    for i, s in enumerate(stats):
        ns = sorted(n for n in s.forward_latency if n <= VERIFY_MAX_N) or sorted(s.forward_latency)
        lat = {"n": ns, "s": [sorted(s.forward_latency[n])[len(s.forward_latency[n]) // 2]
                              for n in ns]}
        d = {"name": s.name, "latency": lat}
        if i:
            with_drafts = s.depth_tried[0] if s.depth_tried else 0  # verifies that had drafts
            gamma = round(s.proposed / with_drafts) if with_drafts else windows[i]
            d.update(alpha=s.alpha, gamma=max(1, gamma))
            if s.verify_steps:  # every step of a verifier is a verify, with drafts or alone
                d["verify_share"] = with_drafts / s.verify_steps
            if s.tree_steps and with_drafts:
                d.update(accepted_per_verify=1 + s.accepted / with_drafts,
                         verify_tokens=1 + s.proposed / with_drafts)
        stages.append(d)
    if overhead_s > 0:
        stages[-1]["step_overhead_s"] = overhead_s
    return {"stages": stages}


def regime_inputs(stats: list[StageStats], windows: list[int], overhead_s: float = 0.0
                  ) -> dict[str, tuple[dict, int]]:
    """Per regime the target ran in (``StageStats.by_arm``): the ``analysis_input`` of the
    stages that regime runs, with the target's own figures in that regime, and the tokens the
    target committed in it (``analysis.predict_regimes``' input). ``full``: every stage;
    ``lean``: the lowest (n-gram) drafter straight under the target; ``alone``: the target."""
    from pipespec_fast.decoding.regime import ALONE, FULL

    target = stats[-1]
    out = {}
    for arm, sub in target.by_arm.items():
        if arm == FULL:
            run, wins = [*stats[:-1], sub], windows
        elif arm == ALONE:
            run, wins = [sub], windows[-1:]
        else:
            run, wins = [stats[0], sub], [windows[0], windows[-1]]
        if not sub.forward_latency:
            continue  # (a target step is a forward: not reached)
        # a stage below that never ran a forward in this generation (paused, or resumed
        # too briefly) drafted nothing: the regime ran without it
        ran = [i for i, st in enumerate(run) if st.forward_latency]
        run, wins = [run[i] for i in ran], [wins[i] for i in ran]
        out[arm] = (analysis_input(run, wins, overhead_s), sub.accepted + sub.verify_steps)
    return out
