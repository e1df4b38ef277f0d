"""A resumable, rank-aware order of samples: which sample indices each optimizer step uses.

Step s takes the next `batch_size` indices of a seeded permutation of the epoch (the remainder of an epoch is
dropped, then the next epoch draws a new permutation). Each rank takes a contiguous share of that global batch,
so the samples of a step are the same on any number of ranks. The whole state is (epoch, position): saving and
restoring it continues with exactly the next batch — none repeated, none skipped.
"""

from __future__ import annotations

import numpy as np

from llm.errors import ConfigError, DataError


class ResumableSampler:
    def __init__(
        self, num_samples: int, batch_size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1
    ):
        if batch_size % world_size:
            raise ConfigError(f"trainer.batch_size={batch_size} must be divisible by the number of ranks {world_size}")
        if num_samples < batch_size:
            raise DataError(f"data: {num_samples} training samples are fewer than trainer.batch_size={batch_size}")
        self.num_samples, self.batch_size, self.seed, self.shuffle = num_samples, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._perm_epoch, self._perm = None, None

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
            else:
                self._perm = np.arange(self.num_samples)
            self._perm_epoch = self.epoch
        return self._perm

    def next_indices(self) -> list[int]:
        """This rank's share of the next global batch (batch_size // world_size indices)."""
        if self.position + self.batch_size > self.num_samples:
            self.epoch, self.position = self.epoch + 1, 0
        batch = self._permutation()[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        share = self.batch_size // self.world_size
        return batch[self.rank * share : (self.rank + 1) * share].tolist()

    def consumed(self) -> np.ndarray:
        """Every sample index the global batches so far have used (all ranks), epoch after epoch."""
        epoch, position = self.epoch, self.position
        used = (self.num_samples // self.batch_size) * self.batch_size  # an epoch's remainder is dropped
        out = []
        for e in range(epoch + 1):
            self.epoch = e
            out.append(self._permutation()[: used if e < epoch else position])
        self.epoch = epoch
        return np.concatenate(out)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_samples": self.num_samples, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.num_samples:
            raise DataError(
                f"resume: the checkpoint was taken on {state['num_samples']} training samples, the data now has "
                f"{self.num_samples}; resume with the same data and trainer.seq_len"
            )
        self.epoch, self.position = state["epoch"], state["position"]
