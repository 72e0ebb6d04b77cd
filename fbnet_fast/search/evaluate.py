"""How good a final architecture of a search is, cheaply: extracted with the supernet's
weights, optionally fine-tuned briefly, BN statistics re-estimated, scored on the θ split."""
from __future__ import annotations

import torch

from ..backends import registry
from . import data as data_mod
from .config import cosine_lr, sgd

__all__ = ["finetune", "arch_accuracy"]


def finetune(model, data, steps: int, lr: float, batch_size: int, seed: int, device,
             channels_last: bool, weight_decay: float = 1e-4, indices=None) -> None:
    """``steps`` SGD steps (momentum 0.9, cosine from ``lr``) of ``model`` on ``indices`` of
    ``data.train`` (default: the weight split); batches drawn by ``search.data.batches`` (stream 2),
    epoch after epoch until the steps are done.

    Weights trained inside a supernet are co-adapted to the mixture of candidates; alone,
    a path scores near chance until it has been trained a little on its own. This is
    one-shot NAS's usual "inherit, then fine-tune briefly" evaluation, not a full training.
    ``fbnet-fast baseline`` trains fresh models with it on all training images."""
    if indices is None:
        indices, what = data.weight_idx, "weight-split images"
        hint = "use a smaller --batch-size or --finetune-steps 0"
    else:
        what, hint = "training images", "use a smaller --batch-size"
    if steps and len(indices) < batch_size:
        raise ValueError(f"fine-tuning needs at least one batch of {batch_size} {what}, "
                         f"the split holds {len(indices)}: {hint}")
    opt = sgd(model.parameters(), lr, 0.9, weight_decay, every_step=True)
    model.train()
    step, epoch = 0, 0
    while step < steps:
        for x, y in data_mod.batches(data.train, indices, batch_size, seed, epoch, 2,
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
                  finetune_lr: float = 0.1, seed: int = 0, backend: str = "auto") -> float:
    """Top-1 of one discrete architecture, starting from the supernet's weights, on ``indices``.

    It is first fine-tuned for ``finetune_steps`` on the weight split (see ``finetune``).
    The BN running statistics then describe the mixture or the fine-tuning's last batches,
    not the final path, so they are re-estimated on ``calib_images`` weight-split images
    (one-shot NAS's usual practice) before counting. ``backend``: the search's MixedBlock
    backend, which also decides whether the model trains on the C++ layers
    (``registry.fast_layers``)."""
    model = registry.fast_layers(net.extract(arch), device, backend)
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
