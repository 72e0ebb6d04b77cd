"""The settings of a search: ``SearchConfig`` (every field is also a CLI flag), the presets,
the schedules derived from them (the Gumbel temperature, the cosine learning rate) and the
SGD that the search, the fine-tuning and the training share."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ..latency.measuring import METHODS
from ..nn.space import SearchSpace, Stage
from ..nn.supernet import MASK_KINDS

__all__ = ["SearchConfig", "FaultSettings", "PRESETS", "make_config", "config_field", "build_space",
           "parse_stages", "temperature_at", "cosine_lr", "flag_name", "uses_channels_last"]


def config_field(default, help: str, type=None, choices=None):
    """A config field that is also a CLI flag (``--name-with-dashes``)."""
    return field(default=default, metadata={"help": help, "type": type, "choices": choices})


@dataclass
class FaultSettings:
    """What a run does on a fault (faults.py); shared by search and training."""

    nonfinite: str = config_field("stop", "on a non-finite loss or gradient: stop (one line, "
                                  "exit 3) or skip the step", str, ("stop", "skip"))
    nonfinite_skips: int = config_field(10, "skip: stop after this many skipped steps in a row",
                                        int)
    checkpoint_every: float = config_field(30.0, "also write a mid-epoch checkpoint every this "
                                           "many minutes (0: only after each epoch)", float)
    skip_bad_images: bool = config_field(False, "skip image files that cannot be decoded "
                                         "(counted in the run's summary) instead of stopping",
                                         bool)

    def validate_faults(self) -> None:
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"--nonfinite must be one of stop, skip, got {self.nonfinite!r}")
        if self.nonfinite_skips < 1:
            raise ValueError(f"--nonfinite-skips must be >= 1, got {self.nonfinite_skips}")
        if self.checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")


@dataclass
class SearchConfig(FaultSettings):
    """Every setting of a search; saved as ``config.json``. Defaults: the paper's schedule."""

    out: str = config_field("runs/search", "run directory", str)
    preset: str = config_field("paper", "settings preset (explicit flags override it)", str,
                               ("paper", "quick"))
    data: str | None = config_field(None, "ImageNet-layout folder (train/, val/); default: "
                                    "built-in set", str)
    classes: int | None = config_field(None, "use this many classes, chosen from --seed", int)
    epochs: int = config_field(90, "total epochs, warm-up included", int)
    warmup_epochs: int = config_field(10, "first epochs train the weights only", int)
    width: float = config_field(1.0, "channel width multiplier", float)
    resolution: int = config_field(224, "input resolution", int)
    head_channels: int = config_field(1984, "head 1x1 conv channels", int)
    small_input: str = config_field("auto", "32x32-style macro (stem and stage 2 stride 1); "
                                    "auto: resolution <= 64", str, ("auto", "on", "off"))
    stages: str | None = config_field(None, "macro table override 'C:N:S,C:N:S,...' (channels, "
                                      "repeats, stride per stage)", str)
    batch_size: int = config_field(192, "batch size per process", int)
    max_batches: int | None = config_field(None, "cap on batches per phase and epoch", int)
    w_lr: float = config_field(0.1, "weights: SGD learning rate (cosine over all epochs)", float)
    w_momentum: float = config_field(0.9, "weights: SGD momentum", float)
    w_wd: float = config_field(1e-4, "weights: weight decay", float)
    theta_lr: float = config_field(0.01, "θ: Adam learning rate", float)
    theta_wd: float = config_field(5e-4, "θ: Adam weight decay", float)
    tau: float = config_field(5.0, "initial Gumbel-softmax temperature", float)
    tau_decay: float = config_field(0.045, "temperature *= exp(-tau_decay) per search epoch",
                                    float)
    gumbel: str = config_field("per-batch", "one Gumbel mask per batch or per example", str,
                               ("per-batch", "per-example"))
    mask: str = config_field("soft", "soft: Gumbel-softmax weights, every candidate runs "
                             "(paper); hard: one-hot forward, soft gradient (straight-through, "
                             "GDAS), one path runs; two-path: two candidates per layer drawn "
                             "from softmax(θ), mixed by their renormalised probabilities "
                             "(ProxylessNAS)", str, MASK_KINDS)
    lut: str | None = config_field(None, "latency table to use (default: measure one on the "
                                   "spot)", str)
    lut_method: str = config_field("calibrated", "how to measure the table when --lut is not "
                                   "given", str, METHODS)
    lut_reps: int | None = config_field(None, "timed rounds per op when measuring", int)
    lut_device: str = config_field("cpu", "device the latency table is measured on", str)
    lut_threads: int | None = config_field(None, "threads while measuring (default: current)",
                                           int)
    latency_loss: str = config_field("mult", "latency term: mult (paper), add, none", str,
                                     ("mult", "add", "none"))
    alpha: float = config_field(0.2, "mult: CE * alpha * (log LAT_us)^beta", float)
    beta: float = config_field(0.6, "mult: exponent of log LAT", float)
    lam: float = config_field(0.01, "add: CE + lam * LAT_ms", float)
    samples: int = config_field(6, "architectures sampled from softmax(θ) at the end", int)
    finetune_steps: int = config_field(0, "steps each final architecture is fine-tuned from "
                                       "the supernet's weights before its θ-split accuracy is "
                                       "counted", int)
    finetune_lr: float = config_field(0.1, "learning rate of that fine-tuning", float)
    builtin_train: int = config_field(5000, "built-in set: training images (before the 80/20 "
                                      "split)", int)
    builtin_val: int = config_field(1000, "built-in set: validation images", int)
    workers: int = config_field(4, "data loader workers (image folders only)", int)
    device: str = config_field("auto", "auto, cpu or cuda", str)
    backend: str = config_field("auto", "MixedBlock backend (auto, reference, cpu, triton, "
                                "cuda)", str)
    channels_last: str = config_field("auto", "channels_last memory format (auto: on for CPU)",
                                      str, ("auto", "on", "off"))
    threads: int | None = config_field(None, "torch intra-op threads (default: torch's)", int)
    seed: int = config_field(0, "seed for data order, splits, class subset, init and Gumbel "
                             "noise", int)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            ch = f.metadata.get("choices")
            v = getattr(self, f.name)
            if ch and v not in ch:
                raise ValueError(f"--{flag_name(f.name)} must be one of {', '.join(ch)}, got {v!r}")
        positive = ("epochs", "width", "resolution", "head_channels", "batch_size", "tau",
                    "alpha", "beta", "builtin_train", "builtin_val")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"--{flag_name(name)} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_epochs", "w_lr", "theta_lr", "w_wd", "theta_wd", "tau_decay",
                     "lam", "samples", "workers", "finetune_steps", "finetune_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{flag_name(name)} must be >= 0, got {getattr(self, name)}")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"--warmup-epochs ({self.warmup_epochs}) cannot exceed --epochs "
                             f"({self.epochs})")
        for name in ("classes", "max_batches", "lut_reps", "lut_threads", "threads"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{flag_name(name)} must be >= 1, got {v}")
        if self.mask == "two-path" and self.gumbel != "per-batch":
            raise ValueError("--mask two-path draws one pair of candidates per layer and "
                             "batch: use --gumbel per-batch")
        if self.stages is not None:
            parse_stages(self.stages)
        self.validate_faults()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def flag_name(name: str) -> str:
    """The command-line flag of a config field."""
    return name.replace("_", "-")


def parse_stages(text: str) -> tuple:
    """'16:1:1,24:4:2' -> (Stage(16, 1, 1), Stage(24, 4, 2))."""
    try:
        out = tuple(Stage(*(int(v) for v in part.split(":"))) for part in text.split(","))
    except (TypeError, ValueError):
        raise ValueError(f"--stages {text!r} must look like '16:1:1,24:4:2' "
                         "(channels:repeats:stride per stage)") from None
    return out


# The paper's schedule is the dataclass default; ``quick`` is the main job on a CPU: two
# warm-up epochs (the weights leave chance in the second), then an additive latency term
# strong enough that the search's choice beats random architectures on its objective, and
# τ annealed in three search epochs (5 -> 1.8 -> 0.7) as the paper anneals it in eighty,
# which weakens the latency term's steady push on every layer's skip in the last epoch (the
# numbers behind it: docs/search.md, "What it shows for the quick preset").
PRESETS = {
    "paper": {},
    "quick": dict(
        resolution=32, width=0.25, head_channels=256, epochs=5, warmup_epochs=2,
        batch_size=32, builtin_train=3000, builtin_val=500, samples=3, finetune_steps=75,
        theta_lr=0.05, tau_decay=1.0, lut_method="context", lut_reps=10,
        latency_loss="add", lam=0.3),
}


def make_config(preset: str | None = None, **overrides) -> SearchConfig:
    """A config from a preset plus explicit settings (None values are ignored).

    Default preset: ``paper`` with ``data``, ``quick`` without.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    known = {f.name for f in dataclasses.fields(SearchConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown search setting(s) {sorted(unknown)}")
    if preset is None:
        preset = "paper" if overrides.get("data") else "quick"
    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    cfg = SearchConfig(**{**PRESETS[preset], **overrides, "preset": preset})
    cfg.validate()
    return cfg


def build_space(cfg: SearchConfig) -> SearchSpace:
    small = cfg.small_input == "on" or (cfg.small_input == "auto" and cfg.resolution <= 64)
    kw = dict(resolution=cfg.resolution, width=cfg.width, head_channels=cfg.head_channels)
    if cfg.stages:
        kw["stages"] = parse_stages(cfg.stages)
    return SearchSpace.small(**kw) if small else SearchSpace(**kw)


def uses_channels_last(cfg: SearchConfig, device) -> bool:
    """``--channels-last``: on, off, or auto = on for the CPU (2-6x faster convs there)."""
    return cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type == "cpu")


def temperature_at(cfg: SearchConfig, epoch: int) -> float:
    """τ for ``epoch``: ``tau`` during warm-up, then times exp(-tau_decay) per search epoch."""
    return cfg.tau * math.exp(-cfg.tau_decay * max(0, epoch - cfg.warmup_epochs))


def sgd(params, lr: float, momentum: float, weight_decay: float,
        nesterov: bool = False, every_step: bool = False) -> torch.optim.SGD:
    """SGD with its update as a few multi-tensor ops over all parameters: the default
    per-tensor loop costs several ATen calls per tensor and step (a search step updates about
    300 tensors: 2.8 ms looped, 1.8 ms multi-tensor on the CPU). With ``every_step`` (every
    parameter gets a gradient at every step: a discrete model), PyTorch's fused kernel, which
    takes a discrete model's 206 tensors from 1.0 to 0.4 ms. Not in the search: in PyTorch
    2.14 it fails once a parameter first gets a gradient after the first step (a candidate
    that a two-path or hard mask left out until then)."""
    how = {"fused": True} if every_step else {"foreach": True}
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov, **how)


def cosine_lr(base: float, step: int, total: int) -> float:
    return 0.5 * base * (1 + math.cos(math.pi * min(step, total) / max(1, total)))
