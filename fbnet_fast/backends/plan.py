"""The fused plan: what every fused backend derives from a layer's ``MixedLayout``, and the
BatchNorm math they share (docs/architecture.md, "The fused plan").

The fused pipeline runs all conv candidates over the concatenated expanded channels,
as NHWC rows. Column r of the expanded tensor is channel r *after* the channel shuffle,
which makes the shuffle a row order of the dense first 1x1 (grouped candidates are
block-diagonal in it) and lets the depthwise, BN2 and the second 1x1 read their
parameters in stored order; only BN1's parameters and statistics are permuted
(``shuffle`` / ``unshuffle``). A plan is built once per layout (``plan_for``); its index
tensors are moved to a device on first use there.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from ..nn.layout import BN_EPS, BN_MOMENTUM, MixedLayout
from ..nn.space import conv_out

__all__ = ["FusedPlan", "plan_for", "Segment", "DwRun", "dw_weights", "Geometry", "DeviceIndex",
           "BNCoef", "BNGrad", "bn_coef", "batch_stats", "bn_grad", "update_running",
           "bn1_stats_via_covariance", "BN_ROLES", "fused_op_args", "call_fused_op",
           "register_fused_autograd", "op_impl"]


class Segment(NamedTuple):
    """Output columns [out_start, +out_len) = input columns [in_start, +in_len) @ W^T, with W
    the row-major [out_len, in_len] block at ``w_offset`` of a flat weight (the fields of
    the Triton kernels' ``pointwise.Segment``, which take this as it is)."""

    out_start: int
    out_len: int
    in_start: int
    in_len: int
    w_offset: int


class DwRun(NamedTuple):
    """Expanded channels [channel_start, +channels) share kernel size ``kernel``; their
    depthwise weights are the [channels, kernel*kernel] block at ``w_offset`` of dw_weight
    (the fields of the Triton kernels' ``depthwise.DwRun``)."""

    channel_start: int
    channels: int
    kernel: int
    w_offset: int


def dw_weights(dw: Tensor, runs) -> list:
    """The flat dw_weight as one Tensor[channels, K, K] view per depthwise run (the C++ and
    CUDA ops' weight list)."""
    return [dw[r.w_offset:r.w_offset + r.channels * r.kernel ** 2]
            .view(r.channels, r.kernel, r.kernel) for r in runs]


@dataclass(frozen=True)
class Geometry:
    """One call's shapes: N images of H x W in, ``stride``, and the plan's depthwise runs
    (which only the depthwise step reads)."""

    n: int
    h: int
    w: int
    stride: int
    runs: tuple = ()

    @property
    def ho(self) -> int:
        return conv_out(self.h, self.stride)

    @property
    def wo(self) -> int:
        return conv_out(self.w, self.stride)

    @property
    def rows_in(self) -> int:
        """N*H*W: the rows of x and of the expanded tensor before the depthwise (BN1's count)."""
        return self.n * self.h * self.w

    @property
    def rows_out(self) -> int:
        """N*H'*W': the rows after the depthwise (the count of BN2, BN3 and the skip BN)."""
        return self.n * self.ho * self.wo

    # NHWC rows as the channels_last Tensor[N, C, H, W] views the C++/CUDA ops take.
    def image_in(self, rows: Tensor) -> Tensor:
        return rows.view(self.n, self.h, self.w, rows.shape[-1]).permute(0, 3, 1, 2)

    def image_out(self, rows: Tensor) -> Tensor:
        return rows.view(self.n, self.ho, self.wo, rows.shape[-1]).permute(0, 3, 1, 2)


class DeviceIndex(NamedTuple):
    """The plan's index tensors on one device (see ``FusedPlan``)."""

    perm: Optional[Tensor]
    mask_cols: Tensor


class _Pw1Block(NamedTuple):
    """Rows [row0, +rows) of the dense first-1x1 matrix, from pw1_weight[offset:]: one
    candidate with ``groups`` > 1, or a run of ungrouped ones (the same rows, in order).
    The shuffle puts a grouped candidate's output channel o = g * mid_g + j (group g) in row
    j * G + g, reading input columns [g * cin_g, +cin_g): a diagonal over the two group
    dimensions of its rows."""

    row0: int
    rows: int
    offset: int
    groups: int
    in_channels: int

    def packed_view(self, w: Tensor) -> Tensor:
        G, C = self.groups, self.in_channels
        block = w[self.offset:self.offset + self.rows * (C // G)]
        return block.view(self.rows, C) if G == 1 else block.view(G, self.rows // G, C // G)

    def dense_view(self, dense: Tensor) -> Tensor:
        G, C = self.groups, self.in_channels
        rows = dense[self.row0:self.row0 + self.rows]
        if G == 1:
            return rows
        return (rows.view(self.rows // G, G, G, C // G).diagonal(dim1=1, dim2=2)
                .permute(2, 0, 1))


@dataclass(frozen=True, eq=False)
class FusedPlan:
    """Where every candidate's channels and weights go in the fused pipeline.

    ``perm`` is None when no candidate is grouped: then the flat weights are already dense
    and no channel moves.
    """

    layout: MixedLayout
    perm: Optional[tuple]        # expanded column r <- BN1 (stored-order) channel perm[r]
    pw2_groups: tuple            # Segment per (candidate, group): Z columns <- expanded ones
    dw_runs: tuple               # DwRun per stretch of candidates with equal kernel size
    mask_cols: tuple             # candidate (mask) columns: conv candidates, then skip
    stat_sizes: tuple            # channels of bn1, bn2, bn3, skip_bn in packed statistics
    _on: dict = field(default_factory=dict, repr=False)

    @property
    def n_conv(self) -> int:
        return len(self.layout.slots)

    def geometry(self, x_shape) -> Geometry:
        """The shapes of a call on x (Tensor[N, C_in, H, W])."""
        n, _, h, w = x_shape
        return Geometry(n, h, w, self.layout.stride, self.dw_runs)

    def on(self, device) -> DeviceIndex:
        """The index tensors on ``device``, made there once. Made under a fake mode (a
        fake kernel while torch.compile traces) they are fake and not kept: a kept one
        would reach the real kernels later."""
        key = str(device)
        idx = self._on.get(key)
        if idx is None:
            idx = DeviceIndex(*(None if v is None else
                                torch.tensor(v, dtype=torch.long, device=device)
                                for v in (self.perm, self.mask_cols)))
            if type(idx.mask_cols) is torch.Tensor:
                self._on[key] = idx
        return idx

    # -- moving data between stored and fused order --------------------------------------
    def shuffle(self, t: Tensor) -> Tensor:
        """BN1 values in stored order -> expanded-column order."""
        return _gather(t, self.on(t.device).perm)

    def unshuffle(self, t: Tensor) -> Tensor:
        """Inverse of ``shuffle`` (BN1 statistics and gradients back to stored order)."""
        return _scatter(t, self.on(t.device).perm)

    def dense_pw1(self, w: Tensor) -> Tensor:
        """pw1_weight as the flat dense [T, C_in] matrix of the first GEMM: one strided copy
        per grouped candidate and per run of ungrouped ones (an element-wise index costs
        2-4x more on the widest layers, every call)."""
        if self.perm is None:
            return w
        L = self.layout
        dense = w.new_zeros(L.total_mid, L.in_channels)
        for b in self._pw1_blocks:
            b.dense_view(dense).copy_(b.packed_view(w))
        return dense.view(-1)

    def packed_pw1(self, dense: Tensor) -> Tensor:
        """The gradient of the dense first GEMM's weight, back in pw1_weight's order."""
        if self.perm is None:
            return dense
        d = dense.view(self.layout.total_mid, self.layout.in_channels)
        return torch.cat([b.dense_view(d).reshape(-1) for b in self._pw1_blocks])

    @cached_property
    def _pw1_blocks(self) -> list:
        """pw1_weight in pieces, in order: each grouped candidate, each run of ungrouped ones."""
        C, out = self.layout.in_channels, []
        for s in self.layout.slots:
            G = s.spec.groups
            if G == 1 and out and out[-1].groups == 1:
                out[-1] = out[-1]._replace(rows=out[-1].rows + s.mid)
            else:
                out.append(_Pw1Block(s.mid_offset, s.mid, s.pw1_offset, G, C))
        return out

    @cached_property
    def pw1_block_ints(self) -> list:
        """``_pw1_blocks`` as the flat (row0, rows, offset, groups) ints of the C++ ops
        ``pw1_dense`` and ``pw1_packed`` (one call where the views above take 5-7 per block)."""
        return [v for b in self._pw1_blocks for v in b[:4]]

    @cached_property
    def pw2_segments(self) -> list:
        """``pw2_groups`` as the flat list of ints the C++ ``pointwise_bn`` ops take."""
        return [v for seg in self.pw2_groups for v in seg]

    # -- the BN statistics a fused op returns, packed into one tensor ---------------------
    def pack_stats(self, stats: dict) -> Tensor:
        """Tensor[2, S]: every BN's (mean, biased variance) from ``{role: (mean, var)}``
        (roles in ``BN_ROLES`` order, BN1's in expanded-column order), stored order."""
        pairs = [stats[r] for r in BN_ROLES if r in stats]
        pairs[0] = (self.unshuffle(pairs[0][0]), self.unshuffle(pairs[0][1]))
        return torch.stack([torch.cat([m for m, _ in pairs]), torch.cat([v for _, v in pairs])])

    def unpack_stats(self, packed: Tensor) -> dict:
        """Inverse of ``pack_stats``; also reads the running statistics packed the same way."""
        roles = [(r, s) for r, s in zip(BN_ROLES, self.stat_sizes) if s]
        parts = packed.split([s for _, s in roles], 1)     # one call, views
        out = {r: part.unbind() for (r, _), part in zip(roles, parts)}  # not tuple(): slower
        out["bn1"] = tuple(self.shuffle(t) for t in out["bn1"])
        return out


# The channel permutation of BN1's vectors (T elements).
def _gather(t: Tensor, index: Optional[Tensor]) -> Tensor:
    return t if index is None else t.index_select(0, index)


def _scatter(t: Tensor, index: Optional[Tensor]) -> Tensor:
    """t's rows moved to ``index`` (a permutation; t itself without one)."""
    return t if index is None else torch.empty_like(t).index_copy_(0, index, t)


def _build(L: MixedLayout) -> FusedPlan:
    if not L.slots:
        raise ValueError("the fused backends need at least one conv candidate; use the "
                         "reference backend for a skip-only layer")
    C, O, T = L.in_channels, L.out_channels, L.total_mid
    grouped = any(s.spec.groups > 1 for s in L.slots)
    perm = [0] * T      # plain ints: a plan may first be built while torch.compile traces
    runs, groups = [], []
    for s in L.slots:
        G, mid = s.spec.groups, s.mid
        mid_g, out_g = mid // G, O // G
        # pw1 output channel o (group o // mid_g) lands in expanded column ``col``:
        # channel_shuffle moves channel g * mid_g + j to j * G + g.
        for o in range(mid):
            perm[s.mid_offset + (o % mid_g) * G + o // mid_g] = s.mid_offset + o
        if runs and runs[-1].kernel == s.spec.kernel:
            runs[-1] = runs[-1]._replace(channels=runs[-1].channels + mid)
        else:
            runs.append(DwRun(s.mid_offset, mid, s.spec.kernel, s.dw_offset))
        for g in range(G):
            seg = Segment(s.out_offset + g * out_g, out_g, s.mid_offset + g * mid_g, mid_g,
                          s.pw2_offset + g * out_g * mid_g)
            groups.append(seg)
    skip = L.skip_index >= 0
    cols = tuple(s.index for s in L.slots) + ((L.skip_index,) if skip else ())
    n_skip = O if skip and L.skip_is_conv else 0
    return FusedPlan(L, tuple(perm) if grouped else None, tuple(groups), tuple(runs), cols,
                     (T, T, len(L.slots) * O, n_skip))


@lru_cache(maxsize=256)
def _plan_of_key(key: str) -> FusedPlan:
    return _build(MixedLayout.from_key(key))


def plan_for(layout: MixedLayout | str) -> FusedPlan:
    """The cached plan of a layout, or of its ``key()`` (the CPU op's string argument)."""
    return _plan_of_key(layout if isinstance(layout, str) else layout.key())


# --- BatchNorm as per-channel affine maps --------------------------------------------------

class BNCoef(NamedTuple):
    """A BN as used: its statistics (batch ones in training, running ones in eval) and the
    per-channel map ``y = x * scale + shift``."""

    mean: Tensor
    var: Tensor      # biased
    rstd: Tensor     # 1 / sqrt(var + eps)
    scale: Tensor    # gamma * rstd
    shift: Tensor    # beta - mean * scale


def bn_coef(mean: Tensor, var: Tensor, gamma: Tensor, beta: Tensor,
            eps: float = BN_EPS) -> BNCoef:
    rstd = torch.rsqrt(var + eps)
    scale = gamma * rstd
    return BNCoef(mean, var, rstd, scale, beta - mean * scale)


def batch_stats(s1: Tensor, s2: Tensor, count: int) -> tuple:
    """(mean, biased variance) from per-channel sums of x and x**2 over ``count`` rows
    (clamped at 0: the difference can round below it)."""
    mean = s1 / count
    return mean, (s2 / count - mean * mean).clamp_min(0)


class BNGrad(NamedTuple):
    """BN backward as ``dz = alpha * g + beta * z + delta`` per channel, with the gradients
    of gamma and beta; in eval mode beta and delta are zero."""

    alpha: Tensor
    beta: Tensor
    delta: Tensor
    dgamma: Tensor
    dbeta: Tensor


def bn_grad(bn: BNCoef, gamma: Tensor, sum_g: Tensor, sum_gz: Tensor, count: int,
            training: bool) -> BNGrad:
    """From sum(g) and sum(g * z) per channel (g = dL/d(BN output), z = BN input) over
    ``count`` rows; the batch statistics' own gradient is folded into beta and delta."""
    # dgamma = (Σgz - mean Σg) rstd, beta = -alpha rstd dgamma / count,
    # delta = -alpha Σg / count - beta mean: fused and in place, each op a launch on a GPU
    dgamma = torch.addcmul(sum_gz, bn.mean, sum_g, value=-1).mul_(bn.rstd)
    alpha = gamma * bn.rstd
    if not training:
        zero = torch.zeros_like(alpha)
        return BNGrad(alpha, zero, zero, dgamma, sum_g)
    beta = (alpha * bn.rstd).mul_(dgamma).mul_(-1 / count)
    delta = (beta * bn.mean).neg_().addcmul_(alpha, sum_g, value=-1 / count)
    return BNGrad(alpha, beta, delta, dgamma, sum_g)


def bn1_stats_via_covariance(rows: int, in_channels: int) -> bool:
    """Whether the CPU backend takes BN1's statistics from the input's [C_in, C_in] covariance
    (T C_in^2 multiply-adds) rather than a pass over A ([M, T] read), and so its forward
    need not write A: from M > C_in^2 / 16, about where the GEMM rate over the copy bandwidth
    puts the break-even. The 7x7 and 3x3 maps with C_in >= 112 have fewer rows. (A training
    call that keeps A for its backward writes it regardless: csrc/cpu/mixed_block.cpp,
    keeps_a.)"""
    return 16 * rows > in_channels * in_channels


BN_ROLES = ("bn1", "bn2", "bn3", "skip_bn")   # the BNs of a MixedBlock, in packed order


@torch.no_grad()
def update_running(running_means: list, running_vars: list, stats: Tensor, counts: list,
                   momenta: list, tracked: list = ()) -> None:
    """The running-statistics update of ``F.batch_norm`` for several BNs from ``stats``,
    Tensor[2, S]: their batch means and biased variances one BN after the other (what the
    fused ops return), each over ``counts[i]`` values per channel (the running variance is
    unbiased). ``momenta``: one per BN, None for ``nn.BatchNorm2d``'s plain average over the
    batches counted in ``tracked`` (each BN's ``num_batches_tracked``, counted up here). It
    runs on every training call: on the CPU one C++ call (``bn_running_update``), elsewhere
    foreach calls for all BNs at once."""
    if stats.device.type == "cpu" and hasattr(torch.ops.fbnet_fast, "bn_running_update"):
        torch.ops.fbnet_fast.bn_running_update.default(
            running_means, running_vars, list(tracked), stats, counts, momentum_values(momenta))
    else:
        _update_running_foreach(running_means, running_vars, stats, counts, momenta, tracked)


def momentum_values(momenta: list) -> list:
    """``momenta`` as the C++ ops take them: floats, -1 for None (a plain average)."""
    return [-1.0 if m is None else float(m) for m in momenta]


def _update_running_foreach(running_means, running_vars, stats, counts, momenta, tracked=()):
    """``update_running`` on any device."""
    for t in tracked:
        t.add_(1)
    ms = [1.0 / float(t) if m is None else m
          for m, t in zip(momenta, tracked or [None] * len(momenta))]
    st = stats.to(running_means[0].dtype)
    sizes = [t.shape[0] for t in running_means]
    unbiased = torch._foreach_mul(list(st[1].split(sizes)), [c / (c - 1) for c in counts])
    torch._foreach_mul_(running_means, [1 - m for m in ms])
    torch._foreach_add_(running_means, torch._foreach_mul(list(st[0].split(sizes)), ms))
    torch._foreach_mul_(running_vars, [1 - m for m in ms])
    torch._foreach_add_(running_vars, torch._foreach_mul(unbiased, ms))


# --- the adapter between a MixedBlock and a fused op --------------------------------------

def fused_op_args(block, x: Tensor, weights: Tensor) -> tuple:
    """The arguments every fused MixedBlock op (``fbnet_fast::mixed_block_*``) takes: x, the
    mask, pw1, dw, pw2, bn1-3 weight/bias, the skip conv and its BN (None without one), the
    running mean/var of each BN (in ``BN_ROLES`` order), the layout's key and the mode."""
    has_skip = block.skip_weight is not None
    roles = BN_ROLES if has_skip else BN_ROLES[:3]
    running = [getattr(block, f"{r}_running_{k}") for r in roles for k in ("mean", "var")]
    skip = ((block.skip_weight, block.skip_bn_weight, block.skip_bn_bias) if has_skip
            else (None, None, None))
    return (x, weights, block.pw1_weight, block.dw_weight, block.pw2_weight,
            block.bn1_weight, block.bn1_bias, block.bn2_weight, block.bn2_bias,
            block.bn3_weight, block.bn3_bias, *skip, running, block.layout.key(), block.training)


def call_fused_op(op, block, x: Tensor, weights: Tensor, *extra, eager=None) -> Tensor:
    """y from a fused MixedBlock op, then the BN running statistics from the statistics it
    returns: the op mutates nothing, so ``torch.compile`` traces it as one node. Outside a
    trace, ``eager`` (``register_fused_autograd``'s Function, when the backend has one) runs
    the same implementation without the custom op's dispatch."""
    geo = Geometry(x.shape[0], x.shape[2], x.shape[3], block.layout.stride)
    if block.training and min(geo.rows_in, geo.rows_out) <= 1:
        raise ValueError("Expected more than 1 value per channel when training, got input "
                         f"size {tuple(x.shape)}")
    args = fused_op_args(block, x, weights)
    running = args[14]
    momenta = [BN_MOMENTUM] * (len(running) // 2)
    y, stats, updated = run_fused_op(op, (*args, *extra), eager,
                                     (momenta, ()) if block.training else None)
    if block.training and not updated:
        update_running(running[0::2], running[1::2], stats,
                       [geo.rows_in, *[geo.rows_out] * (len(momenta) - 1)], momenta)
    return y


def run_fused_op(op, args: tuple, eager=None, running_update: Optional[tuple] = None) -> tuple:
    """(y, statistics, updated) of a fused MixedBlock op on ``args``: the custom op under a
    trace, else the backend's eager path ``eager`` (an object with ``apply`` recording the
    backward and ``impl`` without it: ``register_fused_autograd``'s Function, or the CPU
    backend's own), or with no graph to record its implementation itself.
    ``running_update``: ``(momenta, tracked)`` as ``update_running`` takes them, handed as
    the last argument to an eager path whose ``updates_running`` says it updates the running
    statistics in its own call (``updated`` says whether it did; else the caller does)."""
    if eager is None or torch.compiler.is_compiling():
        return (*op(*args), False)
    update = running_update if getattr(eager, "updates_running", False) else None
    more = () if update is None else (update,)
    y, stats = (eager.apply if torch.is_grad_enabled() else eager.impl)(*args, *more)
    return y, stats, update is not None


_EAGER_ONLY = ("running_update",)
"""Parameters of the implementations that only the eager path passes (``run_fused_op``)."""


def op_impl(impl: Callable) -> Callable:
    """``impl`` as its custom op sees it: without the parameters that only the eager path
    passes (``_EAGER_ONLY``), so the op's schema and torch.compile's traces keep to x, the
    weights and the statistics, and the op mutates nothing."""
    def op(*args, **kwargs):
        return impl(*args, **kwargs)

    sig = inspect.signature(impl, eval_str=True)  # its annotations, in its own module
    op.__signature__ = sig.replace(parameters=[q for q in sig.parameters.values()
                                               if q.name not in _EAGER_ONLY])
    op.__name__ = op.__qualname__ = impl.__name__
    op.__module__, op.__doc__ = impl.__module__, impl.__doc__
    return op


def register_fused_autograd(name: str, forward_impl: Optional[Callable] = None,
                            backward_impl: Optional[Callable] = None):
    """Autograd of the fused op ``fbnet_fast::<name>`` through ``fbnet_fast::<name>_backward``.

    The forward takes ``fused_op_args`` and maybe more plain values after them; the backward
    takes the output gradient, x, the mask, the twelve weights, the statistics the forward
    returned, and the same plain values. Only x, the mask, the statistics and the weights
    are saved: the backward recomputes the rest.

    Given the two ops' Python implementations, also returns an ``autograd.Function`` over
    them with the same saving and gradients: the eager path (``call_fused_op``), which skips
    the custom op's dispatch, argument checks and pytree handling (about 0.4 ms of a small
    layer's forward and backward, on each of the 22 layers of every step). Its backward
    passes ``weight_grads=False`` to the implementation when no weight needs a gradient (the
    θ steps of a search). ``call_fused_op`` runs the forward implementation itself where no
    graph is recorded. (The CPU backend's eager path is a C++ autograd node instead:
    fused_cpu.py.)"""
    backward_op = getattr(torch.ops.fbnet_fast, name + "_backward").default
    setup_context, backward = _fused_autograd(backward_op, op_inputs=True)
    torch.library.register_autograd(f"fbnet_fast::{name}", backward, setup_context=setup_context)
    if forward_impl is None:
        return None
    setup_context, backward = _fused_autograd(backward_impl, op_inputs=False)

    def forward(ctx, *inputs):  # ctx-style: a separate setup_context costs a signature bind
        output = forward_impl(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(f"{name}_eager", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward),
        "impl": staticmethod(forward_impl)})


def _fused_autograd(backward_fn: Callable, op_inputs: bool) -> tuple:
    """(setup_context, backward) calling ``backward_fn``; a custom op takes a list of Nones as
    the gradient of its list input (the running statistics), an autograd.Function one None."""

    def setup_context(ctx, inputs, output):
        x, mask, *params = inputs[:14]
        ctx.has_skip, ctx.n_running = params[-3] is not None, len(inputs[14])
        ctx.plain = inputs[15:]            # layout, training, and any extra value
        ctx.save_for_backward(x, mask, output[1], *params)
        if not op_inputs:
            ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad, _grad_stats):
        x, mask, stats, *params = ctx.saved_tensors
        if op_inputs:
            grads = backward_fn(grad, x, mask, *params, stats, *ctx.plain)
        else:  # the implementation skips the weights' gradients when none needs one
            need = ctx.needs_input_grad
            grads = backward_fn(grad, x, mask, *params, stats, *ctx.plain,
                                weight_grads=any(need[2:14]))
            grads = [g if n else None for g, n in zip(grads, need)]
        skip_grads = grads[11:] if ctx.has_skip else [None, None, None]
        running = [None] * ctx.n_running if op_inputs else None
        return (*grads[:11], *skip_grads, running, *[None] * len(ctx.plain))

    return setup_context, backward
