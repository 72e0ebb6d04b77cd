"""FBNetLoss: values and gradients against hand-computed formulas."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fbnet_fast.latency.loss import FBNetLoss
from test_latency import SMALL, random_table

L, K = SMALL.num_layers, SMALL.num_candidates


def inputs(seed=0, n=6, classes=10, per_example=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, classes, (n,), generator=g)
    shape = (L, n, K) if per_example else (L, K)
    theta = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    return logits, targets, theta


def test_mult_value_and_parts_by_hand():
    table = random_table(seed=1)
    logits, targets, theta = inputs()
    masks = torch.softmax(theta, -1)
    crit = FBNetLoss(table)                      # mult, alpha 0.2, beta 0.6, microseconds
    loss, ce, lat = crit.parts(logits, targets, masks)
    lat_ms = table.expected(masks).item()
    ce_hand = F.cross_entropy(logits, targets).item()
    assert lat.item() == pytest.approx(1000 * lat_ms, rel=1e-12)
    assert ce.item() == pytest.approx(ce_hand, rel=1e-12)
    assert loss.item() == pytest.approx(ce_hand * 0.2 * math.log(1000 * lat_ms) ** 0.6, rel=1e-12)
    assert crit(logits, targets, masks).item() == pytest.approx(loss.item(), rel=1e-12)
    assert crit.last.latency.item() == pytest.approx(lat.item())
    assert "us" in repr(crit) and "(log LAT[us]) ** 0.6" in repr(crit)


def test_mult_gradient_wrt_masks_by_hand():
    table = random_table(seed=2)
    logits, targets, theta = inputs(seed=1)
    masks = torch.softmax(theta, -1).detach().requires_grad_(True)
    crit = FBNetLoss(table, alpha=0.3, beta=0.7)
    crit(logits, targets, masks).backward()
    ce = F.cross_entropy(logits, targets).item()
    lat_us = 1000 * table.expected(masks.detach()).item()
    lut_us = 1000 * table.layer_matrix(dtype=torch.float64)
    # d/dm [CE a (log LAT)^b] = CE a b (log LAT)^(b-1) / LAT * dLAT/dm
    hand = ce * 0.3 * 0.7 * math.log(lat_us) ** (0.7 - 1) / lat_us * lut_us
    assert torch.allclose(masks.grad, hand, rtol=1e-10, atol=0)
    # d/dlogits = a (log LAT)^b * dCE/dlogits
    g_ce, = torch.autograd.grad(F.cross_entropy(logits, targets), logits)
    assert torch.allclose(logits.grad, 0.3 * math.log(lat_us) ** 0.7 * g_ce, rtol=1e-10)


@pytest.mark.parametrize("mode", ["mult", "add"])
@pytest.mark.parametrize("per_example", [False, True])
def test_gradcheck_theta_and_logits(mode, per_example):
    table = random_table(seed=3)
    logits, targets, theta = inputs(seed=2, n=3, per_example=per_example)
    crit = FBNetLoss(table, mode=mode, lam=0.05)
    # fast_mode (a random projection of the Jacobian) keeps the larger cases quick
    assert torch.autograd.gradcheck(
        lambda lg, t: crit(lg, targets, torch.softmax(t, -1)), (logits, theta),
        fast_mode=per_example or mode == "add")


def test_add_and_none_by_hand():
    table = random_table(seed=4)
    logits, targets, theta = inputs(seed=3)
    masks = torch.softmax(theta, -1).detach().requires_grad_(True)
    ce = F.cross_entropy(logits, targets).item()
    lat_ms = table.expected(masks.detach()).item()
    crit = FBNetLoss(table, mode="add", lam=0.05)
    loss = crit(logits, targets, masks)
    assert loss.item() == pytest.approx(ce + 0.05 * lat_ms, rel=1e-12)
    loss.backward()
    assert torch.allclose(masks.grad, 0.05 * table.layer_matrix(dtype=torch.float64))
    assert "CE + 0.05 * LAT[ms]" in repr(crit)
    plain = FBNetLoss(mode="none")
    assert plain(logits, targets).item() == pytest.approx(ce, rel=1e-12)
    with_table = FBNetLoss(table, mode="none", unit="ms")
    loss, _, lat = with_table.parts(logits, targets, masks)
    assert loss.item() == pytest.approx(ce) and lat.item() == pytest.approx(lat_ms)


def test_loss_grows_with_latency_and_alpha():
    logits, targets, theta = inputs(seed=5)
    masks = torch.softmax(theta, -1)
    fast, slow = random_table(seed=6), random_table(seed=6)
    for e in slow.entries.values():
        e.median *= 2
    base = FBNetLoss(fast)(logits, targets, masks).item()
    assert FBNetLoss(slow)(logits, targets, masks).item() > base
    assert FBNetLoss(fast, alpha=0.4)(logits, targets, masks).item() == pytest.approx(2 * base)
    assert FBNetLoss(fast, mode="add")(logits, targets, masks).item() < \
        FBNetLoss(slow, mode="add")(logits, targets, masks).item()
    # masks moved towards a slower candidate -> larger loss
    mat = fast.layer_matrix(dtype=torch.float64)
    slowest = torch.nn.functional.one_hot(mat.argmax(1), K).double()
    assert FBNetLoss(fast)(logits, targets, 0.5 * masks + 0.5 * slowest).item() > base


def test_guard_for_tiny_latency():
    table = random_table(seed=7)
    logits, targets, theta = inputs(seed=6)
    masks = torch.softmax(theta, -1).detach().requires_grad_(True)
    with pytest.warns(UserWarning, match="below e"):
        crit = FBNetLoss(table, unit="s")                  # a few ms = 0.00x s < e
    loss = crit(logits, targets, masks)
    ce = F.cross_entropy(logits, targets).item()
    assert loss.item() == pytest.approx(0.2 * ce, rel=1e-12)      # (log e)^0.6 = 1
    loss.backward()
    assert torch.count_nonzero(masks.grad) == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="needs a latency table"):
        FBNetLoss(mode="mult")
    with pytest.raises(ValueError, match="mode must be one of"):
        FBNetLoss(random_table(), mode="log")
    with pytest.raises(ValueError, match="unit must be one of"):
        FBNetLoss(random_table(), unit="minutes")
    logits, targets, _ = inputs()
    with pytest.raises(ValueError, match="needs the masks"):
        FBNetLoss(random_table())(logits, targets)
