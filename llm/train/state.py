"""The trainer's whole progress in one small JSON-able dataclass, and the RNG states it carries."""

from __future__ import annotations

import base64
import random
from dataclasses import asdict, dataclass, field

import numpy as np
import torch


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # training tokens consumed (all ranks)
    sampler: dict = field(default_factory=dict)  # data position (ResumableSampler.state_dict())
    rng: dict = field(default_factory=dict)  # capture_rng() at save time
    skipped_steps: int = 0  # optimizer steps skipped (non-finite loss or gradient)
    seconds: float = 0.0  # training wall time so far (the loop, with its evaluations and saves)
    wall_seconds: float = 0.0  # the whole run's wall time so far (setup, data preparation, evaluation included)
    initial_val_loss: float | None = None  # validation loss before the first step
    last_val_loss: float | None = None
    train_loss: float | None = None  # mean training loss of the latest logging window
    initial_eval: dict = field(default_factory=dict)  # evaluation metrics before the first step
    last_eval: dict = field(default_factory=dict)  # metrics of the latest evaluation
    log_window: dict = field(default_factory=dict)  # metric sums since the last log line (so a resumed log matches)
    spike_window: dict = field(default_factory=dict)  # the losses trainer.spike_skip compares with (StepGuard)
    fingerprint: dict = field(default_factory=dict)  # seed, data, tokenizer, batch, seq_len (a resume must match)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainerState:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in known})

    def results(self, task: str, params: int, device: str, **run: object) -> dict:
        """What results.json reports: the run's totals and final losses (and bits per byte when measured), what
        identifies the run (`run`: its overrides, code version, final checkpoint), then the objective's own metrics
        of the last evaluation, each with its value before the first step as `<name>_before`."""
        results = {
            "task": task,
            "steps": self.step,
            "tokens": self.tokens_seen,
            "seconds": round(self.seconds, 2),
            "wall_seconds": round(self.wall_seconds, 2),
            "tokens_per_s": self.tokens_seen / max(self.seconds, 1e-9),
            "train_loss": self.train_loss,
            "val_loss": self.last_val_loss,
            "initial_val_loss": self.initial_val_loss,
            "params": params,
            "skipped_steps": self.skipped_steps,
            "device": device,
            **run,
        }
        if "val_bpb" in self.last_eval:  # bits per byte: comparable across tokenizers (llm/eval/bpb.py)
            results["val_bpb"], results["initial_val_bpb"] = self.last_eval["val_bpb"], self.initial_eval.get("val_bpb")
        for k, v in self.last_eval.items():
            if not k.startswith("val_"):
                results[k] = v
                if k in self.initial_eval and self.step > 0 and isinstance(v, (int, float)):
                    results[f"{k}_before"] = self.initial_eval[k]
        return results


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def capture_rng() -> dict:
    """Python, NumPy, torch CPU and CUDA generator states as JSON-able values."""
    py = random.getstate()
    np_state = np.random.get_state()
    out = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # this rank's device only: a resume may see
        out["cuda"] = _b64(torch.cuda.get_rng_state())  # fewer GPUs, and each rank has its own
    return out


def restore_rng(state: dict) -> None:
    if not state:
        return
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, list):  # older checkpoints: one state per visible device
            cuda = cuda[min(torch.cuda.current_device(), len(cuda) - 1)]
        torch.cuda.set_rng_state(_unb64(cuda))
