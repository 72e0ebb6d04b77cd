"""The C++ depthwise conv (``fbnet_fast::dw_conv``) against ``F.conv2d`` in float64."""
import pytest
import torch
import torch.nn.functional as F

from fbnet_fast import MixedBlock
from fbnet_fast.backends import jit
from fbnet_fast.backends.plan import plan_for

pytestmark = pytest.mark.skipif(not jit.load(), reason=f"C++ kernels unavailable: {jit.why_unavailable()}")

if jit.load():
    from fbnet_fast.backends import ops

DT = torch.float64
# (N, C, H, W): odd and even sizes, 1x1 and 7x7 maps, channel counts on and off the
# 32-double register block; 9 columns: 7 interior 3x3 outputs at stride 1, 3 at stride 2 (the
# register kernels' 7- and 3-output blocks).
SIZES = [(2, 7, 9, 8), (3, 40, 7, 7), (2, 33, 1, 1), (1, 96, 6, 5), (2, 5, 2, 3), (1, 20, 5, 9)]


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
    wd = [w.detach() for w in ws]
    torch.library.opcheck(torch.ops.fbnet_fast.dw_conv_backward.default,
                          (g, x.detach(), wd, stride))
    out = torch.randn(g.shape, dtype=DT).contiguous(memory_format=torch.channels_last)
    xc = x.detach().contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.fbnet_fast.dw_conv_out.default, (xc, wd, stride, out))
    gx = torch.randn(x.shape, dtype=DT).contiguous(memory_format=torch.channels_last)
    # not test_aot_dispatch_dynamic: functionalization cannot take a mutating op that returns
    # a Tensor[] (as dw_conv_bn_backward_out below)
    torch.library.opcheck(torch.ops.fbnet_fast.dw_conv_backward_out.default,
                          (g, xc, wd, stride, gx),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


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
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("m, c", [(57, 70), (61, 8), (37, 24), (29, 5), (3, 17)])
def test_scale_shift(relu, m, c, dtype):
    """Wide rows one at a time; narrow contiguous ones (8-24 channels) folded several rows
    to one, with the rows left over (m not a multiple) done alone; also in place."""
    g = torch.Generator().manual_seed(m + c)
    x = torch.randn(m, c, dtype=dtype, generator=g)
    scale = torch.randn(c, dtype=dtype, generator=g)
    shift = torch.randn(c, dtype=dtype, generator=g) * 5
    y = x * scale + shift
    want = y.relu() if relu else y
    torch.testing.assert_close(ops.scale_shift(x, scale, shift, relu), want)
    torch.ops.fbnet_fast.scale_shift_out(x, scale, shift, relu, x)
    torch.testing.assert_close(x, want)


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
    torch.library.opcheck(torch.ops.fbnet_fast.scale_shift_out.default,
                          (z, scale, shift, relu, torch.empty_like(z)))
    torch.library.opcheck(torch.ops.fbnet_fast.bn_backward_out.default,
                          (grad, z, mean, rstd, scale, shift, relu, True, torch.empty_like(z)))


def test_bn_grad_apply_out_is_the_bn_backward_once_its_sums_are_known():
    """alpha g + beta z + delta per channel equals bn_backward given bn_grad_coef's three
    vectors from the same sums: in place over g (the fused block's use, dA over g) and into
    a strided column slice; a wrong coef shape is a clear error."""
    z = _matrix(seed=7)
    m, c = z.shape
    g = torch.Generator().manual_seed(8)
    gamma, beta = torch.randn(c, dtype=DT, generator=g), torch.randn(c, dtype=DT, generator=g)
    grad = torch.randn(z.shape, dtype=DT, generator=g)
    mean, var = ops.channel_stats(z)
    rstd = torch.rsqrt(var + 1e-5)
    want, dgamma, dbeta = ops.bn_backward(grad, z, mean, rstd, gamma, beta, False, True)
    sums = grad.sum(0), (grad * (z - mean)).sum(0)
    alpha, b, delta, dg, db = torch.ops.fbnet_fast.bn_grad_coef(*sums, mean, rstd, gamma, m,
                                                               True, True)
    torch.testing.assert_close((dg, db), (dgamma, dbeta))
    coef = torch.stack([alpha, b, delta])
    inplace = grad.clone()
    torch.ops.fbnet_fast.bn_grad_apply_out(inplace, z, coef, inplace)
    torch.testing.assert_close(inplace, want)
    wide = torch.zeros(m, c + 9, dtype=DT)
    torch.ops.fbnet_fast.bn_grad_apply_out(grad, z, coef, wide[:, 4:4 + c])
    torch.testing.assert_close(wide[:, 4:4 + c], want)
    assert wide[:, :4].abs().sum() == 0 and wide[:, 4 + c:].abs().sum() == 0
    with pytest.raises(RuntimeError, match=rf"coef must be Tensor\[3, {c}\]"):
        torch.ops.fbnet_fast.bn_grad_apply_out(grad, z, coef[:2], grad)
    torch.library.opcheck(torch.ops.fbnet_fast.bn_grad_apply_out.default,
                          (grad, z, coef, torch.empty_like(z)))


# --- the depthwise conv with BN1 + ReLU as its prologue, BN statistics as its epilogue ------

# (N, C, H, W): odd sizes, 1x1 and 4x4 maps, and rows wide enough for several tiles of
# output rows per image (the kernels' 1.5 MB tiles hold at least 8 output rows; partial last
# tiles); (1, 400, 30, 20): several tiles per image at both strides; 7- and 3-pixel output
# rows (FBNet's 7x7 and 3x3 maps, one register block each)
BN_SIZES = [(2, 7, 9, 8), (2, 33, 1, 1), (3, 17, 4, 4), (1, 400, 12, 40), (1, 700, 5, 50),
            (1, 400, 30, 20), (2, 20, 7, 7), (1, 24, 5, 3)]


def _bn_inputs(size, k, seed):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = size
    a = (torch.randn(n, c, h, w, dtype=DT, generator=g) * 2 + 1).contiguous(
        memory_format=torch.channels_last)
    scale = torch.randn(c, dtype=DT, generator=g)   # both signs: the ReLU cuts both ways
    shift = torch.randn(c, dtype=DT, generator=g)
    c1 = c // 3
    ws = [torch.randn(c1, k, k, dtype=DT, generator=g),
          torch.randn(c - c1, 8 - k, 8 - k, dtype=DT, generator=g)]   # a 3x3 and a 5x5 run
    return a, scale, shift, [w for w in ws if w.shape[0]], g


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("c_in, size", [(8, 32), (16, 14), (64, 7)],
                         ids=["tiled-8ch-32x32", "tiled-16ch-14x14", "whole-64ch-7x7"])
def test_dw_conv_bn_backward_makes_a_from_x(c_in, size, stride):
    """With a_weight the backward takes the first 1x1's input x and makes a = x a_weight^T
    itself (per tile; above 512 KB of weight, the 64-channel layer's 1408 x 64 float64, as
    one GEMM): every output equals the backward given a, at FBNet layers' channel counts
    (22 mid channels per input channel, runs of 3x3 and 5x5 candidates)."""
    g = torch.Generator().manual_seed(c_in + size + stride)
    n, t = 2, 22 * c_in
    x = torch.randn(n, c_in, size, size, dtype=DT, generator=g).contiguous(
        memory_format=torch.channels_last)
    w1 = torch.randn(t, c_in, dtype=DT, generator=g) / c_in ** 0.5
    a = torch.einsum("nchw,tc->nthw", x, w1).contiguous(memory_format=torch.channels_last)
    scale, shift = torch.randn(t, dtype=DT, generator=g), torch.randn(t, dtype=DT, generator=g)
    mean = a.mean((0, 2, 3))
    ws = [torch.randn(t // 2, 3, 3, dtype=DT, generator=g),
          torch.randn(t - t // 2, 5, 5, dtype=DT, generator=g)]
    so = (size - 1) // stride + 1
    dy = torch.randn(n, t, so, so, dtype=DT, generator=g).contiguous(
        memory_format=torch.channels_last)
    zo = torch.randn_like(dy)
    coef = torch.randn(3, t, dtype=DT, generator=g)
    rows = x.permute(0, 2, 3, 1).reshape(-1, c_in)
    xw = torch.randn(t, c_in, dtype=DT, generator=g)
    outs = []
    for a_in, a_weight in ((a, None), (x, w1)):
        ga = torch.full_like(a, float("nan"))
        gx = torch.full_like(rows, float("nan"))
        gws, sums, gtx = torch.ops.fbnet_fast.dw_conv_bn_backward_out(
            dy, a_in, ws, stride, scale, shift, mean, ga, rows, xw, gx, zo, coef, True,
            a_weight=a_weight)
        outs.append([*gws, sums, gtx, ga, gx])
    assert not any(o.isnan().any() for o in outs[1])
    for got, want in zip(outs[1], outs[0], strict=True):
        torch.testing.assert_close(got, want)
    with pytest.raises(RuntimeError, match=rf"a_weight must be Tensor\[C, C_in = {c_in - 1}\]"):
        torch.ops.fbnet_fast.dw_conv_bn_backward_out(
            dy, x[:, 1:], ws, stride, scale, shift, mean, ga, rows, xw, gx, a_weight=w1)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("size", BN_SIZES, ids=lambda s: "x".join(map(str, s)))
def test_dw_conv_bn(size, k, stride):
    """Forward (output and the statistics of its epilogue) and backward (g, the weights' grads and
    BN1's sums) against autograd through relu(a * scale + shift) and F.conv2d."""
    a, scale, shift, ws, g = _bn_inputs(size, k, sum(size) + k + stride)
    pre = (a * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).requires_grad_()
    wr = [w.clone().requires_grad_() for w in ws]
    y = reference(pre.relu(), wr, stride)
    out, stats = ops.dw_conv_bn(a, ws, stride, scale, shift)
    torch.testing.assert_close(out, y)
    var, mean = torch.var_mean(y, (0, 2, 3), correction=0)
    torch.testing.assert_close(stats, torch.stack([mean, var]))
    # without the statistics (the backward's recomputation): the same output, nothing else
    again = torch.full_like(out, float("nan"))
    none = torch.ops.fbnet_fast.dw_conv_bn_out(a, ws, stride, scale, shift, again, None, False)
    assert none.numel() == 0
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    dy = torch.randn(y.shape, dtype=DT, generator=g)
    y.backward(dy)
    mean = a.mean((0, 2, 3))
    gpre, gws, bsums = ops.dw_conv_bn_backward(dy, a, ws, stride, scale, shift, mean)
    torch.testing.assert_close(gpre, pre.grad)
    for got, w in zip(gws, wr):
        torch.testing.assert_close(got, w.grad)
    c = (a - mean.view(1, -1, 1, 1))
    torch.testing.assert_close(bsums, torch.stack([pre.grad.sum((0, 2, 3)),
                                                   (pre.grad * c).sum((0, 2, 3))]))
    # with the first 1x1's rows x: its two products of g, over chunks of rows (weights up to
    # 512 KB) or as whole GEMMs (the 700-channel case with 100 inputs: 560 KB)
    n, ch, h, w = a.shape
    ci = 100 if ch == 700 else 5
    x = torch.randn(n * h * w, ci, dtype=DT, generator=g)
    xw = torch.randn(ch, ci, dtype=DT, generator=g)
    gx = torch.empty_like(x)
    gmat = pre.grad.permute(0, 2, 3, 1).reshape(-1, ch)
    for grad_a in (torch.empty_like(gpre), None):   # None: g one row at a time, not kept
        _, sums_x, gtx = torch.ops.fbnet_fast.dw_conv_bn_backward_out(
            dy, a, ws, stride, scale, shift, mean, grad_a, x, xw, gx)
        torch.testing.assert_close(gx, gmat @ xw)
        torch.testing.assert_close(gtx, gmat.t() @ x)
        torch.testing.assert_close(sums_x, bsums)
        if grad_a is not None:
            torch.testing.assert_close(grad_a, gpre)
    # with out and out_coef the gradient at out is dy * alpha + out * beta + delta (the next
    # BN's backward, applied per tile as it is read), against autograd at that gradient
    zo = torch.randn(y.shape, dtype=DT, generator=g).contiguous(memory_format=torch.channels_last)
    coef = torch.randn(3, ch, dtype=DT, generator=g)
    dz = dy * coef[0].view(1, -1, 1, 1) + zo * coef[1].view(1, -1, 1, 1) + coef[2].view(1, -1, 1, 1)
    pre2 = pre.detach().requires_grad_()
    wr2 = [w.clone().requires_grad_() for w in ws]
    want = torch.autograd.grad(reference(pre2.relu(), wr2, stride), [pre2, *wr2], dz)
    wmat = want[0].permute(0, 2, 3, 1).reshape(-1, ch)
    for grad_a in (torch.empty_like(gpre), None):
        gws2, sums2, gtx = torch.ops.fbnet_fast.dw_conv_bn_backward_out(
            dy, a, ws, stride, scale, shift, mean, grad_a, x, xw, gx, zo, coef)
        for got, w in zip(gws2, want[1:]):
            torch.testing.assert_close(got, w)
        torch.testing.assert_close(gx, wmat @ xw)
        torch.testing.assert_close(gtx, wmat.t() @ x)
        torch.testing.assert_close(sums2, torch.stack([want[0].sum((0, 2, 3)),
                                                       (want[0] * c).sum((0, 2, 3))]))
        if grad_a is not None:
            torch.testing.assert_close(grad_a, want[0])
    # without weight_grads (a θ step): the same g, grad_x and sums, no weight grads, no g^T x
    for grad_a in (torch.empty_like(gpre), None):
        gx.fill_(float("nan"))
        gws3, sums3, gtx3 = torch.ops.fbnet_fast.dw_conv_bn_backward_out(
            dy, a, ws, stride, scale, shift, mean, grad_a, x, xw, gx, zo, coef, False)
        assert gws3 == [] and gtx3.numel() == 0
        torch.testing.assert_close(gx, wmat @ xw)
        torch.testing.assert_close(sums3, sums2)
        if grad_a is not None:
            torch.testing.assert_close(grad_a, want[0])


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("size", BN_SIZES, ids=lambda s: "x".join(map(str, s)))
def test_dw_conv_bn_makes_a_per_tile(size, k, stride):
    """With a_weight, a = x a_weight^T is made per tile from the first 1x1's input x: output
    and statistics against F.conv2d on the whole a (the 700-channel case's weight, 100 inputs,
    560 KB, takes the whole-GEMM path)."""
    a, scale, shift, ws, g = _bn_inputs(size, k, 7 * sum(size) + k + stride)
    n, c, h, w = a.shape
    ci = 100 if c == 700 else 5
    x = torch.randn(n, ci, h, w, dtype=DT, generator=g).contiguous(
        memory_format=torch.channels_last)
    aw = torch.randn(c, ci, dtype=DT, generator=g)
    a = F.conv2d(x, aw.view(c, ci, 1, 1))
    y = reference((a * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).relu(), ws, stride)
    out, stats = ops.dw_conv_bn(x, ws, stride, scale, shift, a_weight=aw)
    torch.testing.assert_close(out, y)
    var, mean = torch.var_mean(y, (0, 2, 3), correction=0)
    torch.testing.assert_close(stats, torch.stack([mean, var]))


def test_dw_conv_bn_a_weight_errors_and_opcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 4, dtype=DT).contiguous(memory_format=torch.channels_last)
    ws = [torch.randn(10, 3, 3, dtype=DT), torch.randn(6, 5, 5, dtype=DT)]
    sc, sh = torch.randn(16, dtype=DT), torch.randn(16, dtype=DT)
    with pytest.raises(RuntimeError, match=r"a_weight must be Tensor\[C, C_in = 6\]"):
        ops.dw_conv_bn(x, ws, 1, sc, sh, a_weight=torch.randn(16, 5, dtype=DT))
    with pytest.raises(RuntimeError, match=r"cover 16 channels but the conv's input \(x through "
                                           r"a_weight\) has 12"):
        ops.dw_conv_bn(x, ws, 1, sc, sh, a_weight=torch.randn(12, 6, dtype=DT))
    out = torch.empty(2, 16, 5, 4, dtype=DT).contiguous(memory_format=torch.channels_last)
    for stats in (True, False):
        torch.library.opcheck(torch.ops.fbnet_fast.dw_conv_bn_out.default,
                              (x, ws, 1, sc, sh, out, torch.randn(16, 6, dtype=DT), stats))


def test_dw_conv_bn_strided_input_and_opcheck():
    """A channel slice of a wider channels_last tensor is read in place; opcheck both ops."""
    torch.manual_seed(3)
    big = torch.randn(2, 40, 6, 7, dtype=DT).contiguous(memory_format=torch.channels_last)
    a = big[:, 5:29]
    scale, shift, mean = (torch.randn(24, dtype=DT) for _ in range(3))
    ws = [torch.randn(10, 3, 3, dtype=DT), torch.randn(14, 5, 5, dtype=DT)]
    out, _ = ops.dw_conv_bn(a, ws, 2, scale, shift)
    want = reference((a * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).relu(), ws, 2)
    torch.testing.assert_close(out, want)
    with pytest.raises(RuntimeError, match=r"shift must be Tensor\[24\]"):
        ops.dw_conv_bn(a, ws, 2, scale, shift[:5])
    torch.library.opcheck(torch.ops.fbnet_fast.dw_conv_bn_out.default,
                          (a, ws, 2, scale, shift, torch.empty_like(out)))
    dy = torch.randn_like(out)
    # not test_aot_dispatch_dynamic: functionalization cannot take a mutating op that returns
    # a Tensor[] (it only runs inside the opaque mixed_block_cpu_backward op)
    pw1 = (torch.randn(2 * 6 * 7, 3, dtype=DT), torch.randn(24, 3, dtype=DT),
           torch.empty(2 * 6 * 7, 3, dtype=DT))
    g_out = torch.empty_like(a, memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="without grad_a it needs x"):
        torch.ops.fbnet_fast.dw_conv_bn_backward_out(dy, a, ws, 2, scale, shift, mean, None)
    coef = (torch.randn_like(dy), torch.randn(3, 24, dtype=DT))
    with pytest.raises(RuntimeError, match=r"out_coef must be Tensor\[3, 24\]"):
        torch.ops.fbnet_fast.dw_conv_bn_backward_out(dy, a, ws, 2, scale, shift, mean, g_out,
                                                     None, None, None, coef[0], coef[1][:2])
    with pytest.raises(RuntimeError, match="out and out_coef go together"):
        torch.ops.fbnet_fast.dw_conv_bn_backward_out(dy, a, ws, 2, scale, shift, mean, g_out,
                                                     None, None, None, coef[0])
    for extra in ((g_out,), (g_out, *pw1), (None, *pw1), (None, *pw1, *coef),
                  (None, *pw1, *coef, False)):
        torch.library.opcheck(torch.ops.fbnet_fast.dw_conv_bn_backward_out.default,
                              (dy, a, ws, 2, scale, shift, mean, *extra),
                              test_utils=("test_schema", "test_autograd_registration",
                                          "test_faketensor"))


# --- every candidate's second 1x1 with BN2 + ReLU as prologue (pointwise_bn_out) ----------

def _pointwise_ref(d, scale, shift, w, segments, zc):
    """relu(d * scale + shift) W^T per segment (autograd's reference), with the BN output."""
    pre = (d * scale + shift).requires_grad_()
    h = pre.relu()
    z = d.new_zeros(d.shape[0], zc)
    for o0, ol, i0, il, w0 in segments:
        z[:, o0:o0 + ol] = h[:, i0:i0 + il] @ w[w0:w0 + ol * il].view(ol, il).t()
    return z, pre


def _pointwise_case(cin, cout, rows, dtype, seed):
    """A real layer's segments (grouped candidates included), fresh random inputs."""
    p = plan_for(MixedBlock(cin, cout, 1).layout)
    g = torch.Generator().manual_seed(seed)
    T, zc = p.layout.total_mid, p.n_conv * cout
    d = torch.randn(rows, T, dtype=dtype, generator=g) * 2 + 0.5
    scale, shift = torch.randn(T, dtype=dtype, generator=g), torch.randn(T, dtype=dtype, generator=g)
    w = torch.randn(p.layout.pw2_numel, dtype=dtype, generator=g)
    return d, scale, shift, w, p.pw2_groups, zc, g


# (C_in, C_out, rows): the tiled micro-kernels (weights up to 512 KB; odd row counts leave
# partial tiles and row blocks), the backward's g stored past the caches (float64 at 6001
# rows is above kStreamBytes) and the ATen GEMM path for the widest layers (300 rows: its
# sums over more than one block of rows)
POINTWISE_CASES = [(8, 8, 77), (16, 24, 300), (24, 24, 5), (8, 8, 6001), (112, 112, 9),
                   (184, 352, 3), (112, 112, 300)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", POINTWISE_CASES, ids=lambda c: "{}-{}x{}".format(*c))
def test_pointwise_bn(case, dtype):
    """Forward (z and BN3's statistics) and backward (g, the weight's grad, BN2's sums) against
    autograd, at real layers' segments."""
    d, scale, shift, w, segs, zc, g = _pointwise_case(*case, dtype, sum(case))
    flat = [v for s in segs for v in s]
    wr = w.clone().requires_grad_()
    z_ref, pre = _pointwise_ref(d, scale, shift, wr, segs, zc)
    z = torch.empty(d.shape[0], zc, dtype=dtype)
    stats = torch.ops.fbnet_fast.pointwise_bn_out(d, scale, shift, w, flat, z)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-3}
    torch.testing.assert_close(z, z_ref.detach(), **tol)
    var, mean = torch.var_mean(z_ref.detach(), 0, correction=0)
    torch.testing.assert_close(stats, torch.stack([mean, var]), **tol)
    z2 = torch.full_like(z, float("nan"))    # without the statistics: the same z, nothing else
    assert torch.ops.fbnet_fast.pointwise_bn_out(d, scale, shift, w, flat, z2, False).numel() == 0
    torch.testing.assert_close(z2, z, rtol=0, atol=0)
    dz = torch.randn(z.shape, dtype=dtype, generator=g)
    z_ref.backward(dz)
    mu = d.mean(0)
    gd = torch.empty_like(d)
    gw, sums = torch.ops.fbnet_fast.pointwise_bn_backward_out(dz, d, scale, shift, mu, w, flat, gd)
    assert pre.grad.abs().sum() > 0 and (pre.grad == 0).any()   # the ReLU cut some
    torch.testing.assert_close(gd, pre.grad, **tol)
    torch.testing.assert_close(gw, wr.grad, **tol)
    gref = pre.grad.double()
    torch.testing.assert_close(sums, torch.stack([gref.sum(0), (gref * (d - mu).double()).sum(0)]),
                               **tol)
    gd2 = torch.full_like(d, float("nan"))          # without the weight's gradient: the rest
    gw2, sums2 = torch.ops.fbnet_fast.pointwise_bn_backward_out(dz, d, scale, shift, mu, w, flat,
                                                                gd2, False)
    assert gw2.numel() == 0
    torch.testing.assert_close(gd2, gd, rtol=0, atol=0)
    torch.testing.assert_close(sums2, sums, rtol=0, atol=0)


def test_pointwise_bn_bad_input_and_opcheck():
    """Segments that miss columns, and wrong shapes, are named; opcheck the three ops."""
    d, scale, shift, w, segs, zc, g = _pointwise_case(8, 8, 21, DT, 5)
    flat = [v for s in segs for v in s]
    z = torch.empty(d.shape[0], zc, dtype=DT)
    with pytest.raises(RuntimeError, match="must cover z's"):
        torch.ops.fbnet_fast.pointwise_bn_out(d, scale, shift, w, flat[:-5], z)
    with pytest.raises(RuntimeError, match="flat list of"):
        torch.ops.fbnet_fast.pointwise_bn_out(d, scale, shift, w, flat[:-1], z)
    with pytest.raises(RuntimeError, match=r"shift must be Tensor\[176\]"):
        torch.ops.fbnet_fast.pointwise_bn_out(d, scale, shift[:3], w, flat, z)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.fbnet_fast.pointwise_bn_out(d, scale, shift, w[:50], flat, z)
    # the segments in any order: the same z and gradients
    z_ref = torch.empty_like(z)
    torch.ops.fbnet_fast.pointwise_bn_out(d, scale, shift, w, flat, z_ref)
    shuffled = [v for s in reversed(segs) for v in s]
    torch.ops.fbnet_fast.pointwise_bn_out(d, scale, shift, w, shuffled, z)
    torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-12)
    dz0 = torch.randn(z.shape, dtype=DT, generator=g)
    got = [torch.ops.fbnet_fast.pointwise_bn_backward_out(dz0, d, scale, shift, d.mean(0), w, f,
                                                          gd)[0] for f, gd in
           ((flat, torch.empty_like(d)), (shuffled, torch.empty_like(d)))]
    torch.testing.assert_close(got[1], got[0], rtol=0, atol=1e-12)
    for stats in (True, False):
        torch.library.opcheck(torch.ops.fbnet_fast.pointwise_bn_out.default,
                              (d, scale, shift, w, flat, z, stats))
    dz = torch.randn(z.shape, dtype=DT, generator=g)
    for weight_grad in (True, False):
        torch.library.opcheck(torch.ops.fbnet_fast.pointwise_bn_backward_out.default,
                              (dz, d, scale, shift, d.mean(0), w, flat, torch.empty_like(d),
                               weight_grad))


# --- BN3 and the mask-weighted combine over Z = [N, P, k, O], and their backward ---------

@pytest.mark.parametrize("o", [19, 16], ids=["odd-channels", "whole-vectors"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("per_example", [False, True], ids=["batch", "example"])
def test_combine_bn_ops(per_example, training, o):
    """combine_bn_out and its backward against autograd through F.batch_norm per candidate
    (batch statistics in training, running ones in eval) and the mask-weighted sum; O = 16
    takes the backward's vector path for z * dy (whole vectors per candidate), 19 the other."""
    from fbnet_fast.nn.layout import BN_EPS
    g = torch.Generator().manual_seed(7 + per_example + 2 * training + o)
    n, p, k = 3, 70, 5  # 70 pixels: blocks of 64 rows split inside an example
    z = torch.randn(n, p, k, o, dtype=DT, generator=g) * 2 + 0.5
    dy = torch.randn(n, p, o, dtype=DT, generator=g)
    mask = torch.rand(n if per_example else 1, k, dtype=DT, generator=g)
    gamma, beta = (torch.randn(k, o, dtype=DT, generator=g) for _ in range(2))
    rm, rv = torch.randn(k, o, dtype=DT, generator=g), torch.rand(k, o, dtype=DT, generator=g) + .5
    zr, mr, gr, br = (t.clone().requires_grad_() for t in (z, mask, gamma, beta))
    rows = zr.permute(2, 3, 0, 1).reshape(k * o, n * p).t()          # [N*P, k*O]
    bn = F.batch_norm(rows, rm.flatten().clone(), rv.flatten().clone(), gr.flatten(),
                      br.flatten(), training, 0.1, BN_EPS).t().reshape(k, o, n, p)
    ref = (bn.permute(2, 3, 0, 1) * mr[:, None, :, None]).sum(2)      # [N, P, O]
    ref.backward(dy)
    mean, var = ((z.mean((0, 1)), z.var((0, 1), unbiased=False)) if training else (rm, rv))
    out = torch.empty(n, p, o, dtype=DT)
    torch.ops.fbnet_fast.combine_bn_out(z, mask, mean, var, gamma, beta, BN_EPS, out)
    torch.testing.assert_close(out, ref.detach())
    dz = torch.empty_like(z)
    dm, dg, db = torch.ops.fbnet_fast.combine_bn_backward_out(z, dy, mask, mean, var, gamma,
                                                              beta, BN_EPS, training, dz)
    torch.testing.assert_close(dz, zr.grad)
    torch.testing.assert_close(dm if per_example else dm.sum(0, keepdim=True), mr.grad)
    torch.testing.assert_close(dg, gr.grad)
    torch.testing.assert_close(db, br.grad)
    with pytest.raises(RuntimeError, match="must have 1 or N = 3 rows"):
        torch.ops.fbnet_fast.combine_bn_out(z, torch.ones(2, k, dtype=DT), mean, var, gamma,
                                            beta, BN_EPS, out)
    with pytest.raises(RuntimeError, match=rf"gamma must have k \* O = {k * o} elements"):
        torch.ops.fbnet_fast.combine_bn_out(z, mask, mean, var, gamma[:, 1:], beta, BN_EPS, out)
    torch.library.opcheck(torch.ops.fbnet_fast.combine_bn_out.default,
                          (z, mask, mean, var, gamma, beta, BN_EPS, out))
    torch.library.opcheck(torch.ops.fbnet_fast.combine_bn_backward_out.default,
                          (z, dy, mask, mean, var, gamma, beta, BN_EPS, training, dz))


@pytest.mark.parametrize("stride", [1, 2])
def test_dw_conv_bn_float32_half_vector(stride):
    """float32 runs of 88 channels (the quick space's first layers: 5 vectors of 16 and one
    half-width vector of 8) against the float64 reference: forward, the weights' grads and
    the gradient at BN1's output."""
    g = torch.Generator().manual_seed(17 + stride)
    n, c, h, w = 2, 176, 9, 8
    a = (torch.randn(n, c, h, w, dtype=DT, generator=g) * 2 + 1).contiguous(
        memory_format=torch.channels_last)
    scale, shift = (torch.randn(c, dtype=DT, generator=g) for _ in range(2))
    ws = [torch.randn(88, k, k, dtype=DT, generator=g) for k in (3, 5)]
    pre = (a * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).requires_grad_()
    wr = [t.clone().requires_grad_() for t in ws]
    y = reference(pre.relu(), wr, stride)
    dy = torch.randn(y.shape, dtype=DT, generator=g)
    y.backward(dy)
    af, sf, hf = (t.float() for t in (a, scale, shift))
    wf = [t.float() for t in ws]
    out, _ = ops.dw_conv_bn(af, wf, stride, sf, hf)
    tol = {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(out.double(), y.detach(), **tol)
    gpre, gws, _ = ops.dw_conv_bn_backward(dy.float(), af, wf, stride, sf, hf,
                                           a.mean((0, 2, 3)).float())
    torch.testing.assert_close(gpre.double(), pre.grad, **tol)
    for got, t in zip(gws, wr):
        torch.testing.assert_close(got.double(), t.grad, rtol=1e-4, atol=1e-3)


def test_pooled_empty_reuses_freed_blocks():
    """pooled_empty gives contiguous tensors of the asked shape and like's dtype; a block
    comes back for the next request of its size only once its tensor is gone, and
    release_pool frees the idle blocks (returning their bytes)."""
    pooled = torch.ops.fbnet_fast.pooled_empty.default
    like = torch.empty(0, dtype=torch.float64)
    torch.ops.fbnet_fast.release_pool.default(like)
    a = pooled(like, [300, 7])
    assert a.shape == (300, 7) and a.dtype == torch.float64 and a.is_contiguous()
    a.copy_(torch.randn(300, 7, dtype=torch.float64))
    b = pooled(like, [300, 7])                      # a is alive: a block of its own
    assert b.data_ptr() != a.data_ptr()
    b.fill_(2.5)
    assert not torch.equal(a, b)
    ptr = a.data_ptr()
    del a
    c = pooled(like, [7, 300])                      # the same bytes: a's block again
    assert c.data_ptr() == ptr
    assert torch.equal(b, torch.full((300, 7), 2.5, dtype=torch.float64))
    del b, c
    assert torch.ops.fbnet_fast.release_pool.default(like) == 2 * 4096 * 5   # 16800 B -> 5 pages
    assert torch.ops.fbnet_fast.release_pool.default(like) == 0
    with pytest.raises(RuntimeError, match="pooled_empty: negative size"):
        pooled(like, [3, -1])


# --- the per-channel steps (csrc/cpu/per_channel.cpp) against plan.py's torch versions ---

@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [DT, torch.float32])
def test_bn_coef_ops_match_plan(training, dtype):
    from fbnet_fast.backends.plan import bn_coef, bn_grad
    from fbnet_fast.nn.layout import BN_EPS
    k, o = 3, 24                            # bn3's [candidates, C_out] shape
    mean, gamma, beta = (torch.randn(k, o, dtype=dtype) for _ in range(3))
    var = torch.rand(k, o, dtype=dtype) + 0.1
    sum_g, sum_gz = torch.randn(k, o, dtype=dtype), torch.randn(k, o, dtype=dtype)
    got = torch.ops.fbnet_fast.bn_coef.default(mean, var, gamma, beta, BN_EPS)
    ref = bn_coef(mean, var, gamma, beta)
    for a, b in zip(got, (ref.rstd, ref.scale, ref.shift)):
        assert a.shape == (k, o) and a.dtype == dtype
        torch.testing.assert_close(a, b)
    bn = ref
    want = bn_grad(bn, gamma, sum_g, sum_gz, 7, training)
    for centered in (False, True):
        gz = sum_gz - mean * sum_g if centered else sum_gz
        got = torch.ops.fbnet_fast.bn_grad_coef.default(sum_g, gz, mean, bn.rstd, gamma, 7,
                                                        training, centered)
        for a, b in zip(got, want):
            assert a.shape == (k, o) and a.dtype == dtype
            torch.testing.assert_close(a, b)
    # float64 sums (the kernels' output) with float32 statistics come back in gamma's dtype
    got = torch.ops.fbnet_fast.bn_grad_coef.default(sum_g.double(), sum_gz.double(), mean,
                                                    bn.rstd, gamma, 7, training, False)
    assert all(t.dtype == dtype for t in got)
    torch.library.opcheck(torch.ops.fbnet_fast.bn_coef.default, (mean, var, gamma, beta, BN_EPS))
    torch.library.opcheck(torch.ops.fbnet_fast.bn_grad_coef.default,
                          (sum_g, sum_gz, mean, bn.rstd, gamma, 7, training, False))
    with pytest.raises(RuntimeError, match="bn_coef: var has 5 elements"):
        torch.ops.fbnet_fast.bn_coef.default(mean, var[0, :5], gamma, beta, BN_EPS)


@pytest.mark.parametrize("c_in,c_out,stride", [(16, 24, 2), (184, 184, 1), (8, 8, 1)])
def test_pw1_dense_and_packed_match_plan(c_in, c_out, stride):
    """The first 1x1's dense matrix and its inverse at FBNet layer shapes (grouped candidates:
    the shuffle's row order, zeros off the block diagonal)."""
    from fbnet_fast.nn.layout import MixedLayout
    from fbnet_fast.nn.space import CANDIDATES
    L = MixedLayout.build(c_in, c_out, stride, CANDIDATES)
    p = plan_for(L)
    assert p.perm is not None
    T, C = L.total_mid, L.in_channels
    w = torch.randn(L.pw1_numel, dtype=DT)
    dense = torch.ops.fbnet_fast.pw1_dense.default(w, p.pw1_block_ints, T, C)
    torch.testing.assert_close(dense, p.dense_pw1(w).view(T, C), rtol=0, atol=0)
    g = torch.randn(T, C, dtype=DT)        # any gradient, zeros off the blocks ignored
    packed = torch.ops.fbnet_fast.pw1_packed.default(g, p.pw1_block_ints)
    torch.testing.assert_close(packed, p.packed_pw1(g.flatten()), rtol=0, atol=0)
    out = torch.randn(T, C, dtype=DT)      # a reused workspace: its old values overwritten
    torch.ops.fbnet_fast.pw1_dense_out.default(w, p.pw1_block_ints, out)
    torch.testing.assert_close(out, dense, rtol=0, atol=0)
    torch.library.opcheck(torch.ops.fbnet_fast.pw1_dense.default, (w, p.pw1_block_ints, T, C))
    torch.library.opcheck(torch.ops.fbnet_fast.pw1_dense_out.default,
                          (w, p.pw1_block_ints, torch.empty(T, C, dtype=DT)))
    torch.library.opcheck(torch.ops.fbnet_fast.pw1_packed.default, (g, p.pw1_block_ints))
    with pytest.raises(RuntimeError, match="pw1_dense: w must be a flat weight"):
        torch.ops.fbnet_fast.pw1_dense.default(w[:-1], p.pw1_block_ints, T, C)
    with pytest.raises(RuntimeError, match="pw1_packed: a block runs past"):
        torch.ops.fbnet_fast.pw1_packed.default(g[:-1], p.pw1_block_ints)
    # blocks that leave rows out (no plan does): those rows come out zero, whatever the
    # workspace held
    blocks = p.pw1_block_ints
    first = blocks[:4]                     # (row0, rows, offset, groups) of one block
    out = torch.randn(T, C, dtype=DT)
    torch.ops.fbnet_fast.pw1_dense_out.default(w, first, out)
    rows = slice(first[0], first[0] + first[1])
    torch.testing.assert_close(out[rows], dense[rows], rtol=0, atol=0)
    others = torch.ones(T, dtype=torch.bool)
    others[rows] = False
    assert others.any() and (out[others] == 0).all()
    with pytest.raises(RuntimeError, match="pw1_dense: a block runs past"):
        torch.ops.fbnet_fast.pw1_dense_out.default(w, [T - 1, 2, 0, 1], out)


@pytest.mark.parametrize("m,c", [(1, 5), (7, 3), (65, 8), (300, 33), (130, 184)])
def test_channel_cov(m, c):
    """Mean and centred cross products in one pass, against torch in float64, on a column
    slice of a wider matrix (strided rows) far from zero mean (the shift keeps it exact)."""
    g = torch.Generator().manual_seed(m + c)
    wide = torch.randn(m, c + 5, dtype=DT, generator=g) * 0.5 + 40
    x = wide[:, 2:2 + c]
    mean, cov = torch.ops.fbnet_fast.channel_cov(x)
    xc = x - x.mean(0)
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(cov, xc.t() @ xc)
    m32, c32 = torch.ops.fbnet_fast.channel_cov(x.float())
    assert m32.dtype == c32.dtype == torch.float32
    torch.testing.assert_close(c32.double(), xc.t() @ xc, rtol=1e-5, atol=1e-4)
    torch.library.opcheck(torch.ops.fbnet_fast.channel_cov.default, (x,))
    with pytest.raises(RuntimeError, match="channel_cov: x must be a \\[M, C\\] matrix"):
        torch.ops.fbnet_fast.channel_cov(x[0])


# (rows, C_in, T): the quick preset's 32x32 and 4x4 layers, a 224x224 7x7 one, odd sizes
PW1_COV_SHAPES = [(2048, 8, 192), (512, 22, 270), (392, 184, 1104), (37, 5, 9)]


@pytest.mark.parametrize("m,c,t", PW1_COV_SHAPES)
def test_pw1_bn_stats(m, c, t):
    """BN1's statistics from X's covariance against the mean and biased variance of A = X W1^T
    made whole, in float64."""
    g = torch.Generator().manual_seed(m + c + t)
    x = torch.randn(m, c, dtype=DT, generator=g) * 0.7 + 0.3
    w1 = torch.randn(t, c, dtype=DT, generator=g)
    a = x @ w1.t()
    mean, var = torch.ops.fbnet_fast.pw1_bn_stats(w1, *torch.ops.fbnet_fast.channel_cov(x), m)
    torch.testing.assert_close(mean, a.mean(0))
    torch.testing.assert_close(var, a.var(0, unbiased=False))
    args = (w1, *torch.ops.fbnet_fast.channel_cov(x), m)
    torch.library.opcheck(torch.ops.fbnet_fast.pw1_bn_stats.default, args)
    with pytest.raises(RuntimeError, match="pw1_bn_stats: x_mean and x_cov must be"):
        torch.ops.fbnet_fast.pw1_bn_stats(w1, args[1][:-1], args[2], m)


@pytest.mark.parametrize("m,c,t", PW1_COV_SHAPES)
@pytest.mark.parametrize("weight_grad", [True, False])
def test_pw1_cov_backward(m, c, t, weight_grad):
    """The (beta A + delta) terms of the first 1x1's backward through X's covariance against
    A made whole, in float64: grad_x += (beta A + delta) W1, grad_w1 += (beta A + delta)^T X,
    added to what the buffers held."""
    g = torch.Generator().manual_seed(3 * m + c + t)
    x = torch.randn(m, c, dtype=DT, generator=g) * 0.7 - 0.2
    w1 = torch.randn(t, c, dtype=DT, generator=g)
    beta, delta = (torch.randn(t, dtype=DT, generator=g) for _ in range(2))
    gx0, gw0 = torch.randn(m, c, dtype=DT, generator=g), torch.randn(t, c, dtype=DT, generator=g)
    term = beta * (x @ w1.t()) + delta
    gx, gw = gx0.clone(), gw0.clone() if weight_grad else None
    cov = torch.ops.fbnet_fast.channel_cov(x)
    torch.ops.fbnet_fast.pw1_cov_backward(gx, gw, x, w1, beta, delta, *cov)
    torch.testing.assert_close(gx, gx0 + term @ w1)
    if weight_grad:
        torch.testing.assert_close(gw, gw0 + term.t() @ x)
    torch.library.opcheck(torch.ops.fbnet_fast.pw1_cov_backward.default,
                          (gx0.clone(), gw0.clone() if weight_grad else None, x, w1, beta, delta,
                           *cov))
    with pytest.raises(RuntimeError, match="pw1_cov_backward: grad_x must be shaped like x"):
        torch.ops.fbnet_fast.pw1_cov_backward(gx[:-1], gw, x, w1, beta, delta, *cov)
