"""Train one discrete architecture from scratch and report validation top-1.

``train(TrainConfig(arch=..., out=...))``: SGD with momentum, cosine schedule, label
smoothing; the whole training split (no 80/20 here), validation after every epoch.
The run directory, checkpoints, exact resume (also mid-epoch, after SIGTERM), the fault
policies (faults.py) and ``torchrun`` DDP work as in the search (rundir.py, distributed.py).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from ..backends import registry
from ..nn.architecture import resolve_arch
from ..nn.models import create_model
from . import data as data_mod
from .config import FaultSettings, config_field, cosine_lr, flag_name, sgd
from .distributed import Dist, job, seed_all
from .faults import StepGuard
from .rundir import RunDir, atomic_write_text

__all__ = ["TrainConfig", "train"]


@dataclass
class TrainConfig(FaultSettings):
    """Every setting of a from-scratch training run; saved as ``config.json``."""

    arch: str = config_field("", "zoo name, architecture JSON or short string", str)
    out: str = config_field("runs/train", "run directory", str)
    data: str | None = config_field(None, "ImageNet-layout folder; default: the built-in set", str)
    classes: int | None = config_field(None, "use this many classes, chosen from --seed", int)
    epochs: int | None = config_field(None, "epochs (default: 10 built-in, 90 with --data)", int)
    batch_size: int = config_field(128, "batch size per process", int)
    lr: float = config_field(0.1, "SGD learning rate (cosine)", float)
    momentum: float = config_field(0.9, "SGD momentum", float)
    wd: float = config_field(4e-5, "weight decay", float)
    label_smoothing: float = config_field(0.1, "label smoothing", float)
    max_batches: int | None = config_field(None, "cap on training batches per epoch", int)
    builtin_train: int = config_field(5000, "built-in set: training images", int)
    builtin_val: int = config_field(1000, "built-in set: validation images", int)
    workers: int = config_field(4, "data loader workers (image folders only)", int)
    device: str = config_field("auto", "auto, cpu or cuda", str)
    threads: int | None = config_field(None, "torch intra-op threads", int)
    seed: int = config_field(0, "seed for data order, class subset and init", int)

    def validate(self) -> None:
        if not self.arch:
            raise ValueError("an architecture is required (zoo name, JSON file or string)")
        for name in ("batch_size", "builtin_train", "builtin_val"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{flag_name(name)} must be >= 1")
        for name in ("epochs", "max_batches", "classes", "threads"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{flag_name(name)} must be >= 1, got {v}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError("--label-smoothing must be in [0, 1)")
        self.validate_faults()


@torch.no_grad()
def evaluate(model, val, batch_size, d: Dist, workers, channels_last) -> float:
    """Top-1 on ``val``; each rank takes a contiguous shard, counts are summed."""
    model.eval()
    n_total = data_mod.dataset_size(val)
    per = (n_total + d.world - 1) // d.world
    idx = torch.arange(d.rank * per, min(n_total, (d.rank + 1) * per))
    c = torch.zeros(2, dtype=torch.float64, device=d.device)
    for x, y in data_mod.eval_batches(val, batch_size, d.device, workers, idx, channels_last):
        c[0] += (model(x).argmax(1) == y).sum()
        c[1] += y.shape[0]
    d.all_reduce_sum(c)
    model.train()
    return float(c[0] / c[1].clamp_min(1))


def train(cfg: TrainConfig, resume: bool | str = False, quiet: bool = False) -> dict:
    """Train ``cfg.arch`` and return ``{"top1": ..., "epochs": ..., ...}``.

    ``resume``, the faults it stops on and how: as ``run_search``."""
    cfg.validate()
    with job(cfg.device) as d:
        return _train(cfg, d, resume, quiet)


def _train(cfg: TrainConfig, d: Dist, resume, quiet: bool) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rd = RunDir(cfg.out, "training run")
    cfg, resume = rd.start(cfg, resume)
    arch = resolve_arch(cfg.arch)
    data = data_mod.load_data(cfg, arch.space.resolution)
    if data.val is None:
        raise FileNotFoundError(f"{cfg.data!r} has no val/ folder to report top-1 on")
    epochs = cfg.epochs or (90 if cfg.data else 10)
    if d.main:
        if not resume:
            rd.write_config(dataclasses.asdict(cfg))
        arch.save(rd.path("arch.json"))
    seed_all(cfg.seed)
    model = registry.fast_layers(create_model(arch, data.num_classes).to(d.device), d.device)
    cl = d.device.type == "cpu"
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = sgd(model.parameters(), cfg.lr, cfg.momentum, cfg.wd, nesterov=True,
              every_step=True)
    ddp = DDP(model, device_ids=[d.device] if d.device.type == "cuda" else None) \
        if d.active else model
    seed_all(cfg.seed + 1 + d.rank)
    start, position, mine = 0, None, {}
    if resume:
        ck = rd.load_checkpoint(d, dataclasses.asdict(cfg))
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        start, position = ck["epoch"], ck.get("position")
        mine = ck.get("ranks", [{}] * d.world)[d.rank]
    base_skipped = mine.get("skipped_images", 0)
    metrics = rd.restart_metrics(start, d)
    if d.main:
        print(f"train {arch.name or cfg.arch}: {data.num_classes} classes ({data.name}), "
              f"{epochs} epochs, {d.world} process(es) on {d.device}"
              + (f", resuming at epoch {start + 1}" if start or position else ""), flush=True)
    all_idx = torch.arange(data_mod.dataset_size(data.train))
    nb = data_mod.num_batches(len(all_idx), cfg.batch_size, d.world)
    if nb == 0:
        raise ValueError(f"{len(all_idx)} images cannot fill one batch of {cfg.batch_size} "
                         f"per process; lower --batch-size")
    nb = min(nb, cfg.max_batches) if cfg.max_batches else nb
    show_bar = not quiet and d.main and sys.stderr.isatty()
    top1 = metrics[-1]["val_top1"] if metrics else None

    def state(epoch):
        return {"epoch": epoch, "model": model.state_dict(), "opt": opt.state_dict(),
                "config": dataclasses.asdict(cfg)}

    def skipped():
        return base_skipped + data_mod.skipped_images(data)

    with StepGuard(d, cfg.nonfinite, cfg.nonfinite_skips, cfg.checkpoint_every) as guard:
        for epoch in range(start, epochs):
            pos = position if epoch == start else None
            first = pos["step"] if pos else 0
            t0 = time.perf_counter() - (pos["seconds"] if pos else 0.0)
            stats = torch.tensor(mine.get("stats", [0.0] * 3) if pos else [0.0] * 3,
                                 dtype=torch.float64, device=d.device)

            def save_mid(i, epoch=epoch, t0=t0, stats=stats):
                rd.save(d, {**state(epoch), "position": {"step": i, "seconds":
                                                          time.perf_counter() - t0}},
                        rank_state={"stats": stats.tolist(), "skipped_images": skipped()})

            bar = None
            if show_bar:
                bar = tqdm(total=nb, initial=first, desc=f"epoch {epoch + 1}/{epochs}",
                           leave=False)
            model.train()
            it = data_mod.batches(data.train, all_idx, cfg.batch_size, cfg.seed, epoch, 0,
                                  d.rank, d.world, d.device, cfg.workers, cl, start=first)
            for i, x, y in guard.steps(it, first, nb, save_mid, f"steps of epoch {epoch + 1}"):
                for g in opt.param_groups:
                    g["lr"] = cosine_lr(cfg.lr, epoch * nb + i, epochs * nb)
                saved = guard.snapshot(model)
                logits = ddp(x)
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if not guard.step_ok(torch.isfinite(loss.detach()), model, saved,
                                     f"loss at epoch {epoch + 1}, step {i + 1}/{nb}",
                                     f"the weights diverged: lower --lr (now {cfg.lr})"):
                    continue
                opt.step()
                stats += torch.stack([loss.detach().double() * y.shape[0],
                                      (logits.argmax(1) == y).sum().double(),
                                      torch.tensor(float(y.shape[0]), dtype=torch.float64)])
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"loss {float(stats[0] / stats[2]):.3f} "
                                        f"acc {float(stats[1] / stats[2]):.3f}", refresh=False)
            if bar is not None:
                bar.close()
            d.all_reduce_sum(stats)
            top1 = evaluate(model, data.val, max(cfg.batch_size, 256), d, cfg.workers, cl)
            m = {"epoch": epoch, "train_loss": round(float(stats[0] / stats[2]), 6),
                 "train_acc": round(float(stats[1] / stats[2]), 6), "val_top1": round(top1, 6),
                 "seconds": round(time.perf_counter() - t0, 2), "world": d.world}
            metrics.append(m)
            rd.save(d, state(epoch + 1), row=m, rank_state={"skipped_images": skipped()})
            guard.checkpointed()
            if d.main:
                print(f"epoch {epoch + 1}/{epochs} | train loss {m['train_loss']:.3f} acc "
                      f"{m['train_acc']:.3f} | val top-1 {top1:.4f} | {m['seconds']:.1f} s",
                      flush=True)
    result = {"arch": arch.name or cfg.arch, "top1": top1, "epochs": epochs,
              "num_classes": data.num_classes, "chance": 1.0 / data.num_classes,
              "skipped_images": d.total(skipped())}
    if d.main:
        atomic_write_text(json.dumps(result, indent=2) + "\n", rd.path("result.json"))
        print(f"val top-1 {top1:.4f} (chance {result['chance']:.3f}) -> "
              f"{rd.path('result.json')}")
    return result
