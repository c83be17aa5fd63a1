"""``StageDevice``: where a stage's work is queued and how a step's results reach the host:
one CUDA stream per stage, so stages on one GPU overlap, one wait per step (a verify, or a
drafter's run of tokens), for that stream alone, and events that order one stage's reads of
another's rows. On CPU every part is a no-op or a plain conversion."""

from __future__ import annotations

import contextlib

import torch


class StageDevice:
    """A stage's device: its own stream (CUDA), and a pinned buffer and an event for the ints
    a step sends to the host.

    ``deferred_reads``: model work keeps its results on the device until the step's one read
    (a drafter's run of tokens feeds each token's id to the next forward as a device tensor).
    On by default on CUDA, where every read is a synchronisation; on the CPU a read costs
    nothing and drafting reads each token as it comes (tests turn it on to check that both
    ways draft the same tokens)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.deferred_reads = self.cuda
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

    def read(self, *parts: torch.Tensor) -> list[int]:
        """The values of ``parts`` (integer or bool tensors, any shapes), flattened in order,
        as host ints: the step's one host synchronisation."""
        flat = torch.cat([p.reshape(-1).long() for p in parts])
        if not self.cuda:
            return flat.tolist()
        # The copy is queued on the *current* stream (the stage's own inside ``context()``, as
        # in a PipeSpec worker; the caller's in sync/ar modes), so the event that says it is
        # done must be recorded on that same stream: recorded on another one, it could fire
        # before the copy and the host would read stale values.
        stream = torch.cuda.current_stream(self.device)
        k = flat.shape[0]
        if self._pinned.shape[0] < k:
            self._pinned = torch.empty(max(k, 2 * self._pinned.shape[0]), dtype=torch.int64,
                                       pin_memory=True)
        self._pinned[:k].copy_(flat, non_blocking=True)
        self._event.record(stream)
        self._event.synchronize()  # waits for that stream only
        return self._pinned[:k].tolist()

    def to_host(self, num: torch.Tensor, nxt: torch.Tensor, finite: torch.Tensor
                ) -> tuple[int, int, bool]:
        """A verify step's one host synchronisation: two 0-d ints and a 0-d bool."""
        if not self.cuda:
            return int(num), int(nxt), bool(finite)
        a, b, ok = self.read(num, nxt, finite)
        return a, b, bool(ok)

    def finish(self) -> None:
        """Wait for this stage's queued work (CUDA): a PipeSpec worker ends a generation with
        kernels queued after its last read (a compaction, kept rows), which the next
        generation's work on other streams must not overlap."""
        if self.cuda:
            self.stream.synchronize()

    def ready(self) -> torch.cuda.Event | None:
        """An event recorded on the current stream after the work queued so far (CUDA; else
        ``None``): a stage publishing rows hands it on, and the stage reading them waits for
        it on its own stream (:meth:`rows_here`)."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def rows_here(self, rows: list[torch.Tensor], ready=None) -> torch.Tensor:
        """``[n, V]``: the ``[V]`` rows drafts were drawn from at the stage below, stacked on
        this device. ``ready``: the event the stage below recorded after making them; this
        stage's stream waits for it (ordering on the device, not by a host sync). Rows made on
        the lower stage's stream are marked as used on ours; rows from the CPU are stacked
        there and copied up from pinned memory without blocking."""
        if not self.cuda:
            return torch.stack([r.to(self.device) for r in rows])
        stream = torch.cuda.current_stream(self.device)  # where this step's work runs
        if ready is not None:
            stream.wait_event(ready)
        src = rows[0].device
        if src == self.device and all(r.device == src for r in rows):
            for r in rows:
                r.record_stream(stream)
            return torch.stack(rows)
        if src.type == "cpu" and all(r.device == src for r in rows):
            return torch.stack(rows).pin_memory().to(self.device, non_blocking=True)
        # rows on another GPU (or several devices): each is read there by the copy, on that
        # device's current stream, which must wait for the rows too and keep them alive
        for d in {r.device for r in rows if r.device.type == "cuda" and r.device != self.device}:
            there = torch.cuda.current_stream(d)
            if ready is not None:
                there.wait_event(ready)
            for r in rows:
                if r.device == d:
                    r.record_stream(there)
        return torch.stack([r.to(self.device, non_blocking=True) for r in rows])
