"""The DNAS search loop (FBNet, Wu et al. 2019): weights on 80 %, θ on 20 %, per epoch.

``run_search(SearchConfig(...))`` does the whole job: data, latency table (loaded or
measured on the spot), warm-up epochs that train only the weights, then search epochs
that train the weights on the weight split (SGD, cosine) and θ on the θ split (Adam),
with the Gumbel temperature annealed per epoch and the FBNet loss. It writes the run
directory (see docs/search.md) and can resume exactly from its last checkpoint.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from ..backends import registry
from ..latency.loss import FBNetLoss
from ..latency.measuring import measure as measure_table
from ..latency.table import LatencyTable
from ..nn.space import SearchSpace
from ..nn.supernet import SuperNet
from . import data as data_mod
from .config import (SearchConfig, build_space, cosine_lr, sgd, temperature_at,
                     uses_channels_last)
from .distributed import Dist, job, seed_all
from .faults import Preempted, RunStopped, StepGuard
from .rundir import RunDir
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
                progress=not quiet and sys.stderr.isatty(),
                steady=False)   # the search goes on to train in this process
            table.save(rd.lut)
            _log(d, f"latency table: {len(table.entries)} entries in "
                    f"{time.perf_counter() - t0:.1f} s -> {rd.lut}")
        d.barrier()
    table = LatencyTable.load(rd.lut)
    table.check(space, num_classes)
    return table


def run_search(cfg: SearchConfig, resume: bool | str = False, quiet: bool = False,
               stop_after: int | None = None) -> SearchResult:
    """Run (or resume) a search; returns the supernet and the summary.

    ``resume``: True continues the run in ``cfg.out``; ``"auto"`` continues it when it has a
    checkpoint and starts anew otherwise. ``stop_after``: return after that many epochs in
    total, leaving a resumable run (the final artefacts are written only when the last
    epoch is done). A fault raises ``RunStopped`` (SIGTERM/SIGINT: ``Preempted``, after a
    checkpoint); with several processes, every rank stops with the first failing rank's
    message.
    """
    cfg.validate()
    with job(cfg.device) as d:
        return _run(cfg, d, resume, quiet, stop_after)


def _run(cfg, d: Dist, resume, quiet, stop_after) -> SearchResult:
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rd = RunDir(cfg.out, "search")
    cfg, resume = rd.start(cfg, resume)
    data = data_mod.load_data(cfg, cfg.resolution)
    space = build_space(cfg)
    if d.main:
        if not resume:
            rd.write_config(cfg.to_dict())
        os.makedirs(rd.theta, exist_ok=True)
        os.makedirs(rd.archs, exist_ok=True)
    d.barrier()
    table = get_table(cfg, space, data.num_classes, d, rd, quiet, resume)
    s = _Search(cfg, d, rd, data, space, table, quiet)
    if resume:
        s.resume()
    elif d.main:
        _log(d, f"search: {space.num_layers} layers x {space.num_candidates} candidates, "
                f"{data.num_classes} classes ({data.name}), {len(data.weight_idx)} weight / "
                f"{len(data.theta_idx)} θ images, {d.world} process(es) on {d.device}, "
                f"{cfg.epochs} epochs ({cfg.warmup_epochs} warm-up)")
    s.metrics = rd.restart_metrics(s.start, d)
    end = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    with StepGuard(d, cfg.nonfinite, cfg.nonfinite_skips, cfg.checkpoint_every) as s.guard:
        for epoch in range(s.start, end):
            s.epoch(epoch)
        if s.guard.signal is not None:     # it came during the last step: its epoch is saved
            raise Preempted(f"{s.guard.signal_name} after epoch {end}: its checkpoint is "
                            "written; rerun the same command with --resume to continue")
    summary = None
    if end == cfg.epochs:
        mine = s.skipped_images()
        total = d.total(mine)
        summary = finish(cfg, s.net, table, data, d, rd, s.metrics[-1], t_start, s.cl,
                         skipped=lambda: total - mine + s.skipped_images())
    return SearchResult(cfg.out, s.net, summary, s.metrics)


class _Search:
    """The supernet, its optimisers and the epochs of one search (weights, then θ).

    Each phase is a run of steps; before each step the ``StepGuard`` may ask for a
    checkpoint in the middle of the epoch (the clock, or a signal, after which the run
    stops), which records the phase, the step and this rank's running sums, so that a
    resumed run continues exactly there."""

    def __init__(self, cfg, d: Dist, rd: RunDir, data, space, table, quiet: bool):
        self.cfg, self.d, self.rd, self.data, self.table = cfg, d, rd, data, table
        seed_all(cfg.seed)                         # identical init on every rank
        net = SuperNet(space, data.num_classes, backend=cfg.backend, temperature=cfg.tau,
                       gumbel=cfg.gumbel, mask=cfg.mask).to(d.device)
        self.cl = uses_channels_last(cfg, d.device)
        if self.cl:
            net = net.to(memory_format=torch.channels_last)
        self.net = net
        # the fused kernels' build (a minute on first use) and self-check happen here, not
        # inside the first epoch's time and images/s
        registry.resolve(cfg.backend, d.device)
        # the stem's and head's BN + ReLU on the same family's C++ layers (PyTorch's
        # channels-last BN is slow at their narrow widths); in place, state dict unchanged
        registry.fast_layers(net, d.device, cfg.backend)
        self.crit = FBNetLoss(table, cfg.latency_loss, cfg.alpha, cfg.beta, cfg.lam,
                              space=space, num_classes=data.num_classes)
        self.w_params = net.weight_parameters()
        self.w_opt = sgd(self.w_params, cfg.w_lr, cfg.w_momentum, cfg.w_wd)
        self.t_opt = torch.optim.Adam(net.arch_parameters(), lr=cfg.theta_lr,
                                      weight_decay=cfg.theta_wd)
        self.model = net
        if d.active:
            # θ stays outside DDP (DDP only tracks parameters that require grad when it is
            # built): the θ phase averages θ's gradient by hand and runs the bare module.
            net.theta.requires_grad_(False)
            self.model = DDP(net, device_ids=[d.device] if d.device.type == "cuda" else None)
            net.theta.requires_grad_(True)
        seed_all(cfg.seed + 1 + d.rank)           # per-rank Gumbel noise / augmentation
        self.nw = _batches_per_epoch(len(data.weight_idx), cfg, d)
        self.nt = _batches_per_epoch(len(data.theta_idx), cfg, d)
        self.show_bar = not quiet and d.main and sys.stderr.isatty()
        self.loader_kw = dict(rank=d.rank, world=d.world, device=d.device,
                              workers=cfg.workers, channels_last=self.cl)
        self.start, self.position, self.rank_state = 0, None, {}
        self.base_skipped = 0
        self.guard = self.bar = None
        self.metrics = []

    def skipped_images(self) -> int:
        return self.base_skipped + data_mod.skipped_images(self.data)

    def resume(self) -> None:
        ck = self.rd.load_checkpoint(self.d, self.cfg.to_dict())
        self.net.load_state_dict(ck["model"])
        self.w_opt.load_state_dict(ck["w_opt"])
        self.t_opt.load_state_dict(ck["t_opt"])
        self.start, self.position = ck["epoch"], ck.get("position")
        self.rank_state = ck.get("ranks", [{}] * self.d.world)[self.d.rank]
        self.base_skipped = self.rank_state.get("skipped_images", 0)
        where = ""
        if self.position:
            where = f", after {self.position['step']} {_PHASES[self.position['phase']]} steps"
        _log(self.d, f"resuming {self.cfg.out} at epoch {self.start + 1}/{self.cfg.epochs}"
                     f"{where}")

    def state(self, epoch: int) -> dict:
        return {"epoch": epoch, "model": self.net.state_dict(),
                "w_opt": self.w_opt.state_dict(), "t_opt": self.t_opt.state_dict(),
                "config": self.cfg.to_dict()}

    def epoch(self, epoch: int) -> None:
        cfg, d, net = self.cfg, self.d, self.net
        net.temperature = temperature_at(cfg, epoch)
        search_epoch = epoch >= cfg.warmup_epochs
        pos = self.position if epoch == self.start else None
        first = (0, 0)                           # the first weight and θ step to run
        if pos:
            first = (pos["step"], 0) if pos["phase"] == 0 else (self.nw, pos["step"])
        self.t0 = time.perf_counter() - (pos["seconds"] if pos else 0.0)
        saved = self.rank_state if pos else {}    # loss*n, correct, n of each phase
        self.stats = [torch.tensor(saved.get(k, [0.0] * 3), dtype=torch.float64, device=d.device)
                      for k in ("w_stats", "t_stats")]
        self.bar = _bar(self.nw + (self.nt if search_epoch else 0), epoch, cfg, self.show_bar)
        if self.bar is not None:
            self.bar.update(first[0] + first[1])
        net.train()
        self._phase(epoch, 0, first[0], self.nw, self._w_step)
        if search_epoch:
            for p in self.w_params:
                p.requires_grad_(False)
            try:
                self._phase(epoch, 1, first[1], self.nt, self._t_step)
            finally:
                for p in self.w_params:
                    p.requires_grad_(True)
        if self.bar is not None:
            self.bar.close()
        w_stats, t_stats = (d.all_reduce_sum(s) for s in self.stats)
        m = _epoch_metrics(epoch, net, self.table, w_stats, t_stats,
                           time.perf_counter() - self.t0, search_epoch, cfg, self.nw,
                           self.nt, d)
        self.metrics.append(m)
        theta = {os.path.join(self.rd.theta, f"epoch_{epoch:03d}.json"): _theta_json(epoch, net)}
        self.rd.save(d, self.state(epoch + 1), row=m, files=theta,
                     rank_state={"skipped_images": self.skipped_images()})
        self.guard.checkpointed()
        _log(d, _summary_line(m, cfg))

    def _phase(self, epoch: int, phase: int, first: int, n: int, step) -> None:
        """Steps ``first`` .. ``n - 1`` of one phase (0: weights, 1: θ) of ``epoch``."""
        idx = (self.data.weight_idx, self.data.theta_idx)[phase]
        it = data_mod.batches(self.data.train, idx, self.cfg.batch_size, self.cfg.seed, epoch,
                              phase, start=first, **self.loader_kw)
        save = functools.partial(self._save_mid, epoch, phase)
        what = f"{_PHASES[phase]} steps of epoch {epoch + 1}"
        for i, x, y in self.guard.steps(it, first, n, save, what):
            step(epoch, i, x, y)
            _bar_update(self.bar, self.stats[phase], x.shape[0] * self.d.world, self.t0,
                        self.net, self.table, "wθ"[phase])

    def _save_mid(self, epoch: int, phase: int, step: int) -> None:
        position = {"phase": phase, "step": step, "seconds": time.perf_counter() - self.t0}
        ranks = {"w_stats": self.stats[0].tolist(), "t_stats": self.stats[1].tolist(),
                 "skipped_images": self.skipped_images()}
        self.rd.save(self.d, {**self.state(epoch), "position": position}, rank_state=ranks)

    def _w_step(self, epoch: int, i: int, x: Tensor, y: Tensor) -> None:
        cfg, net = self.cfg, self.net
        for g in self.w_opt.param_groups:
            g["lr"] = cosine_lr(cfg.w_lr, epoch * self.nw + i, cfg.epochs * self.nw)
        with torch.no_grad():
            masks = net.sample_masks(x.shape[0])
        saved = self.guard.snapshot(net)
        logits = self.model(x, masks=masks)
        loss = self.crit(logits, y, masks)
        self.w_opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.guard.step_ok(torch.isfinite(loss.detach()), net, saved,
                              f"loss at epoch {epoch + 1}, weight step {i + 1}/{self.nw}",
                              f"the weights diverged: lower --w-lr (now {cfg.w_lr})"):
            self.w_opt.step()
            _accumulate(self.stats[0], loss, logits, y)

    def _t_step(self, epoch: int, i: int, x: Tensor, y: Tensor) -> None:
        cfg, net = self.cfg, self.net
        masks = net.sample_masks(x.shape[0])
        saved = self.guard.snapshot(net)
        logits = net(x, masks=masks)
        loss = self.crit(logits, y, masks)
        self.t_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.d.average_grad(net.theta)
        where = f"epoch {epoch + 1}, θ step {i + 1}/{self.nt}"
        hint = (f"θ diverged: lower --theta-lr (now {cfg.theta_lr}) or the latency term "
                "(--alpha, --beta or --lam)")
        finite = torch.isfinite(loss.detach()) & torch.isfinite(net.theta.grad).all()
        if self.guard.step_ok(finite, net, saved, f"loss or θ gradient at {where}", hint):
            self.t_opt.step()
            if not bool(torch.isfinite(net.theta).all()):
                raise RunStopped(f"θ is not finite after {where}; likely cause: {hint}; the "
                                 "last good checkpoint is untouched")
            _accumulate(self.stats[1], loss, logits, y)


_PHASES = ("weight", "θ")


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


def _theta_json(epoch: int, net) -> str:
    d = {"epoch": epoch, "candidates": list(net.space.candidates),
         "theta": net.theta.detach().cpu().tolist()}
    return json.dumps(d) + "\n"
