"""What a pipeline remembers between generations: each stage's window measurements and the
regime bandit (``decoding/regime.py``), per mode and sampling parameters.

A generation of 100 tokens is about 80 target steps: starting each one from scratch (the
acceptance prior of 1/2, no latencies, every regime untried) spends a large share of it
re-learning what the last one knew. ``FastPipeline`` keeps one :class:`PolicyMemory`; a new
generation starts from the state the last one with the same mode and parameters ended in.

Only timed policies are carried (``WindowPolicy.timed``): a seeded ``ar``/``sync`` generation
must repeat its draws whatever ran before it, so it always starts fresh. Greedy output never
depends on windows or regimes (every one of them is lossless), sampled output only through
which drafts were verified, as in any PipeSpec run.
"""

from __future__ import annotations

from collections import OrderedDict

from pipespec_fast.decoding.regime import Regimes, arms_for
from pipespec_fast.decoding.sequence import Sequencer


class PolicyMemory:
    """Window policies and regime bandits of past generations, by key (the
    :data:`MAX_ENTRIES` most recently used: a server with many sampling settings keeps a few
    KB)."""

    MAX_ENTRIES = 8

    def __init__(self) -> None:
        self._saved: OrderedDict[tuple, tuple[list, Regimes | None]] = OrderedDict()

    def clear(self) -> None:
        """Forget everything: the next generation measures from scratch."""
        self._saved.clear()

    def attach(self, seqrs: list[Sequencer], mode: str, model_free: list[bool],
               skip_level_drafts: bool, tree_budget: int, settings: tuple = ()
               ) -> tuple | None:
        """Give ``seqrs`` (one generation's, target last) the window policies and the regime
        bandit (``seqrs[-1].regimes``; ``None`` when the mode has no regimes or its windows are
        not timed) the last generation with the same key ended with (mode, sampling parameters,
        the regimes available, ``tree_budget`` and the pipeline's other ``settings``: windows,
        leads). Returns the key for :meth:`keep` (``None``: nothing is carried)."""
        target = seqrs[-1]
        target.regimes = None
        if not target.policy.timed or not target.policy.adaptive:
            return None
        p = target.params
        arms = arms_for(mode, model_free, skip_level_drafts)
        key = (mode, len(seqrs), p.greedy, p.temperature, p.top_k, p.top_p, tree_budget, arms,
               settings)
        saved = self._saved.get(key)
        if saved is None:
            target.regimes = Regimes(arms) if arms else None
            return key
        self._saved.move_to_end(key)
        states, target.regimes = saved
        for s, (policy, draft_cost_s) in zip(seqrs, states, strict=True):
            s.policy, s.draft_cost_s = policy, draft_cost_s
        return key

    def forget(self, key: tuple | None) -> None:
        """Drop what is kept under ``key`` (its objects are still in use by a stuck worker)."""
        self._saved.pop(key, None)

    def keep(self, key: tuple | None, seqrs: list[Sequencer]) -> None:
        """After a generation attached under ``key``: remember what its stages learned."""
        if key is not None:
            self._saved[key] = ([(s.policy, s.draft_cost_s) for s in seqrs], seqrs[-1].regimes)
            self._saved.move_to_end(key)
            while len(self._saved) > self.MAX_ENTRIES:
                self._saved.popitem(last=False)
