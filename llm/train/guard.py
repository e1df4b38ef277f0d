"""What the loop does with a bad step: its update is skipped and counted. A step is bad when its loss or gradient
norm is not finite, or (`trainer.spike_skip=k`) when its loss is a spike: more than k standard deviations above
the mean of the last `trainer.spike_window` accepted losses (as OLMo-core and Levanter skip them). Both kinds count
as skipped steps, and `trainer.max_consecutive_skips` of them in a row stop the run.

Everything stays on the device (no host sync per step): the counters and the window are tensors, read on logging
steps. Under several ranks the loss judged is the mean over ranks, so every rank skips the same steps. The window is
part of the checkpoint (`state_dict`), so a resumed run judges the next steps as the uninterrupted one would.
"""

from __future__ import annotations

import torch

from llm.dist.parallel import all_reduce_mean


class StepGuard:
    def __init__(
        self, device, skipped: int = 0, spike_skip: float | None = None, window: int = 50, state: dict | None = None
    ):
        self.k, self.size = spike_skip, window
        self._skipped = torch.tensor(float(skipped), device=device)  # carried over a resume
        self._consecutive = torch.zeros((), device=device)
        values = ((state or {}).get("values") or [])[-window:]
        self._window = torch.zeros(window, device=device)  # the accepted losses, newest last (a shift register)
        if values:
            self._window[-len(values) :] = torch.tensor(values, dtype=torch.float32)
        self._count = torch.tensor(float(len(values)), device=device)  # accepted so far (judging starts when full)

    def spike(self, loss: torch.Tensor | None, passes: int = 1) -> torch.Tensor | None:
        """1.0 when this step's loss (`loss` x `passes`: a first pass's share of the step's mean) is a spike, else
        0.0; an accepted finite loss joins the window. None when spike skipping is off."""
        if self.k is None or loss is None:
            return None
        loss = all_reduce_mean({"loss": loss.detach().float() * passes})["loss"].reshape(1)
        threshold = self._window.mean() + self.k * self._window.std()
        spike = (self._count >= self.size) & (loss > threshold)
        accept = ~spike & torch.isfinite(loss)
        self._window = torch.where(accept, torch.cat([self._window[1:], loss]), self._window)
        self._count = self._count + accept.float().squeeze()
        return spike.float().squeeze()

    def record(self, bad: torch.Tensor) -> None:
        """Count a step (bad: 1.0 when its update was skipped)."""
        self._skipped += bad
        self._consecutive = (self._consecutive + bad) * bad

    @property
    def skipped(self) -> int:
        return int(self._skipped.item())

    @property
    def consecutive(self) -> int:
        return int(self._consecutive.item())

    def state_dict(self) -> dict:
        """The accepted losses of the window (oldest first), for the checkpoint."""
        if self.k is None:
            return {}
        n = int(min(self._count.item(), self.size))
        return {"values": self._window[self.size - n :].tolist()} if n else {"values": []}
