"""Search and training data: the built-in synthetic set and ImageNet-layout folders.

Both give ``SearchData``: a training set split 80/20 into a *weight* part and a *θ* part
(stratified per class, reproducible from a seed), a validation set, and the class names.
Batches are drawn by ``batches`` in an order that is a pure function of
(seed, epoch, stream), sharded over ranks like ``DistributedSampler``, so a resumed or
multi-process run sees exactly the data an uninterrupted one would.

The built-in set ("shapes-textures", ``make_builtin``) needs no download: 32x32 RGB
images whose class is a (coarse shape, fine texture) pair, so a network needs both a
large receptive field (ring vs disk vs square ...) and fine local filters (stripes vs
checkerboard) to tell all classes apart. See ``make_builtin`` and docs/search.md.

An image file that cannot be decoded never raises inside a loader worker: the folder
returns a ``BadImage`` in its place, and the batch it lands in stops the run with one line
naming the file, or, with ``skip_bad_images``, is drawn without it (the file is counted in
the dataset's ``skipped`` list and named in a warning).
"""
from __future__ import annotations

import math
import os
import random
import sys
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset, default_collate

__all__ = ["SearchData", "load_data", "make_builtin", "builtin_data", "folder_data",
           "split_indices", "choose_classes", "batches", "num_batches", "BUILTIN_SHAPES",
           "BUILTIN_TEXTURES", "IMAGENET_MEAN", "IMAGENET_STD", "BadImage", "BadImageError",
           "skipped_images", "dataset_size"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

BUILTIN_SHAPES = ("disk", "ring", "square", "cross", "diamond")
BUILTIN_TEXTURES = ("stripes", "checker")


@dataclass
class SearchData:
    """Datasets of one run. ``train`` is indexed by ``weight_idx`` / ``theta_idx``.

    ``train``/``val`` are either ``(images Tensor[N,3,R,R] float, labels Tensor[N])``
    in memory (built-in set) or torch ``Dataset`` objects (folders).
    """

    train: object
    val: object
    weight_idx: Tensor
    theta_idx: Tensor
    classes: list
    name: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_memory(self) -> bool:
        return isinstance(self.train, tuple)


def dataset_size(ds) -> int:
    """Images in ``ds``: an in-memory ``(images, labels)`` pair or a ``Dataset``."""
    return len(ds[1]) if isinstance(ds, tuple) else len(ds)


def load_data(cfg, resolution: int) -> SearchData:
    """The data of a run: the image folders ``cfg.data``, else the built-in set.

    ``cfg`` is a ``SearchConfig`` or a ``TrainConfig`` (its ``data``, ``classes``, ``seed``
    and ``builtin_*`` settings); training takes ``resolution`` from its architecture."""
    if cfg.data:
        return folder_data(cfg.data, cfg.classes, cfg.seed, resolution,
                           skip_bad_images=cfg.skip_bad_images)
    return builtin_data(cfg.seed, cfg.builtin_train, cfg.builtin_val, resolution,
                        classes=cfg.classes)


# --- the built-in data set -------------------------------------------------------------

def make_builtin(n: int, seed: int = 0, resolution: int = 32, noise: float = 0.1):
    """``n`` images (Tensor[n, 3, R, R], normalised) and labels (Tensor[n]) of 10 classes.

    Class ``c = 2 * shape + texture`` with shape in ``BUILTIN_SHAPES`` (disk, ring,
    square, cross, diamond) and texture in ``BUILTIN_TEXTURES`` (stripes: a sine grating
    of random orientation; checker: the product of two orthogonal gratings). Each image
    has the shape at a random position and size (radius 0.22-0.38 of the side), filled
    with its texture (period 3-5 px, random phase) in a random colour and its complement, on
    a random background colour with a low-frequency random gradient, plus Gaussian
    pixel noise (``noise``). Colour and position carry no class information. Labels are
    balanced (``c = i mod 10`` before a seeded shuffle). Deterministic in ``seed``;
    about 0.3 s for 10,000 images.
    """
    if n < 1 or resolution < 8:
        raise ValueError(f"need n >= 1 and resolution >= 8, got {n}, {resolution}")
    g = torch.Generator().manual_seed(int(seed))
    k = len(BUILTIN_SHAPES) * len(BUILTIN_TEXTURES)
    labels = torch.arange(n) % k
    labels = labels[torch.randperm(n, generator=g)]
    shape, texture = labels // len(BUILTIN_TEXTURES), labels % len(BUILTIN_TEXTURES)

    def u(lo, hi, *size):
        return lo + (hi - lo) * torch.rand((n,) + size, generator=g)

    R = resolution
    coords = (torch.arange(R, dtype=torch.float32) + 0.5) / R            # [R] in (0, 1)
    yy, xx = coords.view(1, R, 1), coords.view(1, 1, R)
    r = u(0.22, 0.38).view(n, 1, 1)
    cx = (r.view(n) + torch.rand(n, generator=g) * (1 - 2 * r.view(n))).view(n, 1, 1)
    cy = (r.view(n) + torch.rand(n, generator=g) * (1 - 2 * r.view(n))).view(n, 1, 1)
    dx, dy = (xx - cx) / r, (yy - cy) / r                                 # unit = radius
    d = torch.sqrt(dx ** 2 + dy ** 2)
    masks = torch.stack([
        d < 1.0,                                                          # disk
        (d < 1.0) & (d > 0.55),                                           # ring
        torch.maximum(dx.abs(), dy.abs()) < 0.8,                          # square
        ((dx.abs() < 0.3) & (dy.abs() < 1.0)) | ((dy.abs() < 0.3) & (dx.abs() < 1.0)),  # cross
        dx.abs() + dy.abs() < 1.0,                                        # diamond
    ], dim=1).float()                                                     # [n, 5, R, R]
    mask = masks[torch.arange(n), shape]                                  # [n, R, R]

    # Fine texture in pixel units: period 3-5 px, random orientation and phase.
    period = u(3.0, 5.0).view(n, 1, 1) / R
    ang = u(0.0, math.pi).view(n, 1, 1)
    ph1, ph2 = u(0, 2 * math.pi).view(n, 1, 1), u(0, 2 * math.pi).view(n, 1, 1)
    a = (xx * torch.cos(ang) + yy * torch.sin(ang)) * (2 * math.pi / period) + ph1
    b = (-xx * torch.sin(ang) + yy * torch.cos(ang)) * (2 * math.pi / period) + ph2
    stripes = torch.sin(a)
    checker = torch.sin(a) * torch.sin(b) * 2.0
    tex = torch.where(texture.view(n, 1, 1) == 0, stripes, checker).clamp(-1, 1)
    tex = 0.5 + 0.5 * tex                                                 # [n, R, R] in [0, 1]

    fg1, bg = u(0, 1, 3), u(0, 1, 3)                                      # colours [n, 3]
    fg2 = 1 - fg1                                 # complement: the texture always shows
    fg = fg1.view(n, 3, 1, 1) * tex.unsqueeze(1) + fg2.view(n, 3, 1, 1) * (1 - tex.unsqueeze(1))
    grad = (u(-0.3, 0.3, 3).view(n, 3, 1, 1) * (xx - 0.5).unsqueeze(1)
            + u(-0.3, 0.3, 3).view(n, 3, 1, 1) * (yy - 0.5).unsqueeze(1))
    back = bg.view(n, 3, 1, 1) + grad
    m = mask.unsqueeze(1)
    img = m * fg + (1 - m) * back
    img = img + noise * torch.randn(img.shape, generator=g)
    img = (img - 0.5) / 0.3                                               # roughly zero-mean
    return img.contiguous(), labels


def builtin_data(seed: int = 0, train_size: int = 5000, val_size: int = 1000,
                 resolution: int = 32, theta_fraction: float = 0.2,
                 classes: int | None = None) -> SearchData:
    """The built-in set: ``train_size`` training and ``val_size`` validation images.

    Training and validation images come from different generator seeds (derived from
    ``seed``), so they never repeat. ``classes`` keeps a seeded subset of the 10 classes.
    """
    names = [f"{s}-{t}" for s in BUILTIN_SHAPES for t in BUILTIN_TEXTURES]
    xt, yt = make_builtin(train_size, _derive(seed, 1), resolution)
    xv, yv = make_builtin(val_size, _derive(seed, 2), resolution)
    if classes is not None:
        keep = choose_classes(names, classes, seed)
        remap = torch.full((len(names),), -1, dtype=torch.long)
        for new, name in enumerate(keep):
            remap[names.index(name)] = new
        xt, yt = _filter(xt, remap[yt])
        xv, yv = _filter(xv, remap[yv])
        names = keep
    w, t = split_indices(yt.tolist(), theta_fraction, seed)
    return SearchData((xt, yt), (xv, yv), w, t, names, "builtin")


def _filter(x: Tensor, y: Tensor):
    keep = y >= 0
    return x[keep].contiguous(), y[keep]


def _derive(seed: int, stream: int) -> int:
    """A distinct, stable seed per (seed, stream)."""
    return (int(seed) * 1_000_003 + stream * 7919) % (2 ** 63 - 1)


# --- class subsets and the 80/20 split ---------------------------------------------------

def choose_classes(names: list, k: int | None, seed: int) -> list:
    """``k`` of ``names`` chosen reproducibly from ``seed``, in sorted order (all if None)."""
    names = sorted(names)
    if k is None:
        return names
    if not 1 <= k <= len(names):
        raise ValueError(f"--classes {k}: the data has {len(names)} classes; "
                         f"choose between 1 and {len(names)}")
    return sorted(random.Random(_derive(seed, 3)).sample(names, k))


def split_indices(targets, theta_fraction: float = 0.2, seed: int = 0):
    """Stratified split of sample indices into (weight_idx, theta_idx), both sorted.

    Each class contributes ``round(theta_fraction * count)`` images to θ (at least one
    when it has two or more), chosen from a seeded permutation; the rest go to weights.
    """
    if not 0 < theta_fraction < 1:
        raise ValueError(f"theta fraction must be in (0, 1), got {theta_fraction}")
    targets = torch.as_tensor(list(targets), dtype=torch.long)
    g = torch.Generator().manual_seed(_derive(seed, 4))
    w, t = [], []
    for c in torch.unique(targets).tolist():
        idx = torch.nonzero(targets == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        nt = int(round(theta_fraction * len(idx)))
        if len(idx) >= 2:
            nt = min(max(nt, 1), len(idx) - 1)
        t.append(idx[:nt])
        w.append(idx[nt:])
    return torch.cat(w).sort().values, torch.cat(t).sort().values


# --- image folders (ImageNet layout) -----------------------------------------------------

def _class_dirs(root: str) -> list:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def folder_data(path: str, classes: int | None = None, seed: int = 0, resolution: int = 224,
                theta_fraction: float = 0.2, skip_bad_images: bool = False) -> SearchData:
    """``path/train/<class>/*`` and ``path/val/<class>/*`` as torchvision ``ImageFolder``s.

    Train: RandomResizedCrop(R) + horizontal flip + normalise; val: resize to R/0.875 +
    center crop R + normalise. ``classes`` keeps a seeded subset; val must have a folder
    for each kept class (a missing val/ folder is allowed: then val is None).
    ``skip_bad_images``: draw batches without the files that cannot be decoded.
    """
    from torchvision import datasets, transforms  # deferred: optional, and slow to import
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data folder {path!r} does not exist")
    train_dir, val_dir = os.path.join(path, "train"), os.path.join(path, "val")
    if not os.path.isdir(train_dir):
        raise FileNotFoundError(
            f"data folder {path!r} has no train/ sub-folder; expected the ImageNet layout "
            "train/<class>/<image> and val/<class>/<image>")
    all_classes = _class_dirs(train_dir)
    if not all_classes:
        raise ValueError(f"{train_dir!r} has no class sub-folders (train/<class>/<image>)")
    keep = choose_classes(all_classes, classes, seed)
    mapping = {c: i for i, c in enumerate(keep)}
    norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    t_train = transforms.Compose([
        transforms.RandomResizedCrop(resolution), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), norm])
    t_val = transforms.Compose([
        transforms.Resize(int(round(resolution / 0.875))), transforms.CenterCrop(resolution),
        transforms.ToTensor(), norm])
    train = _subset_folder(datasets.ImageFolder, train_dir, mapping, t_train, skip_bad_images)
    val = None
    if os.path.isdir(val_dir):
        missing = [c for c in keep if not os.path.isdir(os.path.join(val_dir, c))]
        if missing:
            raise ValueError(f"{val_dir!r} has no folder for class(es) {missing[:5]}; val/ "
                             "needs the same class folders as train/")
        val = _subset_folder(datasets.ImageFolder, val_dir, mapping, t_val, skip_bad_images)
    w, t = split_indices(train.targets, theta_fraction, seed)
    return SearchData(train, val, w, t, keep, path)


@dataclass
class BadImage:
    """Stands in for a sample whose file could not be decoded (see ``_checked``)."""

    path: str
    reason: str


class BadImageError(ValueError):
    """An image file that cannot be decoded, without --skip-bad-images."""


def _subset_folder(cls, root, mapping, transform, skip_bad: bool = False):
    """An ImageFolder that only walks the kept class folders and returns a ``BadImage``
    for a file it cannot decode."""

    class _Subset(cls):
        def find_classes(self, directory):
            return list(mapping), dict(mapping)

        def __getitem__(self, i):
            try:
                return super().__getitem__(i)
            except Exception as e:  # PIL's UnidentifiedImageError, a truncated file, ...
                return BadImage(self.samples[i][0], f"{type(e).__name__}: {e}")

    try:
        ds = _Subset(root, transform=transform)
    except FileNotFoundError as e:
        raise ValueError(f"{root!r}: no images found ({e}); supported extensions: "
                         f"{', '.join(IMG_EXTENSIONS)}") from None
    ds.skip_bad, ds.skipped = skip_bad, []
    return ds


def skipped_images(data: SearchData) -> int:
    """How many undecodable files this process has skipped in ``data``."""
    return sum(len(getattr(ds, "skipped", ())) for ds in (data.train, data.val))


def _collate(samples):
    """A batch of the decodable samples, and the ``BadImage``s left out of it."""
    good = [s for s in samples if not isinstance(s, BadImage)]
    return ((default_collate(good) if good else None),
            [s for s in samples if isinstance(s, BadImage)])


def _checked(ds, batch):
    """The images and labels of a ``_collate`` batch; a bad image stops here (one line
    naming the file) unless the dataset skips them."""
    xy, bad = batch
    for b in bad:
        if not getattr(ds, "skip_bad", False):
            raise BadImageError(f"cannot decode image {b.path} ({b.reason.splitlines()[0]}); "
                                "remove the file or pass --skip-bad-images to skip such files")
        ds.skipped.append(b.path)
        print(f"warning: skipped undecodable image {b.path}", file=sys.stderr, flush=True)
    if xy is None:
        raise BadImageError(f"no image of a batch could be decoded (the first: {bad[0].path})")
    return xy


# --- batches ---------------------------------------------------------------------------

def _order(n: int, seed: int, epoch: int, stream: int) -> Tensor:
    g = torch.Generator().manual_seed(_derive(_derive(seed, stream), 1000 + epoch))
    return torch.randperm(n, generator=g)


def num_batches(n: int, batch_size: int, world: int = 1) -> int:
    """Batches per epoch and rank (incomplete last batches are dropped)."""
    return n // (batch_size * world)


def shard(indices: Tensor, batch_size: int, seed: int, epoch: int, stream: int,
          rank: int = 0, world: int = 1) -> Tensor:
    """This rank's sample indices for one epoch: Tensor[num_batches, batch_size]."""
    order = indices[_order(len(indices), seed, epoch, stream)]
    nb = num_batches(len(indices), batch_size, world)
    if nb == 0:
        raise ValueError(
            f"{len(indices)} samples cannot fill one batch of {batch_size} per process "
            f"({world} process(es)); lower --batch-size")
    order = order[:nb * batch_size * world].view(nb, world, batch_size)
    return order[:, rank]


def batches(data, indices: Tensor, batch_size: int, seed: int, epoch: int, stream: int,
            rank: int = 0, world: int = 1, device="cpu", workers: int = 4,
            channels_last: bool = False, start: int = 0):
    """Yield ``(images, labels)`` on ``device`` for one epoch of ``indices`` of ``data``.

    The order depends only on (seed, epoch, stream); each rank takes every
    ``world``-th batch slot, like ``DistributedSampler``. Tensor data is sliced in
    memory; a ``Dataset`` goes through a ``DataLoader`` (workers, pin_memory on GPU)
    whose augmentation seed is derived from (seed, epoch, stream, rank) as well.
    ``start``: begin at that batch (a resume in the middle of an epoch).
    """
    device = torch.device(device)
    plan = shard(indices, batch_size, seed, epoch, stream, rank, world)[start:]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if isinstance(data, tuple):
        x, y = data
        for b in plan:
            yield (x[b].to(device, non_blocking=True).contiguous(memory_format=fmt),
                   y[b].to(device, non_blocking=True))
        return
    g = torch.Generator().manual_seed(_derive(_derive(seed, stream), 10_000 + epoch * 64 + rank))
    loader = DataLoader(data, batch_sampler=plan.tolist(), num_workers=workers,
                        pin_memory=device.type == "cuda", generator=g,
                        persistent_workers=False, collate_fn=_collate)
    for batch in loader:
        xb, yb = _checked(data, batch)
        yield (xb.to(device, non_blocking=True).contiguous(memory_format=fmt),
               yb.to(device, non_blocking=True))


def eval_batches(data, batch_size: int, device="cpu", workers: int = 4,
                 indices: Tensor | None = None, channels_last: bool = False):
    """Every sample of ``data`` (or of ``indices``) once, in order, last batch kept."""
    device = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if isinstance(data, tuple):
        x, y = data
        idx = torch.arange(len(y)) if indices is None else indices
        for s in range(0, len(idx), batch_size):
            b = idx[s:s + batch_size]
            yield x[b].to(device).contiguous(memory_format=fmt), y[b].to(device)
        return
    ds = data if indices is None else Subset(data, indices.tolist())
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers,
                        pin_memory=device.type == "cuda", collate_fn=_collate)
    for batch in loader:
        xb, yb = _checked(data, batch)
        yield xb.to(device).contiguous(memory_format=fmt), yb.to(device)
