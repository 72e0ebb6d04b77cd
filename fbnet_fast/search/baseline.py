"""Does the search beat chance? ``run_baseline(RUN_DIR, random=K)`` trains the run's final
architectures (``archs/*.json``) and K architectures drawn uniformly from the run's space,
each from scratch with the same budget, data and recipe, and compares them.

Recipe (``evaluate.finetune`` on fresh weights): every training image of the run (weight
and θ splits together), ``epochs`` × the run's batches per epoch SGD steps (momentum 0.9,
cosine from the run's ``w_lr``, its ``w_wd``, its batch size; ``max_batches`` caps the
batches per epoch as it capped the search's), the same init seed and data order for every
architecture; then top-1 and mean cross-entropy on the validation images, which the search
never saw. Latency: the run's own table. The objective is the run's search loss
(``latency.loss.objective``: mult, add or none, with its alpha, beta, lam) per
architecture; lower is better.

Writes ``RUN_DIR/baseline/baseline.json`` (``{"rows", "summary", "settings"}``) after every
architecture, so an interrupted run continues where it stopped (an architecture already
in the file, trained with the same settings, is not trained again), and
``RUN_DIR/plots/baseline.png``.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import sys

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..backends import registry
from ..latency.loss import default_unit, objective
from ..latency.table import LatencyTable
from ..nn.architecture import Architecture, sample_architectures
from ..nn.models import create_model
from . import data as data_mod
from .config import SearchConfig, build_space, uses_channels_last
from .distributed import pick_device, seed_all
from .evaluate import finetune
from .faults import finite_or_none
from .plots import plot_baseline
from .rundir import RunDir, atomic_write_text

__all__ = ["run_baseline", "compare", "objective_formula", "format_baseline",
           "load_searched"]

# settings a user chooses; a file made with other values is not continued (--fresh)
_FLAGS = {"epochs": "--epochs", "seed": "--seed", "random": "--random"}


def run_baseline(run_dir: str, random: int = 10, epochs: int = 5, seed: int | None = None,
                 quiet: bool = False, fresh: bool = False) -> dict:
    """Train the search's architectures and ``random`` random ones of its space; returns
    (and writes) ``{"rows": [...], "summary": {...}, "settings": {...}}``.

    ``seed``: init seed and data order of every architecture, and the draw of the random
    ones (default: the run's seed). ``fresh``: ignore a baseline.json already there.
    Bad input (a missing run directory or file, a bad number) is a ``ValueError`` or
    ``FileNotFoundError`` with one line saying what to do."""
    if isinstance(random, bool) or not isinstance(random, int) or random < 0:
        raise ValueError(f"--random must be an integer >= 0, got {random!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"--epochs must be an integer >= 1, got {epochs!r}")
    rd = RunDir(run_dir)
    cfg = _load_config(rd)
    seed = cfg.seed if seed is None else seed
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    space = build_space(cfg)
    searched = load_searched(rd, space)
    data = data_mod.load_data(cfg, cfg.resolution)
    if data.val is None:
        raise FileNotFoundError(f"{cfg.data!r} has no val/ folder: the baseline is scored on "
                                "validation images the search never saw")
    table = LatencyTable.load(rd.lut)
    table.check(space, data.num_classes)
    drawn = sample_architectures(space, random, seed, exclude=[a.blocks for a in searched])
    if len(drawn) < random:
        raise ValueError(f"the space holds fewer than {random} architectures besides the "
                         f"searched ones (found {len(drawn)}); lower --random")
    archs = [("search", a) for a in searched]
    archs += [("random", dataclasses.replace(a, name=f"random_{i}"))
              for i, a in enumerate(drawn, 1)]

    n_train = data_mod.dataset_size(data.train)
    all_idx = torch.arange(n_train)
    nb = data_mod.num_batches(n_train, cfg.batch_size)
    if nb == 0:
        raise ValueError(f"{n_train} training images cannot fill one batch of "
                         f"{cfg.batch_size} (the run's --batch-size)")
    if cfg.max_batches:
        nb = min(nb, cfg.max_batches)
    settings = {"epochs": epochs, "seed": seed, "random": random,
                "steps": epochs * nb, "batches_per_epoch": nb, "batch_size": cfg.batch_size,
                "lr": cfg.w_lr, "weight_decay": cfg.w_wd, "momentum": 0.9,
                "train_images": n_train, "val_images": data_mod.dataset_size(data.val),
                "data": data.name, "num_classes": data.num_classes}
    path = rd.baseline
    done = {} if fresh else _previous(path, settings)

    device = pick_device(cfg.device)
    cl = uses_channels_last(cfg, device)
    todo = [(src, a) for src, a in archs if (src, tuple(a.blocks)) not in done]
    bar = None
    if not quiet and sys.stderr.isatty():
        bar = tqdm(total=len(archs), initial=len(archs) - len(todo), desc="baseline",
                   unit="arch", leave=False, dynamic_ncols=True)
    rows = []
    for src, a in archs:
        key = (src, tuple(a.blocks))
        latency = round(table.latency(a, data.num_classes), 6)
        if key in done:   # trained before; the latency is always the run's table's
            rows.append({**done[key], "name": a.name, "latency_ms": latency})
            continue
        if bar is not None:
            bar.set_postfix_str(f"training {a.name}", refresh=True)
        acc, ce = _train_one(a, data, all_idx, settings, cfg, device, cl)
        rows.append(finite_or_none({
            "name": a.name, "source": src, "blocks": list(a.blocks),
            "latency_ms": latency,
            "val_acc": round(acc, 6), "val_ce": round(ce, 6) if math.isfinite(ce) else ce}))
        _write(path, rows, cfg, settings)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    result = _write(path, rows, cfg, settings)
    print(format_baseline(result))
    try:
        plot = plot_baseline(run_dir)
    except Exception as e:  # a plot is a convenience; never lose trained rows
        print(f"warning: baseline plot failed: {e}", file=sys.stderr)
        plot = None
    print(f"baseline: {path}" + (f"  plot: {plot}" if plot else ""))
    return result


def _load_config(rd: RunDir) -> SearchConfig:
    out = rd.out
    if not os.path.isdir(out):
        raise FileNotFoundError(f"run directory {out!r} does not exist; give a directory "
                                "written by fbnet-fast search")
    if not os.path.exists(rd.config):
        raise FileNotFoundError(f"{out!r} has no config.json: not a search run directory "
                                "(fbnet-fast search --out RUN_DIR writes one)")
    for what in (rd.lut, rd.archs):
        if not os.path.exists(what):
            raise FileNotFoundError(
                f"{out!r} has no {os.path.basename(what)}{'/' if what == rd.archs else ''}: "
                f"the search has not finished; finish it with fbnet-fast search --out {out} "
                "--resume")
    try:
        saved = rd.saved_config()
    except json.JSONDecodeError as e:
        raise ValueError(f"{rd.config!r} is not valid JSON: {e}") from None
    known = {f.name for f in dataclasses.fields(SearchConfig)}
    cfg = SearchConfig(**{k: v for k, v in saved.items() if k in known})
    cfg.validate()
    return cfg


def _arch_order(path: str):
    stem = os.path.splitext(os.path.basename(path))[0]
    m = re.fullmatch(r"sample_(\d+)", stem)
    return (0, 0, "") if stem == "argmax" else (1, int(m.group(1)), "") if m else (2, 0, stem)


def load_searched(rd: RunDir, space) -> list:
    """The run's final architectures, named after their files: argmax, sample_1, ..."""
    files = sorted(glob.glob(os.path.join(rd.archs, "*.json")), key=_arch_order)
    if not any(os.path.basename(p) == "argmax.json" for p in files):
        raise FileNotFoundError(f"{rd.archs!r} has no argmax.json: the search has not "
                                f"finished; finish it with fbnet-fast search --out {rd.out} "
                                "--resume")
    out = []
    for p in files:
        a = Architecture.load(p)
        if a.space.to_dict() != space.to_dict():
            raise ValueError(f"{p!r} belongs to another space than the run's config.json")
        out.append(dataclasses.replace(a, name=os.path.splitext(os.path.basename(p))[0]))
    return out


def _previous(path: str, settings: dict) -> dict:
    """Rows of a baseline.json made with the same settings, by (source, blocks)."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            old = json.load(f)
        old_settings, rows = old["settings"], old["rows"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{path!r} is not a baseline file this version can continue; pass "
                         "--fresh to start over") from None
    for k, flag in _FLAGS.items():
        if old_settings.get(k) != settings[k]:
            raise ValueError(f"{path!r} was made with {flag} {old_settings.get(k)}, not "
                             f"{settings[k]}: pass the same settings to continue it, or "
                             "--fresh to start over")
    for k, v in settings.items():
        if old_settings.get(k) != v:
            raise ValueError(f"{path!r} was made with {k} {old_settings.get(k)!r}, now "
                             f"{v!r} (the run changed): pass --fresh to start over")
    return {(r["source"], tuple(r["blocks"])): r for r in rows}


def _train_one(arch, data, all_idx, settings: dict, cfg, device, cl: bool):
    """Train ``arch`` from scratch (``evaluate.finetune`` on fresh weights); (val top-1,
    mean val CE)."""
    seed_all(settings["seed"])          # the same init seed for every architecture
    model = registry.fast_layers(create_model(arch, data.num_classes).to(device), device,
                                 cfg.backend)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    finetune(model, data, settings["steps"], settings["lr"], settings["batch_size"],
             settings["seed"], device, cl, weight_decay=settings["weight_decay"],
             indices=all_idx)
    model.eval()
    correct = ce = n = 0.0
    with torch.no_grad():
        for x, y in data_mod.eval_batches(data.val, max(cfg.batch_size, 256), device,
                                          cfg.workers, None, cl):
            logits = model(x).float()
            ce += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += y.shape[0]
    return correct / max(1.0, n), ce / max(1.0, n)


def objective_formula(mode: str, alpha: float, beta: float, lam: float) -> str:
    if mode == "mult":
        return f"CE * {alpha} * (log LAT_{default_unit(mode)})^{beta}"
    if mode == "add":
        return f"CE + {lam} * LAT_{default_unit(mode)}"
    return "CE"


def _dominates(r: dict, a: dict) -> bool:
    """``r`` is at least as accurate and at least as fast as ``a``, strictly one of them."""
    if r["val_acc"] is None or a["val_acc"] is None:
        return False
    return (r["val_acc"] >= a["val_acc"] and r["latency_ms"] <= a["latency_ms"]
            and (r["val_acc"] > a["val_acc"] or r["latency_ms"] < a["latency_ms"]))


def compare(rows: list, mode: str = "mult", alpha: float = 0.2, beta: float = 0.6,
            lam: float = 0.01, reference: str = "argmax") -> dict:
    """The summary of baseline rows: each row's objective (the search loss of ``mode``
    with its val CE and LUT latency; lower is better; None when its CE is not finite),
    and for each searched row how many random rows it beats (strictly lower objective),
    ties, and which random rows dominate it (val_acc >= and latency_ms <=, one strictly).
    The ``reference`` row's figures are also at the top level."""
    obj = {}
    for r in rows:
        ce = r.get("val_ce")
        obj[r["name"]] = (None if ce is None or not math.isfinite(ce)
                          else round(objective(ce, r["latency_ms"], mode, alpha, beta, lam), 6))
    worst = math.inf

    def key(name):
        return worst if obj[name] is None else obj[name]

    rand = [r for r in rows if r["source"] == "random"]
    searched = {}
    for a in rows:
        if a["source"] != "search":
            continue
        doms = [r["name"] for r in rand if _dominates(r, a)]
        searched[a["name"]] = {
            "objective": obj[a["name"]],
            "beats": sum(key(a["name"]) < key(r["name"]) for r in rand),
            "ties": sum(key(a["name"]) == key(r["name"]) for r in rand),
            "dominated_by": len(doms), "dominators": doms}
    accs = [r["val_acc"] for r in rand if r["val_acc"] is not None]
    out = {"loss": mode, "formula": objective_formula(mode, alpha, beta, lam),
           "objective": obj, "reference": reference, "random": len(rand),
           "random_val_acc_mean": round(sum(accs) / len(accs), 6) if accs else None,
           "random_val_acc_max": max(accs) if accs else None,
           "searched": searched}
    if reference in searched:
        ref = searched[reference]
        out.update({k: ref[k] for k in ("beats", "ties", "dominated_by", "dominators")})
    return out


def _write(path: str, rows: list, cfg, settings: dict) -> dict:
    result = {"rows": rows,
              "summary": compare(rows, cfg.latency_loss, cfg.alpha, cfg.beta, cfg.lam),
              "settings": settings}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(json.dumps(finite_or_none(result), indent=2) + "\n", path)
    return result


def format_baseline(result: dict) -> str:
    """The rows as a text table, then the summary line."""
    s = result["summary"]
    lines = [f"{'arch':<10} {'source':<7} {'LUT ms':>8} {'val acc':>8} {'val CE':>8} "
             f"{'objective':>10}"]

    def num(v, w, p):
        return f"{'-':>{w}}" if v is None else f"{v:>{w}.{p}f}"
    for r in result["rows"]:
        lines.append(f"{r['name']:<10} {r['source']:<7} {r['latency_ms']:>8.3f} "
                     f"{num(r['val_acc'], 8, 3)} {num(r['val_ce'], 8, 3)} "
                     f"{num(s['objective'][r['name']], 10, 4)}")
    st = result["settings"]
    recipe = (f"each trained from scratch {st['epochs']} epoch{'s' * (st['epochs'] != 1)} "
              f"({st['steps']} steps) on "
              f"{st['train_images']} training images, scored on {st['val_images']} "
              f"validation images")
    if s.get("beats") is None:
        lines.append(f"({recipe})")
        return "\n".join(lines)
    lines.append(f"argmax: objective {num(s['objective'].get(s['reference']), 0, 4).strip()} "
                 f"({s['loss']}: {s['formula']}) beats {s['beats']} of {s['random']} random "
                 f"architectures; {s['dominated_by']} random ones dominate it (val acc >= "
                 f"and latency <=); {recipe}")
    return "\n".join(lines)
