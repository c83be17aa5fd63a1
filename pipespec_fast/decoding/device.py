"""``StageDevice``: where a stage's work is queued and how a verify step's result reaches the
host: one CUDA stream per stage, so stages on one GPU overlap, and one wait per step, for that
stream alone. On CPU every part is a no-op or a plain conversion."""

from __future__ import annotations

import contextlib

import torch


class StageDevice:
    """A stage's device: its own stream (CUDA), and a pinned buffer and an event for the two
    ints a verify step sends to the host."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.stream = torch.cuda.Stream(device)
            self._pinned = torch.empty(3, dtype=torch.int64, pin_memory=True)
            self._event = torch.cuda.Event()

    def context(self):
        """Context in which the stage's work is queued (its stream; no-op on CPU)."""
        return torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()

    def upload(self, tokens: list[int]) -> torch.Tensor:
        """``[n]`` int64 token ids on this device. On CUDA from pinned host memory, without
        blocking: ``torch.tensor(list, device=cuda)`` copies from pageable memory, which
        waits for the whole device (a host sync per forward). The pinned block comes from
        torch's caching host allocator, which keeps it until the copy on this stream is done."""
        ids = torch.tensor(tokens, dtype=torch.int64)
        if not self.cuda:
            return ids
        return ids.pin_memory().to(self.device, non_blocking=True)

    def to_host(self, num: torch.Tensor, nxt: torch.Tensor, finite: torch.Tensor
                ) -> tuple[int, int, bool]:
        """The one host synchronisation of a verify step: two 0-d ints and a 0-d bool."""
        if not self.cuda:
            return int(num), int(nxt), bool(finite)
        # The copy is queued on the *current* stream (the stage's own inside ``context()``, as
        # in a PipeSpec worker; the caller's in sync/ar modes), so the event that says it is
        # done must be recorded on that same stream: recorded on another one, it could fire
        # before the copy and the host would read stale values.
        stream = torch.cuda.current_stream(self.device)
        self._pinned.copy_(torch.stack([num.long(), nxt.long(), finite.long()]),
                           non_blocking=True)
        self._event.record(stream)
        self._event.synchronize()  # waits for that stream only
        a, b, ok = self._pinned.tolist()
        return a, b, bool(ok)

    def rows_here(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """``[n, V]``: the ``[V]`` rows drafts were drawn from at the stage below, stacked on
        this device. Rows made on the lower stage's stream are marked as used on ours; rows
        from another device are copied without blocking."""
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)  # where this step's work runs
            for r in rows:
                if r.device == self.device:
                    r.record_stream(stream)
        return torch.stack([r.to(self.device, non_blocking=True) for r in rows])
