"""Plots of a search run (PNG, matplotlib's Agg backend), read back from its files only.

``make_plots(run_dir)`` writes into ``run_dir/plots/``:
``probabilities_final.png`` (per-layer candidate probabilities, like the paper's Figure 4),
``probabilities_evolution.png`` (each layer's probabilities over epochs),
``curves.png`` (loss, accuracy, expected latency, temperature and mean entropy), and
``archs.png`` (sampled architectures on the latency-accuracy plane) once the run is done,
and ``baseline.png`` once ``fbnet-fast baseline`` has written ``baseline/baseline.json``
(``plot_baseline``: architectures trained from scratch, searched against random).
"""
from __future__ import annotations

import glob
import json
import math
import os

from .rundir import RunDir

__all__ = ["make_plots", "load_run", "plot_baseline"]


def load_run(run_dir: str) -> dict:
    """config, metrics (list), theta (list of (epoch, [[...]])), candidates, summary."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir!r} does not exist")
    rd = RunDir(run_dir)
    if not os.path.exists(rd.metrics):
        raise FileNotFoundError(f"{run_dir!r} has no metrics.jsonl: not a search run "
                                "directory, or no epoch has finished yet")
    with open(rd.metrics) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    thetas, candidates = [], None
    for p in sorted(glob.glob(os.path.join(rd.theta, "epoch_*.json"))):
        with open(p) as f:
            t = json.load(f)
        thetas.append((t["epoch"], t["theta"]))
        candidates = t["candidates"]
    summary = None
    if os.path.exists(rd.summary):
        with open(rd.summary) as f:
            summary = json.load(f)
    config = {}
    if os.path.exists(rd.config):
        with open(rd.config) as f:
            config = json.load(f)
    return {"config": config, "metrics": metrics, "theta": thetas, "candidates": candidates,
            "summary": summary}


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def make_plots(run_dir: str) -> list:
    """Write every plot the run's files allow; returns the PNG paths."""
    import matplotlib  # deferred: slow to import, and only the plots need it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = load_run(run_dir)
    out = RunDir(run_dir).plots
    os.makedirs(out, exist_ok=True)
    written = []

    def save(fig, name):
        path = os.path.join(out, name)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    if run["theta"]:
        cands = run["candidates"]
        epoch, theta = run["theta"][-1]
        probs = [_softmax(r) for r in theta]
        L = len(probs)
        fig, ax = plt.subplots(figsize=(0.6 * len(cands) + 2, 0.3 * L + 1.5))
        im = ax.imshow(probs, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(cands)), cands, rotation=45, ha="right")
        ax.set_yticks(range(L), [f"TBS {i + 1}" for i in range(L)])
        for i, row in enumerate(probs):
            j = max(range(len(row)), key=row.__getitem__)
            ax.text(j, i, f"{row[j]:.2f}", ha="center", va="center", fontsize=6, color="w")
        fig.colorbar(im, ax=ax, label="softmax(θ)")
        ax.set_title(f"candidate probabilities after epoch {epoch + 1}")
        save(fig, "probabilities_final.png")

        epochs = [e + 1 for e, _ in run["theta"]]
        series = [[_softmax(t[l]) for _, t in run["theta"]] for l in range(L)]
        cols = 6
        rows = math.ceil(L / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 1.8 * rows), sharex=True,
                                 sharey=True, squeeze=False)
        cmap = plt.get_cmap("tab10")
        for l in range(rows * cols):
            ax = axes[l // cols][l % cols]
            if l >= L:
                ax.axis("off")
                continue
            for k, name in enumerate(cands):
                ax.plot(epochs, [p[k] for p in series[l]], color=cmap(k % 10), lw=1,
                        label=name, marker="." if len(epochs) < 15 else None)
            ax.set_title(f"TBS {l + 1}", fontsize=8)
            ax.set_ylim(0, 1)
            ax.tick_params(labelsize=6)
        axes[0][0].legend(fontsize=5, loc="upper left", ncol=2)
        fig.supxlabel("epoch")
        fig.supylabel("probability")
        fig.suptitle("candidate probabilities over epochs")
        save(fig, "probabilities_evolution.png")

    m = run["metrics"]
    if m:
        ep = [r["epoch"] + 1 for r in m]
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
        ax = axes[0]
        ax.plot(ep, [r["train_loss"] for r in m], marker=".", label="weights (80 %)")
        ax.plot(ep, [r["theta_loss"] for r in m], marker=".", label="θ (20 %)")
        ax.set_title("loss")
        ax.legend()
        ax = axes[1]
        ax.plot(ep, [r["train_acc"] for r in m], marker=".", label="weights (80 %)")
        ax.plot(ep, [r["theta_acc"] for r in m], marker=".", label="θ (20 %)")
        chance = (run["summary"] or {}).get("chance")
        if chance:
            ax.axhline(chance, color="grey", ls=":", label="chance")
        ax.set_title("accuracy (supernet, Gumbel masks)")
        ax.legend()
        ax = axes[2]
        ax.plot(ep, [r["expected_latency_ms"] for r in m], marker=".", label="E[lat] softmax(θ)")
        if "argmax_latency_ms" in m[0]:
            ax.plot(ep, [r["argmax_latency_ms"] for r in m], marker=".", label="argmax arch")
        ax.set_title("latency (LUT, ms)")
        ax.legend()
        ax = axes[3]
        ax.plot(ep, [r["temperature"] for r in m], marker=".", label="τ")
        ax.plot(ep, [sum(r["entropy"]) / len(r["entropy"]) for r in m], marker=".",
                label="mean layer entropy")
        ax.set_title("temperature and entropy")
        ax.legend()
        from matplotlib.ticker import MaxNLocator
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        save(fig, "curves.png")

    s = run["summary"]
    if s and s.get("archs"):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for r in s["archs"]:
            main = r["name"] == "argmax"
            ax.scatter(r["latency_ms"], r["theta_acc"], s=60 if main else 30,
                       marker="*" if main else "o", color="C3" if main else "C0")
            ax.annotate(r["name"], (r["latency_ms"], r["theta_acc"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.axhline(s["chance"], color="grey", ls=":", label="chance")
        ax.set_xlabel("LUT latency (ms)")
        ax.set_ylabel("θ-split top-1")
        ax.set_title("sampled architectures: accuracy with the supernet's weights\n"
                     "(θ split, no retraining: cheap, not a from-scratch result)", fontsize=9)
        ax.legend()
        save(fig, "archs.png")
    if os.path.exists(RunDir(run_dir).baseline):
        written.append(plot_baseline(run_dir))
    return written


def plot_baseline(run_dir: str) -> str:
    """``plots/baseline.png``: validation top-1 against LUT latency of the architectures
    trained from scratch by ``fbnet-fast baseline`` (``baseline/baseline.json``), random
    ones as a cloud, searched ones marked and labelled; returns its path."""
    import matplotlib  # deferred: slow to import, and only the plots need it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = RunDir(run_dir).baseline
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} does not exist: run fbnet-fast baseline {run_dir} "
                                "first")
    with open(path) as f:
        b = json.load(f)
    rows = [r for r in b["rows"] if r.get("val_acc") is not None]
    rand = [r for r in rows if r["source"] == "random"]
    found = [r for r in rows if r["source"] != "random"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if rand:
        ax.scatter([r["latency_ms"] for r in rand], [r["val_acc"] for r in rand], s=18,
                   color="grey", alpha=0.6, label=f"random ({len(rand)})")
    for r in found:
        main = r["name"] == "argmax"
        ax.scatter(r["latency_ms"], r["val_acc"], s=90 if main else 40,
                   marker="*" if main else "o", color="C3" if main else "C0",
                   edgecolors="k", linewidths=0.5, zorder=3)
        ax.annotate(r["name"], (r["latency_ms"], r["val_acc"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    if any(r["name"] == "argmax" for r in found):
        ax.scatter([], [], s=90, marker="*", color="C3", edgecolors="k", linewidths=0.5,
                   label="argmax (searched)")
    if any(r["name"] != "argmax" for r in found):
        ax.scatter([], [], s=40, color="C0", edgecolors="k", linewidths=0.5,
                   label="sampled (searched)")
    n = b.get("settings", {}).get("num_classes")
    if n:
        ax.axhline(1.0 / n, color="grey", ls=":", label="chance")
    s = b.get("summary", {})
    st = b.get("settings", {})
    ax.set_xlabel("LUT latency (ms)")
    ax.set_ylabel("validation top-1")
    title = "trained from scratch: searched vs random architectures"
    if s.get("beats") is not None:
        title += (f"\nargmax beats {s['beats']} of {s['random']} random on the {s['loss']} "
                  f"objective; {s['dominated_by']} dominate it")
    if st.get("epochs"):
        title += f" ({st['epochs']} epoch{'s' * (st['epochs'] != 1)} each)"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    out = RunDir(run_dir).plots
    os.makedirs(out, exist_ok=True)
    png = os.path.join(out, "baseline.png")
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return png
