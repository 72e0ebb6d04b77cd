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
from ..latency.measure import measure as measure_table
from ..latency.table import LatencyTable
from ..nn.models import count_costs
from ..nn.space import SearchSpace
from ..nn.supernet import SuperNet
from . import data as data_mod
from .config import SearchConfig, build_space, cosine_lr, flag_name, temperature_at
from .distributed import (Dist, atomic_save, atomic_write_text, rng_state, seed_all,
                          set_rng_state, setup)
from .plots import make_plots

__all__ = ["run_search", "SearchResult", "resume_config", "format_archs", "arch_accuracy",
           "finetune"]


def load_data(cfg: SearchConfig) -> data_mod.SearchData:
    if cfg.data:
        return data_mod.folder_data(cfg.data, cfg.classes, cfg.seed, cfg.resolution)
    return data_mod.builtin_data(cfg.seed, cfg.builtin_train, cfg.builtin_val,
                                 cfg.resolution, classes=cfg.classes)


# --- the run ---------------------------------------------------------------------------

@dataclass
class SearchResult:
    """What ``run_search`` returns: the run directory, the trained supernet, the summary."""

    out: str
    net: object
    summary: dict | None
    metrics: list


class _Paths:
    def __init__(self, out: str):
        self.out = out
        self.config = os.path.join(out, "config.json")
        self.lut = os.path.join(out, "lut.json")
        self.metrics = os.path.join(out, "metrics.jsonl")
        self.theta = os.path.join(out, "theta")
        self.ckpt = os.path.join(out, "checkpoint.pt")
        self.archs = os.path.join(out, "archs")
        self.summary = os.path.join(out, "summary.json")


def _log(d: Dist, msg: str) -> None:
    if d.main:
        print(msg, flush=True)


def prepare_run_dir(cfg: SearchConfig, resume: bool) -> SearchConfig:
    """Check the run directory; on resume return the saved config (explicit flags must agree)."""
    p = _Paths(cfg.out)
    if resume:
        if not os.path.exists(p.ckpt):
            raise FileNotFoundError(f"--resume: {p.ckpt!r} does not exist; nothing to resume")
        with open(p.config) as f:
            saved = SearchConfig(**json.load(f))
        return saved
    if os.path.exists(p.ckpt) or os.path.exists(p.metrics):
        raise ValueError(f"{cfg.out!r} already holds a search; pass --resume to continue it "
                         "or choose another --out")
    return cfg


def resume_config(out: str, **explicit) -> SearchConfig:
    """The saved config of ``out``; explicit settings that differ from it are an error."""
    p = _Paths(out)
    if not os.path.exists(p.config):
        raise FileNotFoundError(f"--resume: {p.config!r} does not exist; nothing to resume")
    with open(p.config) as f:
        saved = SearchConfig(**json.load(f))
    for k, v in explicit.items():
        if v is not None and k not in ("out", "preset") and getattr(saved, k) != v:
            raise ValueError(f"--resume continues the saved config: --{flag_name(k)} {v!r} differs "
                             f"from the run's {getattr(saved, k)!r}; drop the flag")
    saved.out = out
    return saved


def get_table(cfg: SearchConfig, space: SearchSpace, num_classes: int, d: Dist, paths: _Paths,
              quiet: bool, resume: bool = False):
    """The latency table: --lut, the run's own lut.json (resume), or measured now (rank 0)."""
    if cfg.lut and not (resume and os.path.exists(paths.lut)):
        if not os.path.exists(cfg.lut):
            raise FileNotFoundError(f"--lut {cfg.lut!r} does not exist")
        table = LatencyTable.load(cfg.lut)
        table.check(space, num_classes)
        if d.main:
            table.save(paths.lut)
        return table
    if not os.path.exists(paths.lut):
        if d.main:
            _log(d, f"measuring a latency table ({cfg.lut_method}) on {cfg.lut_device} for "
                    f"{space.num_layers} layers x {space.num_candidates} candidates ...")
            t0 = time.perf_counter()
            table = measure_table(
                space, device=cfg.lut_device, threads=cfg.lut_threads, method=cfg.lut_method,
                reps=cfg.lut_reps, num_classes=num_classes, seed=cfg.seed,
                progress=not quiet and sys.stderr.isatty())
            table.save(paths.lut)
            _log(d, f"latency table: {len(table.entries)} entries in "
                    f"{time.perf_counter() - t0:.1f} s -> {paths.lut}")
        d.barrier()
    table = LatencyTable.load(paths.lut)
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
    paths = _Paths(cfg.out)
    cfg = prepare_run_dir(cfg, resume)
    data = load_data(cfg)
    space = build_space(cfg)
    if d.main:
        os.makedirs(paths.theta, exist_ok=True)
        os.makedirs(paths.archs, exist_ok=True)
        if not resume:
            atomic_write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", paths.config)
    d.barrier()
    table = get_table(cfg, space, data.num_classes, d, paths, quiet, resume)

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
        ck = torch.load(paths.ckpt, map_location=d.device, weights_only=False)
        if ck["world"] != d.world:
            raise ValueError(f"the checkpoint was written by {ck['world']} process(es), this "
                             f"run has {d.world}; resume with the same number for an exact "
                             "continuation")
        net.load_state_dict(ck["model"])
        w_opt.load_state_dict(ck["w_opt"])
        t_opt.load_state_dict(ck["t_opt"])
        set_rng_state(ck["rng"][d.rank])
        start = ck["epoch"]
        _log(d, f"resuming {cfg.out} at epoch {start + 1}/{cfg.epochs}")

    metrics = _read_metrics(paths.metrics, start)
    if d.main:
        atomic_write_text("".join(json.dumps(m) + "\n" for m in metrics), paths.metrics)

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
        rngs = d.gather_object(rng_state())
        if d.main:
            _write_theta(paths, epoch, net)
            with open(paths.metrics, "a") as f:
                f.write(json.dumps(m) + "\n")
            atomic_save({"epoch": epoch + 1, "model": net.state_dict(),
                         "w_opt": w_opt.state_dict(), "t_opt": t_opt.state_dict(),
                         "rng": rngs, "world": d.world, "config": cfg.to_dict()}, paths.ckpt)
        _log(d, _summary_line(m, cfg))
        d.barrier()

    summary = None
    if end == cfg.epochs:
        summary = finish(cfg, net, table, data, d, paths, t_start, cl)
    return SearchResult(cfg.out, net, summary, metrics)


def _batches_per_epoch(n: int, cfg: SearchConfig, d: Dist) -> int:
    nb = data_mod.num_batches(n, cfg.batch_size, d.world)
    if nb == 0:
        raise ValueError(f"a split of {n} images cannot fill one batch of {cfg.batch_size} per "
                         f"process ({d.world} process(es)); lower --batch-size or use more data")
    return min(nb, cfg.max_batches) if cfg.max_batches else nb


def _read_metrics(path: str, before: int) -> list:
    """Metrics of epochs < ``before`` (a run killed after writing metrics redoes the epoch)."""
    if before == 0 or not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["epoch"] < before]


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


def _write_theta(paths: _Paths, epoch: int, net) -> None:
    d = {"epoch": epoch, "candidates": list(net.space.candidates),
         "theta": net.theta.detach().cpu().tolist()}
    atomic_write_text(json.dumps(d) + "\n", os.path.join(paths.theta, f"epoch_{epoch:03d}.json"))


# --- the end of a search: architectures, summary, plots ------------------------------------

def finetune(model, data, steps: int, lr: float, batch_size: int, seed: int, device,
             channels_last: bool, weight_decay: float = 1e-4) -> None:
    """``steps`` SGD steps (cosine from ``lr``) of one extracted architecture on the weight split.

    Weights trained inside a supernet are co-adapted to the mixture of candidates; alone,
    a path scores near chance until it has been trained a little on its own. This is
    one-shot NAS's usual "inherit, then fine-tune briefly" evaluation, not a full training."""
    if steps and len(data.weight_idx) < batch_size:
        raise ValueError(f"fine-tuning needs at least one batch of {batch_size} weight-split "
                         f"images, the split holds {len(data.weight_idx)}: use a smaller "
                         "--batch-size or --finetune-steps 0")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    model.train()
    step, epoch = 0, 0
    while step < steps:
        for x, y in data_mod.batches(data.train, data.weight_idx, batch_size, seed, epoch, 2,
                                     device=device, workers=0, channels_last=channels_last):
            for g in opt.param_groups:
                g["lr"] = cosine_lr(lr, step, steps)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
        epoch += 1


def arch_accuracy(net, arch, data, indices, batch_size: int, device, channels_last: bool,
                  workers: int = 4, calib_images: int = 1024, finetune_steps: int = 0,
                  finetune_lr: float = 0.1, seed: int = 0) -> float:
    """Top-1 of one discrete architecture, starting from the supernet's weights, on ``indices``.

    It is first fine-tuned for ``finetune_steps`` on the weight split (see ``finetune``).
    The BN running statistics then describe the mixture or the fine-tuning's last batches,
    not the final path, so they are re-estimated on ``calib_images`` weight-split images
    (one-shot NAS's usual practice) before counting."""
    model = net.extract(arch)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if finetune_steps:
        finetune(model, data, finetune_steps, finetune_lr, min(batch_size, 64), seed, device,
                 channels_last)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # a plain average over the calibration batches
        model.train()
        for x, _ in data_mod.eval_batches(data.train, batch_size, device, workers,
                                          data.weight_idx[:calib_images], channels_last):
            model(x)
        model.eval()
        correct = n = 0
        for x, y in data_mod.eval_batches(data.train, batch_size, device, workers, indices,
                                          channels_last):
            correct += int((model(x).argmax(1) == y).sum())
            n += y.shape[0]
    return correct / max(1, n)


def finish(cfg, net, table, data, d: Dist, paths: _Paths, t_start: float, cl: bool) -> dict:
    """Write archs/argmax.json, archs/sample_K.json, summary.json and the plots (rank 0)."""
    summary = None
    if d.main:
        g = torch.Generator().manual_seed(cfg.seed)
        archs = [net.to_architecture(name="argmax")]
        archs += [net.sample_architecture(g, name=f"sample_{k}")
                  for k in range(1, cfg.samples + 1)]
        rows = []
        for a in archs:
            file = os.path.join(paths.archs, f"{a.name}.json")
            a.save(file)
            costs = count_costs(a, data.num_classes)
            rows.append({
                "name": a.name, "file": os.path.relpath(file, cfg.out), "blocks": list(a.blocks),
                "latency_ms": round(table.latency(a, data.num_classes), 6),
                "macs": sum(c.macs for c in costs), "params": sum(c.params for c in costs),
                "theta_acc": round(arch_accuracy(
                    net, a, data, data.theta_idx, max(cfg.batch_size, 256), d.device, cl,
                    cfg.workers, finetune_steps=cfg.finetune_steps,
                    finetune_lr=cfg.finetune_lr, seed=cfg.seed), 6),
            })
        with open(paths.metrics) as f:
            last = [json.loads(line) for line in f if line.strip()][-1]
        summary = {
            "archs": rows, "num_classes": data.num_classes, "chance": 1.0 / data.num_classes,
            "data": data.name, "final_epoch": last,
            "expected_latency_ms": last["expected_latency_ms"],
            "theta_acc_eval": _eval_note(cfg),
            "wall_time_s": round(time.perf_counter() - t_start, 1),
        }
        atomic_write_text(json.dumps(summary, indent=2) + "\n", paths.summary)
        print(format_archs(summary))
        try:
            plots = make_plots(cfg.out)
        except Exception as e:  # plots are a convenience; never lose a finished search
            print(f"warning: plots failed: {e}", file=sys.stderr)
            plots = []
        names = "argmax.json" + {0: "", 1: ", sample_1.json"}.get(
            cfg.samples, f", sample_1..{cfg.samples}.json")
        print(f"architectures: {paths.archs}/ ({names})")
        if plots:
            print(f"plots: {os.path.dirname(plots[0])}/ ({', '.join(map(os.path.basename, plots))})")
        print(f"summary: {paths.summary}  (train one: fbnet-fast train "
              f"{os.path.join(paths.archs, 'argmax.json')} --out RUN_DIR)")
    d.barrier()
    return summary


def _eval_note(cfg) -> str:
    tuned = (f"fine-tuned for {cfg.finetune_steps} steps on the weight split"
             if cfg.finetune_steps else "not fine-tuned")
    return (f"θ-split accuracy of each architecture from the supernet's weights, {tuned}, "
            "BN statistics re-estimated; not trained from scratch")


def format_archs(summary: dict) -> str:
    """The architectures as a text table."""
    lines = [f"{'arch':<10} {'LUT ms':>9} {'MACs (M)':>9} {'params':>9} {'θ-split acc':>11}"]
    for r in summary["archs"]:
        lines.append(f"{r['name']:<10} {r['latency_ms']:>9.3f} {r['macs'] / 1e6:>9.2f} "
                     f"{r['params']:>9,} {r['theta_acc']:>11.3f}")
    lines.append(f"(chance {summary['chance']:.3f}; {summary['theta_acc_eval']})")
    return "\n".join(lines)
