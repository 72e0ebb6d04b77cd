"""Every fused MixedBlock op is a registered ``torch.library`` op: ``opcheck`` passes on
the forward and the backward op of each family, and ``torch.compile(fullgraph=True)``
traces a training step through a ``MixedBlock`` and through a small ``SuperNet`` without a
graph break and matches eager: output, every gradient, the BN running statistics.

Families: ``cpu`` (C++ kernels), ``triton`` (Triton's CPU interpreter without a GPU) and
``cuda`` (its depthwise glue on CPU tensors through the same-schema C++ ops, since the op
is registered for both devices). Shapes are tiny: the interpreter runs one Python call
per program instance.
"""
from __future__ import annotations

import pytest
import torch

from fbnet_fast import SuperNet
from fbnet_fast.backends import jit, plan, registry, selfcheck
from fbnet_fast.backends.plan import fused_op_args
from fbnet_fast.nn.space import SearchSpace
from fbnet_fast.testing import make_pair, randomize, single_thread

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DT = torch.float32 if CUDA else torch.float64


def _require(name: str) -> None:
    why = registry.BACKENDS[name].why_unavailable(torch.device(DEVICE))
    if name == "cuda" and not CUDA:   # the glue on CPU tensors: the C++ ops and Triton
        why = jit.why_unavailable() or registry.BACKENDS["triton"].why_unavailable(
            torch.device("cpu"))
    if why is not None:
        pytest.skip(why)


def _op(name: str):
    _require(name)
    registry.BACKENDS[name].load()   # its module defines the op on import
    return getattr(torch.ops.fbnet_fast, f"mixed_block_{name}").default


def _extra(name: str) -> tuple:
    """The arguments after the shared ones (``plan.fused_op_args``): the compute dtype."""
    return () if name == "cpu" else (DT,)


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


# test_aot_dispatch_dynamic retraces with dynamic shapes; the op takes the layout as a
# string and its plan is per shape, so the static checks are the ones that apply.
CHECKS = ("test_schema", "test_faketensor", "test_autograd_registration")


@pytest.mark.parametrize("name", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_opcheck_forward_and_backward(name, train):
    """Both ops of each family, with a grouped candidate and a skip conv (stride 2, channel
    change) and per-example masks; channels_last input."""
    op = _op(name)
    block, _ = make_pair(name, 8, 16, 2, ("k3_e1_g2", "k5_e3", "skip"), dtype=DT,
                         device=DEVICE, seed=1)
    block.train(train)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 5, 5, generator=g, dtype=DT).to(DEVICE)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    mask = torch.rand(2, 3, generator=g, dtype=DT).to(DEVICE).requires_grad_()
    args = fused_op_args(block, x, mask) + _extra(name)
    torch.library.opcheck(op, args, test_utils=CHECKS)
    y, stats = op(*args)
    backward = getattr(torch.ops.fbnet_fast, f"mixed_block_{name}_backward").default
    dy = torch.randn(y.shape, generator=g, dtype=DT).to(DEVICE)
    bargs = (dy.contiguous(memory_format=torch.channels_last), *args[:14], stats.detach(),
             *args[15:])
    torch.library.opcheck(backward, bargs, test_utils=CHECKS)


def _step(fn, model, inputs: tuple):
    """One training step (forward, a loss, backward) of ``fn`` (the model, or it compiled)
    on copies of ``inputs``; returns the output, the inputs' and the parameters' gradients and
    the buffers after the step."""
    model.zero_grad(set_to_none=True)
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*xs)
    y.square().sum().backward()
    return ([y.detach()] + [t.grad for t in xs] + [p.grad for p in model.parameters()]
            + [b.detach().clone() for b in model.buffers()])


def _compiled_matches_eager(model, inputs: tuple, compiler: str = "aot_eager") -> None:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch._dynamo.reset()
    eager = _step(model, model, inputs)
    model.load_state_dict(state)
    compiled = _step(torch.compile(model, fullgraph=True, backend=compiler), model, inputs)
    assert len(eager) == len(compiled)
    for i, (a, b) in enumerate(zip(eager, compiled)):
        torch.testing.assert_close(b, a, msg=lambda m, i=i: f"result {i} of the step: {m}")


@pytest.mark.parametrize("name,compiler", [("cpu", "aot_eager"), ("triton", "aot_eager"),
                                           ("cpu", "inductor")])
def test_compiled_mixed_block_step_matches_eager(name, compiler):
    """Inductor too on the CPU, where it compiles the code around the op."""
    _require(name)
    block, _ = make_pair(name, 16, 24, 2, dtype=DT, device=DEVICE, seed=2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 4, 4, generator=g, dtype=DT).to(DEVICE)
    mask = torch.softmax(torch.randn(2, 9, generator=g, dtype=DT), -1).to(DEVICE)
    _compiled_matches_eager(block, (x, mask), compiler)


@pytest.mark.parametrize("name", ["cpu", "triton"])
def test_layout_first_seen_inside_torch_compile(name):
    """A layout whose plan is first built while torch.compile traces (by its fake kernel)
    keeps no fake tensors that its real kernels would meet when the compiled code runs."""
    _require(name)
    plan._plan_of_key.cache_clear()
    block, _ = make_pair(name, 8, 16, 2, ("k3_e1", "k5_e1_g2", "skip"), dtype=DT,
                         device=DEVICE, seed=4)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 5, 5, generator=g, dtype=DT).to(DEVICE)
    mask = torch.softmax(torch.randn(3, generator=g, dtype=DT), -1).to(DEVICE)
    torch._dynamo.reset()
    y = torch.compile(block, fullgraph=True, backend="aot_eager")(x, mask)
    torch.testing.assert_close(y, block(x, mask))


@pytest.mark.parametrize("name", ["cpu", "triton"])
def test_compiled_supernet_step_matches_eager(name):
    """Stem, two searchable layers (an identity skip, then a skip conv), head, θ's masks."""
    _require(name)
    space = SearchSpace(resolution=4, stem_channels=8, head_channels=16, stem_stride=1,
                        stages=((8, 1, 1), (16, 1, 2)), candidates=("k3_e1", "k5_e1_g2", "skip"))
    torch.manual_seed(0)
    net = SuperNet(space, num_classes=5, backend=name).to(DEVICE, DT)
    randomize(net, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=DT).to(DEVICE)
    masks = torch.softmax(torch.randn(2, 3, generator=g, dtype=DT), -1).to(DEVICE)
    _compiled_matches_eager(net, (x, masks))


def test_first_auto_pick_inside_torch_compile(tmp_path, monkeypatch):
    """The registry's first pick for ``auto`` (imports, build, self-check) may happen while
    torch.compile traces: it runs eagerly there, and the trace holds no break."""
    _require("cpu")
    monkeypatch.setenv(selfcheck.ENV_DIR, str(tmp_path))
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    registry.reset()
    try:
        block, _ = make_pair("auto", 8, 16, 2, ("k3_e1", "k5_e1_g2", "skip"), dtype=DT,
                             device=DEVICE, seed=3)
        g = torch.Generator().manual_seed(2)
        x = torch.randn(2, 8, 5, 5, generator=g, dtype=DT).to(DEVICE)
        mask = torch.rand(3, generator=g, dtype=DT).to(DEVICE)
        torch._dynamo.reset()
        y = torch.compile(block, fullgraph=True, backend="aot_eager")(x, mask)
        assert registry.pick_name("auto", torch.device(DEVICE)) != "reference"
        assert len(list(tmp_path.iterdir())) == 1   # the verdict
    finally:
        registry.reset()
    torch.testing.assert_close(y, block(x, mask))
