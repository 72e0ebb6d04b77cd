"""``SuperNet``: the FBNet search network (stem, one MixedBlock per layer, head) and θ."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .architecture import Architecture
from .blocks import ConvBNReLU
from .mixed_block import MixedBlock
from .models import FBNet
from .space import SearchSpace

__all__ = ["SuperNet", "GUMBEL_MODES", "MASK_KINDS"]

GUMBEL_MODES = ("per-batch", "per-example")
MASK_KINDS = ("soft", "hard", "two-path")


class SuperNet(nn.Module):
    """FBNet supernet over a ``SearchSpace``.

    In training mode ``net(x)`` samples Gumbel-softmax masks from ``theta`` at
    ``temperature`` (one per batch or one per example, ``gumbel``) and keeps them in
    ``last_masks`` (Tensor[L, K] or Tensor[L, N, K]) for the latency term. ``mask="hard"``
    makes each mask one-hot in the forward pass while θ gets the soft mask's gradient
    (straight-through, as in GDAS): the weights then learn single paths, which is what
    the extracted architectures run, and with per-batch masks only the sampled block of
    each layer runs. ``mask="two-path"`` (ProxylessNAS) draws two candidates per layer
    from softmax(θ) and mixes them by their renormalised probabilities; only those two
    run, and θ's gradient comes through them. The paper's soft masks (the default) train
    the whole mixture. In eval mode
    it runs the argmax architecture (``eval_arch = "argmax"``) or the expected mixture
    under softmax(θ) (``eval_arch = "softmax"``). ``net(x, arch=...)`` runs one
    discrete architecture, executing only the chosen block of each layer.
    """

    def __init__(self, space: SearchSpace | None = None, num_classes: int = 1000,
                 backend: str = "auto", temperature: float = 5.0, gumbel: str = "per-batch",
                 mask: str = "soft"):
        super().__init__()
        self.space = space = space or SearchSpace()
        if gumbel not in GUMBEL_MODES:
            raise ValueError(f"gumbel must be one of {GUMBEL_MODES}, got {gumbel!r}")
        if mask not in MASK_KINDS:
            raise ValueError(f"mask must be one of {MASK_KINDS}, got {mask!r}")
        if mask == "two-path" and gumbel != "per-batch":
            raise ValueError("mask='two-path' draws one pair of candidates per layer and "
                             "batch: use gumbel='per-batch'")
        self.gumbel = gumbel
        self.mask = mask
        self.temperature = float(temperature)
        self.eval_arch = "argmax"
        self.stem = ConvBNReLU(3, space.stem_out, 3, space.effective_stem_stride)
        layers = space.layers()
        self.blocks = nn.ModuleList(
            MixedBlock(l.in_channels, l.out_channels, l.stride, space.candidates, backend)
            for l in layers)
        self.head = ConvBNReLU(layers[-1].out_channels, space.head_out, 1)
        self.classifier = nn.Linear(space.head_out, num_classes)
        self.theta = nn.Parameter(torch.zeros(len(layers), space.num_candidates))
        self.last_masks: Tensor | None = None

    # -- parameter groups (the search trains them with different optimisers) -----
    def arch_parameters(self) -> list:
        return [self.theta]

    def weight_parameters(self) -> list:
        return [p for n, p in self.named_parameters() if n != "theta"]

    # -- masks ---------------------------------------------------------------------
    def sample_masks(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """Gumbel-softmax masks: Tensor[L, K] (per batch) or Tensor[L, N, K] (per example).

        Hard masks are exactly one-hot in value; their gradient is the soft mask's.
        Two-path masks have two non-zero entries per layer, summing to 1."""
        if self.mask == "two-path":
            p = self.probabilities()
            pair = torch.multinomial(p.detach(), 2, replacement=False, generator=generator)
            chosen = p.gather(1, pair)
            return torch.zeros_like(p).scatter(1, pair, chosen / chosen.sum(1, keepdim=True))
        shape = self.theta.shape if self.gumbel == "per-batch" else (
            self.theta.shape[0], batch, self.theta.shape[1])
        e = torch.empty(shape, device=self.theta.device, dtype=self.theta.dtype)
        g = -e.exponential_(generator=generator).log()  # Gumbel(0, 1) noise
        logits = self.theta if self.gumbel == "per-batch" else self.theta.unsqueeze(1)
        soft = F.softmax((logits + g) / self.temperature, dim=-1)
        if self.mask == "soft":
            return soft
        hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
        return hard + (soft - soft.detach())

    def probabilities(self) -> Tensor:
        return F.softmax(self.theta, dim=-1)

    # -- architectures ----------------------------------------------------------------
    def argmax_indices(self) -> list:
        return self.theta.argmax(dim=-1).tolist()

    def to_architecture(self, indices: Sequence[int] | None = None, name=None) -> Architecture:
        idx = self.argmax_indices() if indices is None else list(indices)
        return Architecture([self.space.candidates[i] for i in idx], self.space, name)

    def sample_architecture(self, generator: torch.Generator | None = None,
                            name=None) -> Architecture:
        """Draw one block per layer from softmax(θ)."""
        idx = torch.multinomial(self.probabilities().detach().cpu(), 1,
                                generator=generator).squeeze(1).tolist()
        return self.to_architecture(idx, name)

    def _indices(self, arch) -> list:
        if isinstance(arch, Architecture):
            names = arch.blocks
        else:
            names = list(arch)
        if len(names) != len(self.blocks):
            raise ValueError(
                f"architecture has {len(names)} layers, the supernet has {len(self.blocks)}")
        out = []
        for i, n in enumerate(names):
            if isinstance(n, int):
                if not 0 <= n < self.space.num_candidates:
                    raise ValueError(f"layer {i + 1}: candidate index {n} out of range")
                out.append(n)
            elif n in self.space.candidates:
                out.append(self.space.candidates.index(n))
            else:
                raise ValueError(
                    f"layer {i + 1}: {n!r} is not a candidate of this space "
                    f"({', '.join(self.space.candidates)})")
        return out

    # -- forward ---------------------------------------------------------------------
    def forward(self, x: Tensor, masks: Tensor | None = None, arch=None) -> Tensor:
        """x (Tensor[N, 3, R, R]) -> logits (Tensor[N, classes])."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"SuperNet expects images Tensor[N, 3, H, W], got {tuple(x.shape)}")
        if arch is None and masks is None and not self.training and self.eval_arch == "argmax":
            arch = self.argmax_indices()
        h = self.stem(x)
        if arch is not None:
            for block, i in zip(self.blocks, self._indices(arch)):
                h = block(h, i)
        else:
            if masks is None:
                masks = (self.sample_masks(x.shape[0]) if self.training
                         else self.probabilities())
            self.last_masks = masks
            if self.mask != "soft" and masks.dim() == 2:
                # sparse per-batch masks: only the sampled blocks run (GDAS, ProxylessNAS);
                # multiplying by their mask entries passes θ's gradient
                active = (masks.detach() != 0).tolist()
                for l, block in enumerate(self.blocks):
                    terms = [block(h, i) * masks[l, i]
                             for i, on in enumerate(active[l]) if on]
                    h = sum(terms[1:], terms[0])
            else:
                for l, block in enumerate(self.blocks):
                    h = block(h, masks[l])
        h = self.head(h)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))

    def extract(self, arch=None, num_classes: int | None = None):
        """A standalone ``FBNet`` of one architecture carrying the supernet's trained weights."""
        idx = self.argmax_indices() if arch is None else self._indices(arch)
        model = FBNet(self.to_architecture(idx), self.classifier.out_features)
        model.stem.load_state_dict(self.stem.state_dict())
        model.head.load_state_dict(self.head.state_dict())
        model.classifier.load_state_dict(self.classifier.state_dict())
        for l, (block, i) in enumerate(zip(self.blocks, idx)):
            model.blocks[l].load_state_dict(block.block(i).state_dict())
        return model.to(self.theta.device)
