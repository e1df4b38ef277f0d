"""The trainer's settings in four small groups, each validated when built, so a bad value fails before any work.

The config keeps them flat (`trainer.max_steps`, `trainer.save_every`, ... in conf/trainer/*.yaml, what users
type); `trainer_settings(**flat)` sorts them into the groups, and an unknown key is a one-line error naming it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from llm.errors import ConfigError, check_bool, check_choice, check_int, check_number
from llm.eval.sample import SampleSettings


@dataclass(frozen=True)
class LoopSettings:
    """What one run trains: its length, the batch of each step, and how bad steps are handled."""

    max_steps: int = 150
    batch_size: int = 16  # sequences per optimizer step, over all ranks
    micro_batch_size: int | None = None  # sequences per forward on one rank (None: batch_size / ranks)
    seq_len: int = 128
    grad_clip: float | None = 1.0  # max gradient norm, > 0 (None: no clipping)
    max_consecutive_skips: int = 10  # steps with a non-finite loss/gradient are skipped; this many in a row stop
    nan_steps: tuple = ()  # testing aid: make the loss NaN at these steps
    spike_skip: float | None = None  # skip a step whose loss is more than this many std above the window's mean
    spike_window: int = 50  # the accepted losses spike_skip compares with
    spike_steps: tuple = ()  # testing aid: multiply the loss by 100 at these steps

    def __post_init__(self):
        check_number("trainer.spike_skip", self.spike_skip, 0, low_open=True, allow_none=True)
        for key in ("batch_size", "seq_len", "max_consecutive_skips", "spike_window"):
            check_int(f"trainer.{key}", getattr(self, key), 1)
        check_int("trainer.max_steps", self.max_steps, 0)  # 0: evaluate only
        check_int("trainer.micro_batch_size", self.micro_batch_size, 1, allow_none=True)  # null: derived
        check_number("trainer.grad_clip", self.grad_clip, 0, low_open=True, allow_none=True)  # > 0: never ascent
        for key in ("nan_steps", "spike_steps"):
            if not isinstance(getattr(self, key), (list, tuple)):
                raise ConfigError(f"trainer.{key}={getattr(self, key)!r} must be a list of steps")
            for step in getattr(self, key):
                check_int(f"trainer.{key}[]", step, 1)
            object.__setattr__(self, key, tuple(getattr(self, key)))


@dataclass(frozen=True)
class CadenceSettings:
    """When the loop evaluates, logs and saves, and how much it keeps."""

    eval_every: int = 50  # 0: only before the first step and at the end
    eval_batches: int | None = 10  # x micro_batch_size validation sequences per evaluation (None: all)
    log_every: int = 10
    save_every: int = 0  # 0: only at the end (and when stopped by a signal)
    keep_last: int | None = None  # newest complete checkpoints kept (None: all)
    progress: bool = True  # progress bar on an interactive terminal

    def __post_init__(self):
        check_int("trainer.log_every", self.log_every, 1)
        for key in ("eval_every", "save_every"):
            check_int(f"trainer.{key}", getattr(self, key), 0)
        check_int("trainer.eval_batches", self.eval_batches, 1, allow_none=True)
        check_int("trainer.keep_last", self.keep_last, 1, allow_none=True)  # never delete the newest checkpoint
        check_bool("trainer.progress", self.progress)


@dataclass(frozen=True)
class HardwareSettings:
    """Where and how the model runs."""

    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA) | fp32 | bf16
    compile: bool = False
    activation_checkpointing: bool = False
    strategy: str = "auto"  # auto | single | ddp | fsdp
    nproc_per_node: int = 1  # read by the training entry (llm.tasks.train): worker processes on this node
    peak_flops: float = 989e12  # for MFU (H100 bf16 dense)

    def __post_init__(self):
        check_choice("trainer.device", self.device, {"auto", "cpu", "cuda"})
        check_choice("trainer.precision", self.precision, {"auto", "fp32", "bf16"})
        check_choice("trainer.strategy", self.strategy, {"auto", "single", "ddp", "fsdp"})
        check_int("trainer.nproc_per_node", self.nproc_per_node, 1)
        check_bool("trainer.compile", self.compile)
        check_bool("trainer.activation_checkpointing", self.activation_checkpointing)
        check_number("trainer.peak_flops", self.peak_flops, 0, low_open=True)

    def bf16(self, device_type: str) -> bool:
        """Whether to autocast to bf16 on this device type."""
        return self.precision == "bf16" or (self.precision == "auto" and device_type == "cuda")


@dataclass(frozen=True)
class TrainerSettings:
    loop: LoopSettings = LoopSettings()
    cadence: CadenceSettings = CadenceSettings()
    hardware: HardwareSettings = HardwareSettings()
    sample: SampleSettings | None = None  # the sample generated at the end (task.sample.*)


GROUPS = {"loop": LoopSettings, "cadence": CadenceSettings, "hardware": HardwareSettings}


def trainer_settings(sample: dict | SampleSettings | None = None, **flat) -> TrainerSettings:
    """TrainerSettings from the flat `trainer.*` keys of the config (the `_target_` of conf/trainer/*.yaml)."""
    groups = {name: {} for name in GROUPS}
    owner = {f.name: name for name, cls in GROUPS.items() for f in dataclasses.fields(cls)}
    for key, value in flat.items():
        if key not in owner:
            raise ConfigError(f"trainer.{key} is not a trainer setting; known: {', '.join(sorted(owner))}")
        groups[owner[key]][key] = value
    if isinstance(sample, dict):
        unknown = set(sample) - {f.name for f in dataclasses.fields(SampleSettings)}
        if unknown:
            raise ConfigError(f"task.sample.{sorted(unknown)[0]} is not a sample setting")
        sample = SampleSettings(**sample)
    return TrainerSettings(sample=sample, **{name: GROUPS[name](**kw) for name, kw in groups.items()})
