"""The DNAS search loop (FBNet, Wu et al. 2019): weights on 80 %, θ on 20 %, per epoch.

``run_search(SearchConfig(...))`` does the whole job: data, latency table (loaded or
measured on the spot), warm-up epochs that train only the weights, then search epochs
that train the weights on the weight split (SGD, cosine) and θ on the θ split (Adam),
with the Gumbel temperature annealed per epoch and the FBNet loss. It writes the run
directory (see docs/search.md) and can resume exactly from its last checkpoint.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from ..latency.loss import FBNetLoss
from ..latency.measuring import measure as measure_table
from ..latency.table import LatencyTable
from ..nn.space import SearchSpace
from ..nn.supernet import SuperNet
from . import data as data_mod
from .config import SearchConfig, build_space, cosine_lr, temperature_at
from .distributed import Dist, seed_all, setup
from .rundir import RunDir, atomic_write_text
from .summary import finish

__all__ = ["run_search", "SearchResult"]


@dataclass
class SearchResult:
    """What ``run_search`` returns: the run directory, the trained supernet, the summary."""

    out: str
    net: object
    summary: dict | None
    metrics: list


def _log(d: Dist, msg: str) -> None:
    if d.main:
        print(msg, flush=True)


def get_table(cfg: SearchConfig, space: SearchSpace, num_classes: int, d: Dist, rd: RunDir,
              quiet: bool, resume: bool = False):
    """The latency table: --lut, the run's own lut.json (resume), or measured now (rank 0)."""
    if cfg.lut and not (resume and os.path.exists(rd.lut)):
        if not os.path.exists(cfg.lut):
            raise FileNotFoundError(f"--lut {cfg.lut!r} does not exist")
        table = LatencyTable.load(cfg.lut)
        table.check(space, num_classes)
        if d.main:
            table.save(rd.lut)
        return table
    if not os.path.exists(rd.lut):
        if d.main:
            _log(d, f"measuring a latency table ({cfg.lut_method}) on {cfg.lut_device} for "
                    f"{space.num_layers} layers x {space.num_candidates} candidates ...")
            t0 = time.perf_counter()
            table = measure_table(
                space, device=cfg.lut_device, threads=cfg.lut_threads, method=cfg.lut_method,
                reps=cfg.lut_reps, num_classes=num_classes, seed=cfg.seed,
                progress=not quiet and sys.stderr.isatty())
            table.save(rd.lut)
            _log(d, f"latency table: {len(table.entries)} entries in "
                    f"{time.perf_counter() - t0:.1f} s -> {rd.lut}")
        d.barrier()
    table = LatencyTable.load(rd.lut)
    table.check(space, num_classes)
    return table


def run_search(cfg: SearchConfig, resume: bool = False, quiet: bool = False,
               stop_after: int | None = None) -> SearchResult:
    """Run (or resume) a search; returns the supernet and the summary.

    ``stop_after``: return after that many epochs in total, leaving a resumable run
    (the final artefacts are written only when the last epoch is done).
    """
    cfg.validate()
    d = setup(cfg.device)
    try:
        return _run(cfg, d, resume, quiet, stop_after)
    finally:
        d.close()


def _run(cfg, d: Dist, resume, quiet, stop_after) -> SearchResult:
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rd = RunDir(cfg.out, "search")
    cfg = rd.start(cfg, resume)
    data = data_mod.load_data(cfg, cfg.resolution)
    space = build_space(cfg)
    if d.main:
        if not resume:
            rd.write_config(cfg.to_dict())
        os.makedirs(rd.theta, exist_ok=True)
        os.makedirs(rd.archs, exist_ok=True)
    d.barrier()
    table = get_table(cfg, space, data.num_classes, d, rd, quiet, resume)

    seed_all(cfg.seed)                         # identical init on every rank
    net = SuperNet(space, data.num_classes, backend=cfg.backend, temperature=cfg.tau,
                   gumbel=cfg.gumbel, mask=cfg.mask).to(d.device)
    cl = cfg.channels_last == "on" or (cfg.channels_last == "auto" and d.device.type == "cpu")
    if cl:
        net = net.to(memory_format=torch.channels_last)
    crit = FBNetLoss(table, cfg.latency_loss, cfg.alpha, cfg.beta, cfg.lam, space=space,
                     num_classes=data.num_classes)
    w_params = net.weight_parameters()
    w_opt = torch.optim.SGD(w_params, lr=cfg.w_lr, momentum=cfg.w_momentum,
                            weight_decay=cfg.w_wd, nesterov=False)
    t_opt = torch.optim.Adam(net.arch_parameters(), lr=cfg.theta_lr, weight_decay=cfg.theta_wd)
    model = net
    if d.active:
        # θ stays outside DDP (DDP only tracks parameters that require grad when it is
        # built): the θ phase averages θ's gradient by hand and runs the bare module.
        net.theta.requires_grad_(False)
        model = DDP(net, device_ids=[d.device] if d.device.type == "cuda" else None)
        net.theta.requires_grad_(True)
    seed_all(cfg.seed + 1 + d.rank)           # per-rank Gumbel noise / augmentation

    start = 0
    if resume:
        ck = rd.load_checkpoint(d)
        net.load_state_dict(ck["model"])
        w_opt.load_state_dict(ck["w_opt"])
        t_opt.load_state_dict(ck["t_opt"])
        start = ck["epoch"]
        _log(d, f"resuming {cfg.out} at epoch {start + 1}/{cfg.epochs}")
    metrics = rd.restart_metrics(start, d)

    nw = _batches_per_epoch(len(data.weight_idx), cfg, d)
    nt = _batches_per_epoch(len(data.theta_idx), cfg, d)
    total_steps = cfg.epochs * nw
    show_bar = not quiet and d.main and sys.stderr.isatty()
    end = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    loader_kw = dict(rank=d.rank, world=d.world, device=d.device, workers=cfg.workers,
                     channels_last=cl)
    if start == 0 and d.main and not resume:
        _log(d, f"search: {space.num_layers} layers x {space.num_candidates} candidates, "
                f"{data.num_classes} classes ({data.name}), {len(data.weight_idx)} weight / "
                f"{len(data.theta_idx)} θ images, {d.world} process(es) on {d.device}, "
                f"{cfg.epochs} epochs ({cfg.warmup_epochs} warm-up)")
    for epoch in range(start, end):
        net.temperature = temperature_at(cfg, epoch)
        search_epoch = epoch >= cfg.warmup_epochs
        bar = _bar(nw + (nt if search_epoch else 0), epoch, cfg, show_bar)
        t0 = time.perf_counter()
        w_stats = torch.zeros(3, dtype=torch.float64, device=d.device)  # loss*n, correct, n
        it = data_mod.batches(data.train, data.weight_idx, cfg.batch_size, cfg.seed, epoch,
                              0, **loader_kw)
        net.train()
        for i, (x, y) in enumerate(it):
            if i >= nw:
                break
            lr = cosine_lr(cfg.w_lr, epoch * nw + i, total_steps)
            for g in w_opt.param_groups:
                g["lr"] = lr
            with torch.no_grad():
                masks = net.sample_masks(x.shape[0])
            logits = model(x, masks=masks)
            loss = crit(logits, y, masks)
            w_opt.zero_grad(set_to_none=True)
            loss.backward()
            w_opt.step()
            _accumulate(w_stats, loss, logits, y)
            _bar_update(bar, w_stats, x.shape[0] * d.world, t0, net, table, "w")
        t_stats = torch.zeros(3, dtype=torch.float64, device=d.device)
        if search_epoch:
            for p in w_params:
                p.requires_grad_(False)
            it = data_mod.batches(data.train, data.theta_idx, cfg.batch_size, cfg.seed, epoch,
                                  1, **loader_kw)
            for i, (x, y) in enumerate(it):
                if i >= nt:
                    break
                masks = net.sample_masks(x.shape[0])
                logits = net(x, masks=masks)
                loss = crit(logits, y, masks)
                t_opt.zero_grad(set_to_none=True)
                loss.backward()
                d.average_grad(net.theta)
                t_opt.step()
                _accumulate(t_stats, loss, logits, y)
                _bar_update(bar, t_stats, x.shape[0] * d.world, t0, net, table, "θ")
            for p in w_params:
                p.requires_grad_(True)
        if bar is not None:
            bar.close()
        d.all_reduce_sum(w_stats)
        d.all_reduce_sum(t_stats)
        seconds = time.perf_counter() - t0
        m = _epoch_metrics(epoch, net, table, w_stats, t_stats, seconds, search_epoch,
                           cfg, nw, nt, d)
        metrics.append(m)
        if d.main:
            _write_theta(rd, epoch, net)
        rd.end_epoch(d, m, {"epoch": epoch + 1, "model": net.state_dict(),
                            "w_opt": w_opt.state_dict(), "t_opt": t_opt.state_dict(),
                            "config": cfg.to_dict()})
        _log(d, _summary_line(m, cfg))

    summary = None
    if end == cfg.epochs:
        summary = finish(cfg, net, table, data, d, rd, metrics[-1], t_start, cl)
    return SearchResult(cfg.out, net, summary, metrics)


def _batches_per_epoch(n: int, cfg: SearchConfig, d: Dist) -> int:
    nb = data_mod.num_batches(n, cfg.batch_size, d.world)
    if nb == 0:
        raise ValueError(f"a split of {n} images cannot fill one batch of {cfg.batch_size} per "
                         f"process ({d.world} process(es)); lower --batch-size or use more data")
    return min(nb, cfg.max_batches) if cfg.max_batches else nb


def _accumulate(stats: Tensor, loss: Tensor, logits: Tensor, y: Tensor) -> None:
    n = y.shape[0]
    stats[0] += loss.detach().double() * n
    stats[1] += (logits.detach().argmax(1) == y).sum()
    stats[2] += n


def _expected_ms(net, table) -> float:
    with torch.no_grad():
        return float(table.expected(net.probabilities().float(), net.space,
                                    net.classifier.out_features))


def _entropy(net) -> list:
    with torch.no_grad():
        p = net.probabilities().double()
        return [round(v, 6) for v in (-(p * p.clamp_min(1e-30).log()).sum(-1)).tolist()]


def _bar(total, epoch, cfg, show):
    if not show:
        return None
    return tqdm(total=total, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                leave=False, dynamic_ncols=True)


def _bar_update(bar, stats, images, t0, net, table, phase) -> None:
    if bar is None:
        return
    bar.update(1)
    n = max(1.0, float(stats[2]))
    bar.set_postfix_str(
        f"{phase} {images * bar.n / max(1e-9, time.perf_counter() - t0):.0f} img/s "
        f"loss {float(stats[0]) / n:.3f} acc {float(stats[1]) / n:.3f} "
        f"lat {_expected_ms(net, table):.3f} ms", refresh=False)


def _epoch_metrics(epoch, net, table, w, t, seconds, search_epoch, cfg, nw, nt, d) -> dict:
    def mean(s, i):
        return None if s[2] == 0 else round(float(s[i] / s[2]), 6)
    images = float(w[2] + t[2])
    return {
        "epoch": epoch, "phase": "search" if search_epoch else "warmup",
        "temperature": round(net.temperature, 6),
        "lr": round(cosine_lr(cfg.w_lr, (epoch + 1) * nw, cfg.epochs * nw), 8),
        "train_loss": mean(w, 0), "train_acc": mean(w, 1),
        "theta_loss": mean(t, 0) if search_epoch else None,
        "theta_acc": mean(t, 1) if search_epoch else None,
        "expected_latency_ms": round(_expected_ms(net, table), 6),
        "argmax_latency_ms": round(table.latency(net.to_architecture(),
                                                 net.classifier.out_features), 6),
        "entropy": _entropy(net),
        "seconds": round(seconds, 2), "images_per_s": round(images / max(seconds, 1e-9), 1),
        "world": d.world,
    }


def _summary_line(m: dict, cfg) -> str:
    th = ("θ loss {:.3f} acc {:.3f}".format(m["theta_loss"], m["theta_acc"])
          if m["theta_loss"] is not None else "θ (warm-up)")
    return (f"epoch {m['epoch'] + 1}/{cfg.epochs} [{m['phase']}] τ {m['temperature']:.3f} | "
            f"train loss {m['train_loss']:.3f} acc {m['train_acc']:.3f} | {th} | "
            f"E[lat] {m['expected_latency_ms']:.3f} ms | {m['images_per_s']:.0f} img/s, "
            f"{m['seconds']:.1f} s")


def _write_theta(rd: RunDir, epoch: int, net) -> None:
    d = {"epoch": epoch, "candidates": list(net.space.candidates),
         "theta": net.theta.detach().cpu().tolist()}
    atomic_write_text(json.dumps(d) + "\n", os.path.join(rd.theta, f"epoch_{epoch:03d}.json"))
