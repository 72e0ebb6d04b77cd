"""The end of a search: the final architectures (archs/*.json), summary.json, the text
table printed for them, and the plots. Rank 0 writes; every rank waits for it."""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from ..nn.models import count_costs
from .distributed import Dist
from .evaluate import arch_accuracy
from .plots import make_plots
from .rundir import RunDir, atomic_write_text

__all__ = ["finish", "format_archs"]


def finish(cfg, net, table, data, d: Dist, rd: RunDir, last: dict, t_start: float,
           cl: bool, skipped=lambda: 0) -> dict | None:
    """Write archs/argmax.json, archs/sample_K.json, summary.json and the plots.

    ``last``: the final epoch's metrics; ``skipped()``: the undecodable images skipped so
    far. Returns the summary on rank 0, None elsewhere."""
    summary = None
    if d.main:
        g = torch.Generator().manual_seed(cfg.seed)
        archs = [net.to_architecture(name="argmax")]
        archs += [net.sample_architecture(g, name=f"sample_{k}")
                  for k in range(1, cfg.samples + 1)]
        rows = []
        for a in archs:
            file = os.path.join(rd.archs, f"{a.name}.json")
            a.save(file)
            costs = count_costs(a, data.num_classes)
            rows.append({
                "name": a.name, "file": os.path.relpath(file, cfg.out), "blocks": list(a.blocks),
                "latency_ms": round(table.latency(a, data.num_classes), 6),
                "macs": sum(c.macs for c in costs), "params": sum(c.params for c in costs),
                "theta_acc": round(arch_accuracy(
                    net, a, data, data.theta_idx, max(cfg.batch_size, 256), d.device, cl,
                    cfg.workers, finetune_steps=cfg.finetune_steps,
                    finetune_lr=cfg.finetune_lr, seed=cfg.seed, backend=cfg.backend), 6),
            })
        summary = {
            "archs": rows, "num_classes": data.num_classes, "chance": 1.0 / data.num_classes,
            "data": data.name, "final_epoch": last,
            "expected_latency_ms": last["expected_latency_ms"],
            "theta_acc_eval": _eval_note(cfg),
            "wall_time_s": round(time.perf_counter() - t_start, 1),
            "skipped_images": skipped(),
        }
        atomic_write_text(json.dumps(summary, indent=2) + "\n", rd.summary)
        print(format_archs(summary))
        try:
            plots = make_plots(cfg.out)
        except Exception as e:  # plots are a convenience; never lose a finished search
            print(f"warning: plots failed: {e}", file=sys.stderr)
            plots = []
        names = "argmax.json" + {0: "", 1: ", sample_1.json"}.get(
            cfg.samples, f", sample_1..{cfg.samples}.json")
        print(f"architectures: {rd.archs}/ ({names})")
        if plots:
            print(f"plots: {os.path.dirname(plots[0])}/ "
                  f"({', '.join(map(os.path.basename, plots))})")
        print(f"summary: {rd.summary}  (train one: fbnet-fast train "
              f"{os.path.join(rd.archs, 'argmax.json')} --out RUN_DIR)")
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
