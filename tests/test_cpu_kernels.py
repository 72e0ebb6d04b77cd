"""The C++ depthwise conv (``fbnet_fast::dw_conv``) against ``F.conv2d`` in float64."""
import pytest
import torch
import torch.nn.functional as F

from fbnet_fast.backends import jit

pytestmark = pytest.mark.skipif(not jit.load(), reason=f"C++ kernels unavailable: {jit.why_unavailable()}")

if jit.load():
    from fbnet_fast.backends import ops

DT = torch.float64
# (N, C, H, W): odd and even sizes, 1x1 and 7x7 maps, channel counts on and off the
# 32-double register block.
SIZES = [(2, 7, 9, 8), (3, 40, 7, 7), (2, 33, 1, 1), (1, 96, 6, 5), (2, 5, 2, 3)]


def reference(x, ws, stride):
    """F.conv2d per channel group, concatenated."""
    outs, c0 = [], 0
    for w in ws:
        c, k = w.shape[0], w.shape[-1]
        outs.append(F.conv2d(x[:, c0:c0 + c], w.view(c, 1, k, k), stride=stride,
                             padding=k // 2, groups=c))
        c0 += c
    return torch.cat(outs, 1)


def _check(x, ws, stride, dtype=DT):
    x1 = x.clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    w1 = [w.clone().requires_grad_() for w in ws]
    w2 = [w.clone().requires_grad_() for w in ws]
    y1 = ops.dw_conv(x1, w1, stride)
    y2 = reference(x2, w2, stride)
    assert y1.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y1, y2)
    dy = torch.randn_like(y2)
    y1.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(x1.grad, x2.grad)
    for a, b in zip(w1, w2):
        assert a.grad.shape == a.shape
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_matches_conv2d(size, k, stride, channels_last):
    torch.manual_seed(sum(size) + 10 * k + stride)
    n, c, h, w = size
    x = torch.randn(n, c, h, w, dtype=DT)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    _check(x, [torch.randn(c, 1, k, k, dtype=DT)], stride)


@pytest.mark.parametrize("stride", [1, 2])
def test_mixed_kernel_groups(stride):
    """One pass over 3x3, 5x5, 3x3 channel groups (3-d weights) equals three convs."""
    torch.manual_seed(stride)
    x = torch.randn(2, 70, 9, 10, dtype=DT)
    ws = [torch.randn(20, 3, 3, dtype=DT), torch.randn(45, 5, 5, dtype=DT),
          torch.randn(5, 3, 3, dtype=DT)]
    _check(x, ws, stride)


def test_channel_slice_input():
    """A channel slice of a channels_last tensor is read in place (strided pixels)."""
    torch.manual_seed(0)
    big = torch.randn(2, 50, 8, 8, dtype=DT).contiguous(memory_format=torch.channels_last)
    _check(big[:, 10:40], [torch.randn(30, 1, 5, 5, dtype=DT)], 2)


def test_float32():
    torch.manual_seed(1)
    x = torch.randn(2, 80, 11, 11).contiguous(memory_format=torch.channels_last)
    w = torch.randn(80, 1, 5, 5)
    torch.testing.assert_close(ops.depthwise_conv2d(x, w, 2),
                               F.conv2d(x, w, stride=2, padding=2, groups=80))


@pytest.mark.parametrize("dtype", [torch.float32, DT], ids=["f32", "f64"])
@pytest.mark.parametrize("size", [(2, 40, 7, 7), (3, 37, 8, 9), (1, 50, 1, 2)],
                         ids=lambda s: "x".join(map(str, s)))
def test_stride2_grad_input(size, dtype):
    """The stride-2 grad-input row kernel (odd and even maps, full vectors and a channel tail)
    against autograd of F.conv2d, in both layouts and with mixed kernel sizes."""
    torch.manual_seed(sum(size))
    n, c, h, w = size
    ws = [torch.randn(c - 13, 3, 3, dtype=dtype), torch.randn(13, 5, 5, dtype=dtype)]
    for channels_last in (False, True):
        x = torch.randn(n, c, h, w, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        xr = x.clone().requires_grad_()
        y = reference(xr, ws, 2)
        dy = torch.randn_like(y)
        y.backward(dy)
        gx, _ = ops.dw_conv_backward(dy, x, ws, 2)
        tol = {} if dtype == DT else {"rtol": 1e-4, "atol": 1e-4}
        torch.testing.assert_close(gx, xr.grad, **tol)


@pytest.mark.parametrize("stride", [1, 2])
def test_out_variants(stride):
    """dw_conv_out / dw_conv_backward_out write what the functional ops return, into
    channels_last views of a reused [N*H*W, C] buffer."""
    torch.manual_seed(10 + stride)
    n, c, h, w = 2, 21, 7, 8
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    ws = [torch.randn(9, 3, 3, dtype=DT), torch.randn(12, 5, 5, dtype=DT)]
    x = torch.randn(n, c, h, w, dtype=DT)
    dy = torch.randn(n, c, ho, wo, dtype=DT)
    buf = torch.full((n * h * w, c), float("nan"), dtype=DT)
    out = buf[:n * ho * wo].view(n, ho, wo, c).permute(0, 3, 1, 2)
    torch.ops.fbnet_fast.dw_conv_out(x, ws, stride, out)
    torch.testing.assert_close(out, ops.dw_conv(x, ws, stride))
    gx = torch.full((n * h * w, c), float("nan"), dtype=DT).view(n, h, w, c).permute(0, 3, 1, 2)
    gws = torch.ops.fbnet_fast.dw_conv_backward_out(dy, x, ws, stride, gx)
    gx_ref, gws_ref = ops.dw_conv_backward(dy, x, ws, stride)
    torch.testing.assert_close(gx, gx_ref)
    for a, b in zip(gws, gws_ref):
        torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match="channels_last-contiguous"):
        torch.ops.fbnet_fast.dw_conv_out(x, ws, stride, torch.empty(n, c, ho, wo, dtype=DT))


def test_bad_input_messages():
    x = torch.randn(2, 8, 5, 5, dtype=DT)
    with pytest.raises(RuntimeError, match="cover 6 channels but x has 8"):
        ops.dw_conv(x, [torch.randn(6, 1, 3, 3, dtype=DT)], 1)
    with pytest.raises(RuntimeError, match="odd"):
        ops.dw_conv(x, [torch.randn(8, 1, 4, 4, dtype=DT)], 1)
    with pytest.raises(RuntimeError, match="stride must be 1 or 2"):
        ops.dw_conv(x, [torch.randn(8, 1, 3, 3, dtype=DT)], 3)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.dw_conv(x, [torch.randn(8, 1, 3, 3)], 1)
    with pytest.raises(RuntimeError, match="grad must have shape"):
        ops.dw_conv_backward(torch.randn(2, 8, 5, 4, dtype=DT), x,
                             [torch.randn(8, 1, 3, 3, dtype=DT)], 1)


@pytest.mark.parametrize("stride", [1, 2])
def test_opcheck(stride):
    torch.manual_seed(2)
    x = torch.randn(2, 12, 7, 6, dtype=DT, requires_grad=True)
    ws = [torch.randn(4, 1, 3, 3, dtype=DT, requires_grad=True),
          torch.randn(8, 1, 5, 5, dtype=DT, requires_grad=True)]
    torch.library.opcheck(torch.ops.fbnet_fast.dw_conv.default, (x, ws, stride))
    g = torch.randn(2, 12, (7 - 1) // stride + 1, (6 - 1) // stride + 1, dtype=DT)
    torch.library.opcheck(torch.ops.fbnet_fast.dw_conv_backward.default,
                          (g, x.detach(), [w.detach() for w in ws], stride))


# --- batch-norm passes over [M, C] matrices ---------------------------------------------

def _matrix(m=37, c=70, wide=100, seed=0):
    """A column slice of a wider matrix (strided rows), far from zero mean."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, wide, dtype=DT, generator=g) * 3 + 5)[:, 10:10 + c]


def test_channel_stats():
    x = _matrix()
    mean, var = ops.channel_stats(x)
    v, m = torch.var_mean(x, 0, correction=0)
    torch.testing.assert_close(mean, m)
    torch.testing.assert_close(var, v)


@pytest.mark.parametrize("relu", [False, True])
def test_scale_shift(relu):
    x = _matrix(seed=1)
    scale, shift = torch.randn(70, dtype=DT), torch.randn(70, dtype=DT) * 5
    y = x * scale + shift
    torch.testing.assert_close(ops.scale_shift(x, scale, shift, relu), y.relu() if relu else y)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu", [False, True])
def test_bn_backward(relu, training):
    """Against autograd through F.batch_norm (+ ReLU), with batch or fixed statistics."""
    z = _matrix(m=300, seed=2)   # more rows than one accumulation block
    c = z.shape[1]
    weight = (torch.rand(c, dtype=DT) + 0.5).requires_grad_()
    bias = torch.randn(c, dtype=DT).requires_grad_()
    rm, rv = torch.randn(c, dtype=DT) + 5, torch.rand(c, dtype=DT) * 9 + 1
    zr = z.clone().requires_grad_()
    y = F.batch_norm(zr, rm.clone(), rv.clone(), weight, bias, training, 0.1, 1e-5)
    y = y.relu() if relu else y
    dy = torch.randn_like(y)
    y.backward(dy)
    mean, var = ops.channel_stats(z) if training else (rm, rv)
    dz, dw, db = ops.bn_backward(dy, z, mean, torch.rsqrt(var + 1e-5), weight.detach(),
                                 bias.detach(), relu, training)
    torch.testing.assert_close(dz, zr.grad)
    torch.testing.assert_close(dw, weight.grad)
    torch.testing.assert_close(db, bias.grad)


def test_bn_ops_bad_input_and_opcheck():
    x = _matrix(seed=3)
    v = torch.rand(70, dtype=DT)
    with pytest.raises(RuntimeError, match=r"scale must be Tensor\[70\]"):
        ops.scale_shift(x, torch.rand(69, dtype=DT), v, True)
    with pytest.raises(RuntimeError, match=r"must be a \[M, C\] matrix"):
        ops.channel_stats(x[0])
    with pytest.raises(RuntimeError, match="grad shape"):
        ops.bn_backward(x[1:], x, v, v, v, v, True, True)
    torch.library.opcheck(torch.ops.fbnet_fast.channel_stats.default, (x,))
    torch.library.opcheck(torch.ops.fbnet_fast.scale_shift.default, (x, v, v + 1, True))
    torch.library.opcheck(torch.ops.fbnet_fast.bn_backward.default,
                          (torch.randn_like(x), x, v, v + 1, v, v, True, True))


@pytest.mark.parametrize("relu", [False, True])
def test_bn_out_variants_in_place(relu):
    """scale_shift_out and bn_backward_out equal the functional ops, written in place over
    their input (the fused block's use) and into a strided column slice."""
    z = _matrix(seed=5)
    c = z.shape[1]
    g = torch.Generator().manual_seed(6)
    scale, shift = torch.randn(c, dtype=DT, generator=g), torch.randn(c, dtype=DT, generator=g)
    want = ops.scale_shift(z, scale, shift, relu)
    inplace = z.clone()
    torch.ops.fbnet_fast.scale_shift_out(inplace, scale, shift, relu, inplace)
    torch.testing.assert_close(inplace, want)
    wide = torch.zeros(z.shape[0], c + 9, dtype=DT)
    torch.ops.fbnet_fast.scale_shift_out(z, scale, shift, relu, wide[:, 4:4 + c])
    torch.testing.assert_close(wide[:, 4:4 + c], want)
    mean, var = ops.channel_stats(z)
    rstd = torch.rsqrt(var + 1e-5)
    grad = torch.randn(z.shape, dtype=DT, generator=g)
    dz, dw, db = ops.bn_backward(grad, z, mean, rstd, scale, shift, relu, True)
    g2 = grad.clone()
    dw2, db2 = torch.ops.fbnet_fast.bn_backward_out(g2, z, mean, rstd, scale, shift, relu, True, g2)
    for a, b in ((g2, dz), (dw2, dw), (db2, db)):
        torch.testing.assert_close(a, b)
