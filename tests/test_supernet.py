"""SuperNet: masks, sampled architectures, extraction."""
import pytest
import torch

from fbnet_fast import SearchSpace, SuperNet

SPACE = SearchSpace.small(width=0.25, resolution=16)


def make_net(**kw):
    torch.manual_seed(0)
    return SuperNet(SPACE, num_classes=5, backend="reference", **kw)


@pytest.mark.parametrize("gumbel, shape", [("per-batch", (22, 9)), ("per-example", (22, 3, 9))])
def test_masks_are_distributions(gumbel, shape):
    net = make_net(gumbel=gumbel)
    net(torch.randn(3, 3, 16, 16)).sum().backward()
    m = net.last_masks
    assert m.shape == shape
    torch.testing.assert_close(m.sum(-1), torch.ones(shape[:-1]))
    assert net.theta.grad is not None and net.theta.grad.abs().sum() > 0


def test_temperature_sharpens_masks():
    net = make_net()
    with torch.no_grad():
        net.theta.copy_(torch.randn_like(net.theta))
    g = torch.Generator().manual_seed(0)
    net.temperature = 100.0
    soft = net.sample_masks(1, generator=g).max(-1).values.mean()
    net.temperature = 0.05
    hard = net.sample_masks(1, generator=g).max(-1).values.mean()
    assert hard > 0.9 > 0.2 > soft


def test_argmax_run_equals_extracted_model():
    net = make_net()
    x = torch.randn(4, 3, 16, 16)
    net(x)  # one training step so BN running stats are not the defaults
    with torch.no_grad():
        net.theta.copy_(torch.randn_like(net.theta))
    net.eval()
    model = net.extract().eval()
    assert list(model.arch.blocks) == [SPACE.candidates[i] for i in net.argmax_indices()]
    torch.testing.assert_close(net(x), model(x))
    # Explicit architecture: only the chosen blocks run.
    arch = net.sample_architecture(torch.Generator().manual_seed(1))
    torch.testing.assert_close(net(x, arch=arch), net.extract(arch).eval()(x))


def test_bad_inputs():
    net = make_net()
    with pytest.raises(ValueError, match="gumbel must be"):
        SuperNet(SPACE, gumbel="sometimes")
    with pytest.raises(ValueError, match="layer 3: 'k9_e9' is not a candidate"):
        net(torch.randn(1, 3, 16, 16), arch=["skip"] * 2 + ["k9_e9"] + ["skip"] * 19)
    with pytest.raises(ValueError, match=r"Tensor\[N, 3, H, W\]"):
        net(torch.randn(1, 1, 16, 16))


def test_hard_masks_are_one_hot_with_the_soft_gradient():
    net = make_net(mask="hard")
    with torch.no_grad():
        net.theta.copy_(torch.randn_like(net.theta))
    c = torch.randn(22, 9)
    hard = net.sample_masks(1, generator=torch.Generator().manual_seed(3))
    assert set(hard.detach().unique().tolist()) == {0.0, 1.0}
    assert (hard.detach().sum(-1) == 1).all()
    (g_hard,) = torch.autograd.grad((c * hard).sum(), net.theta)
    net.mask = "soft"
    soft = net.sample_masks(1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(hard.detach().argmax(-1), soft.detach().argmax(-1))
    (g_soft,) = torch.autograd.grad((c * soft).sum(), net.theta)
    torch.testing.assert_close(g_hard, g_soft)


def test_hard_per_batch_runs_only_the_sampled_blocks():
    """Same output and weight gradients as the mixture under the one-hot mask; θ's gradient
    comes through the sampled entries only (GDAS's estimator)."""
    torch.manual_seed(0)
    net = SuperNet(SPACE, num_classes=5, backend="reference", mask="hard").double()
    with torch.no_grad():
        net.theta.copy_(torch.randn_like(net.theta))
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    masks = net.sample_masks(4, generator=torch.Generator().manual_seed(5))
    y = net(x, masks=masks)
    y.square().sum().backward()
    # blocks that did not run have no gradient: the mixture gives them zeros
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
             for n, p in net.named_parameters()}
    assert any(p.grad is None for p in net.parameters())
    net.zero_grad(set_to_none=False)
    # The mixture over every candidate, with θ's gradient kept for the sampled entries only.
    masks = net.sample_masks(4, generator=torch.Generator().manual_seed(5))
    onehot = masks.detach()
    partial = onehot + (masks - masks.detach()) * onehot
    net.mask = "soft"
    net(x, masks=partial).square().sum().backward()
    torch.testing.assert_close(y, net(x, masks=onehot))
    for n, p in net.named_parameters():
        got = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got, grads[n], msg=n)
    assert grads["theta"].abs().sum() > 0


def test_two_path_masks_mix_two_candidates_by_their_renormalised_probabilities():
    net = make_net(mask="two-path")
    with torch.no_grad():
        net.theta.copy_(torch.randn_like(net.theta))
    masks = net.sample_masks(8, generator=torch.Generator().manual_seed(1))
    nonzero = masks.detach() != 0
    assert (nonzero.sum(-1) == 2).all()
    p = net.probabilities().detach()
    expect = torch.where(nonzero, p, torch.zeros_like(p))
    torch.testing.assert_close(masks.detach(), expect / expect.sum(-1, keepdim=True))
    # θ's gradient comes through the two drawn entries of each layer only
    c = torch.randn(22, 9)
    (g,) = torch.autograd.grad((c * masks).sum(), net.theta)
    w = masks.detach()
    expect_g = torch.where(nonzero, w * (c - (c * w).sum(-1, keepdim=True)), torch.zeros_like(w))
    torch.testing.assert_close(g, expect_g)
    # pairs follow softmax(θ): a dominant candidate is nearly always drawn
    with torch.no_grad():
        net.theta.zero_()
        net.theta[:, 4] = 6.0
    drawn = torch.stack([net.sample_masks(1)[:, 4] != 0 for _ in range(50)])
    assert drawn.float().mean() > 0.95
    with pytest.raises(ValueError, match="two-path.*per-batch"):
        SuperNet(SPACE, gumbel="per-example", mask="two-path")


def test_two_path_runs_only_the_two_blocks_and_matches_the_mixture():
    """Output, weight and θ gradients equal the full mixture's under the same masks (whose
    other entries are zero), while only the two drawn candidates of each layer run."""
    torch.manual_seed(0)
    net = SuperNet(SPACE, num_classes=5, backend="reference", mask="two-path").double()
    with torch.no_grad():
        net.theta.copy_(torch.randn_like(net.theta))
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    y = net(x, masks=_two_path_masks(net, 2))
    y.square().sum().backward()
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
             for n, p in net.named_parameters()}
    assert any(p.grad is None for p in net.parameters())   # unsampled blocks never ran
    net.zero_grad(set_to_none=False)
    net.mask = "soft"
    y_mix = net(x, masks=_two_path_masks(net, 2))
    y_mix.square().sum().backward()
    torch.testing.assert_close(y, y_mix)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)
    assert grads["theta"].abs().sum() > 0


def _two_path_masks(net, seed):
    mode, net.mask = net.mask, "two-path"
    try:
        return net.sample_masks(4, generator=torch.Generator().manual_seed(seed))
    finally:
        net.mask = mode


@pytest.mark.parametrize("mask", ["hard", "two-path"])
def test_sparse_mask_supernet_fits_a_small_batch(mask):
    """The sparse modes train the weights: once θ prefers one candidate per layer (as it
    does late in a search), paths drawn afresh every step fit 8 images on the preferred
    architecture. (With uniform θ they do not in 60 steps: every step is another network,
    docs/search.md.)"""
    torch.manual_seed(0)
    net = SuperNet(SPACE, num_classes=4, backend="reference", mask=mask)
    with torch.no_grad():
        net.theta[torch.arange(22), torch.randint(0, 9, (22,))] = 6.0   # p ~ 0.98 each
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 4
    opt = torch.optim.Adam(net.weight_parameters(), lr=3e-3)

    def preferred_loss():
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(net(x, arch=net.argmax_indices()), y)

    start = preferred_loss()
    for _ in range(60):
        masks = net.sample_masks(8)
        assert ((masks.detach() != 0).sum(-1) == (1 if mask == "hard" else 2)).all()
        loss = torch.nn.functional.cross_entropy(net(x, masks=masks), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert preferred_loss() < 0.5 * start
