"""ldm_engine.ops dispatch: which backend runs, decided on every call.

The backend choice is cached per (device, LDM_ENGINE_BACKEND value, backend=) (``ops._PLANS``); these
tests pin down that the cache changes nothing observable: LDM_ENGINE_BACKEND changed between calls is
honoured, unknown names raise on every call, an explicit backend that cannot take the input raises, a
preference that cannot falls back to torch with the reason logged, the default order is followed, and
the input checks keep their messages. Which backend ran is observed through the Triton kernels' entry
points (counted) and the attention output's layout (triton / cuda: a (B, H, Lq, D) view of
(B, Lq, H, D) storage; torch: contiguous). On CPU the Triton kernels run in Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py).
"""

import importlib.util
import logging
import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first import of triton's kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ldm_engine.ops as ops  # noqa: E402
from ldm_engine.errors import BackendUnavailableError, InvalidInputError  # noqa: E402
from model_utils import count_calls  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ENV = "LDM_ENGINE_BACKEND"


@pytest.fixture(autouse=True)
def no_env_backend(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts calls of the Triton kernels' entry points (the custom ops import them at call time)."""
    import ldm_engine.kernels.attention as attn_kernels
    import ldm_engine.kernels.group_norm_silu as gn_kernels

    return count_calls(monkeypatch, (attn_kernels, "attention"), (gn_kernels, "group_norm_silu"))


def qkv(device=TRITON_DEVICE, dtype=torch.float32, h=2, lq=7, lk=5, d=40):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, h, n, d, generator=g).to(device=device, dtype=dtype) for n in (lq, lk, lk))


def gn_input(device=TRITON_DEVICE, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 3, 5, generator=g).to(device=device, dtype=dtype)
    return x, torch.rand(16, generator=g).add(0.5).to(device), torch.randn(16, generator=g).to(device)


def kernel_layout(out: torch.Tensor) -> bool:
    """True for the GPU backends' output: a (B, H, Lq, D) view of (B, Lq, H, D) storage."""
    return out.transpose(1, 2).is_contiguous() and not out.is_contiguous()


# ------------------------------------------------------------------------------------------------
# LDM_ENGINE_BACKEND is read on every call
# ------------------------------------------------------------------------------------------------

@needs_triton
def test_env_backend_change_between_calls_is_honoured(monkeypatch, triton_calls):
    q, k, v = qkv()
    x, w, b = gn_input()
    expected = []
    for env in (None, "triton", "torch", "triton", None, "triton", "reference"):
        if env is None:
            monkeypatch.delenv(ENV, raising=False)
        else:
            monkeypatch.setenv(ENV, env)
        before = dict(triton_calls)
        out = ops.attention(q, k, v)
        ops.group_norm_silu(x, w, b, 4)
        ran_triton = env == "triton"
        assert kernel_layout(out) == ran_triton, f"LDM_ENGINE_BACKEND={env}"
        assert triton_calls["attention"] - before["attention"] == int(ran_triton), f"LDM_ENGINE_BACKEND={env}"
        assert triton_calls["group_norm_silu"] - before["group_norm_silu"] == int(ran_triton)
        expected.append(ran_triton)
    assert triton_calls["attention"] == sum(expected) == 3


@needs_triton
def test_explicit_backend_wins_over_env(monkeypatch, triton_calls):
    q, k, v = qkv()
    monkeypatch.setenv(ENV, "triton")
    assert not kernel_layout(ops.attention(q, k, v, backend="torch"))
    monkeypatch.setenv(ENV, "torch")
    assert kernel_layout(ops.attention(q, k, v, backend="triton"))
    assert triton_calls["attention"] == 1
    # an explicit backend= never looks at LDM_ENGINE_BACKEND, not even to validate it (as before)
    monkeypatch.setenv(ENV, "nonsense")
    assert not kernel_layout(ops.attention(q, k, v, backend="torch"))


def test_empty_env_value_means_unset(monkeypatch):
    x, w, b = gn_input("cpu")
    monkeypatch.setenv(ENV, "")
    assert torch.equal(ops.group_norm_silu(x, w, b, 4), ops.group_norm_silu(x, w, b, 4, backend="torch"))


def test_invalid_env_value_raises_on_every_call(monkeypatch):
    x, w, b = gn_input("cpu")
    q, k, v = qkv("cpu")
    ops.group_norm_silu(x, w, b, 4)  # a valid plan is cached first
    monkeypatch.setenv(ENV, "nonsense")
    for _ in range(2):  # an invalid value is never cached as valid
        with pytest.raises(InvalidInputError, match="LDM_ENGINE_BACKEND='nonsense' is not one of"):
            ops.group_norm_silu(x, w, b, 4)
        with pytest.raises(InvalidInputError, match="LDM_ENGINE_BACKEND='nonsense'"):
            ops.attention(q, k, v)
    monkeypatch.setenv(ENV, "TORCH")  # names are case-sensitive
    with pytest.raises(InvalidInputError, match="LDM_ENGINE_BACKEND='TORCH'"):
        ops.attention(q, k, v)
    monkeypatch.setenv(ENV, "torch")
    assert torch.equal(ops.attention(q, k, v), ops.attention(q, k, v, backend="torch"))


def test_env_read_through_a_replaced_os_environ(monkeypatch):
    """Where os.environ is not the stock mapping, the value is still read on every call."""
    x, w, b = gn_input("cpu")
    fake = {ENV: "nonsense"}
    monkeypatch.setattr(os, "environ", fake)
    with pytest.raises(InvalidInputError, match="LDM_ENGINE_BACKEND='nonsense'"):
        ops.group_norm_silu(x, w, b, 4)
    fake[ENV] = "reference"
    assert torch.allclose(ops.group_norm_silu(x, w, b, 4), ops.group_norm_silu(x, w, b, 4, backend="torch"),
                          atol=1e-5)


# ------------------------------------------------------------------------------------------------
# backend= and fallbacks
# ------------------------------------------------------------------------------------------------

def test_unknown_backend_argument_raises_every_time():
    x, w, b = gn_input("cpu")
    q, k, v = qkv("cpu")
    for _ in range(2):
        with pytest.raises(InvalidInputError, match="unknown backend 'tpu'"):
            ops.group_norm_silu(x, w, b, 4, backend="tpu")
        with pytest.raises(InvalidInputError, match="unknown backend 'tpu'"):
            ops.attention(q, k, v, backend="tpu")
    with pytest.raises(InvalidInputError, match="unknown backend"):  # unhashable: still the same error
        ops.attention(q, k, v, backend=["torch"])
    with pytest.raises(InvalidInputError, match="unknown backend"):
        ops.group_norm_silu(x, w, b, 4, backend={"torch": 1})


def test_explicit_unsupported_backend_raises_every_time():
    x, w, b = gn_input("cpu")
    q, k, v = qkv("cpu", dtype=torch.float16)
    for _ in range(2):  # the cached plan still asks about each input
        with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run this input"):
            ops.group_norm_silu(x, w, b, 4, backend="cuda")
        with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run this input"):
            ops.attention(q, k, v, backend="cuda")
    # the same call with an input the backend can take works; one it cannot take raises again
    xi = torch.ones(1, 16, 2, 2, dtype=torch.int32)
    if HAS_TRITON:
        ops.group_norm_silu(*gn_input(), 4, backend="triton")
    with pytest.raises(BackendUnavailableError, match="dtype torch.int32"):
        ops.group_norm_silu(xi, None, None, 4, backend="triton")


@needs_triton
def test_env_preference_falls_back_per_input(monkeypatch, triton_calls):
    """LDM_ENGINE_BACKEND=triton: an input triton cannot take runs through torch, the next one on triton."""
    monkeypatch.setenv(ENV, "triton")
    xi = torch.arange(16 * 4, dtype=torch.float64).reshape(1, 16, 2, 2)  # float64: not a triton dtype
    out = ops.group_norm_silu(xi, None, None, 4)
    assert torch.allclose(out, ops.group_norm_silu(xi, None, None, 4, backend="torch"))
    assert triton_calls["group_norm_silu"] == 0
    ops.group_norm_silu(*gn_input(), 4)
    assert triton_calls["group_norm_silu"] == 1
    q, k, v = qkv(d=520)  # head dim > 512: torch
    assert not kernel_layout(ops.attention(q, k, v)) and triton_calls["attention"] == 0
    assert kernel_layout(ops.attention(*qkv())) and triton_calls["attention"] == 1


def test_env_fallback_logs_the_reason_on_each_call(monkeypatch, caplog):
    x, w, b = gn_input("cpu")
    q, k, v = qkv("cpu")
    monkeypatch.setenv(ENV, "cuda")  # the cuda backend never takes CPU tensors
    with caplog.at_level(logging.DEBUG, logger="ldm_engine.ops"):
        for _ in range(2):
            assert torch.equal(ops.group_norm_silu(x, w, b, 4), ops.group_norm_silu(x, w, b, 4, backend="torch"))
            assert torch.equal(ops.attention(q, k, v), ops.attention(q, k, v, backend="torch"))
    msgs = [r.getMessage() for r in caplog.records if "LDM_ENGINE_BACKEND=cuda cannot run this input" in r.getMessage()]
    assert len(msgs) == 4, msgs
    assert all("using torch" in m for m in msgs)


# ------------------------------------------------------------------------------------------------
# The default order
# ------------------------------------------------------------------------------------------------

@needs_triton
def test_default_order_is_followed(monkeypatch, triton_calls):
    """A default order that puts other backends first runs the first that can take each input."""
    monkeypatch.setitem(ops._DEFAULT_ORDER, TRITON_DEVICE, ("triton", "torch"))
    monkeypatch.setattr(ops, "_PLANS", {})  # plans are made from the default order (see ops._PLANS)
    ops.group_norm_silu(*gn_input(), 4)
    assert triton_calls["group_norm_silu"] == 1
    xi = torch.randn(1, 16, 2, 2, dtype=torch.float64, device=TRITON_DEVICE)  # not a triton dtype: torch
    ops.group_norm_silu(xi, None, None, 4)
    assert triton_calls["group_norm_silu"] == 1

    # the cuda backend declines float32 attention everywhere, triton takes it, neither takes head dim 520
    monkeypatch.setitem(ops._DEFAULT_ORDER, TRITON_DEVICE, ("cuda", "triton", "torch"))
    monkeypatch.setattr(ops, "_PLANS", {})
    assert kernel_layout(ops.attention(*qkv())) and triton_calls["attention"] == 1
    assert not kernel_layout(ops.attention(*qkv(d=520))) and triton_calls["attention"] == 1


def test_shipped_default_order_runs_torch():
    x, w, b = gn_input("cpu")
    q, k, v = qkv("cpu")
    assert ops.default_backend_order("cpu") == ("torch",)
    assert torch.equal(ops.group_norm_silu(x, w, b, 4), ops.group_norm_silu(x, w, b, 4, backend="torch"))
    out = ops.attention(q, k, v)
    assert out.is_contiguous() and torch.equal(out, ops.attention(q, k, v, backend="torch"))


# ------------------------------------------------------------------------------------------------
# Input checks (the fast path keeps every check and message)
# ------------------------------------------------------------------------------------------------

def test_group_norm_input_checks():
    x = torch.randn(1, 32, 4, 4)
    with pytest.raises(InvalidInputError, match=r"x must be a tensor of shape \(N, C, \*spatial\)"):
        ops.group_norm_silu(torch.randn(32), None, None, 4)
    with pytest.raises(InvalidInputError, match="x must be a tensor"):
        ops.group_norm_silu(x.numpy(), None, None, 4)
    with pytest.raises(InvalidInputError, match="num_groups must be a positive int, got 4.0"):
        ops.group_norm_silu(x, None, None, 4.0)
    with pytest.raises(InvalidInputError, match="32 channels are not divisible by num_groups=5"):
        ops.group_norm_silu(x, None, None, 5)
    with pytest.raises(InvalidInputError, match=r"weight must have shape \(32,\), got \(32, 1\)"):
        ops.group_norm_silu(x, torch.ones(32, 1), None, 4)
    with pytest.raises(InvalidInputError, match=r"weight must have shape \(32,\), got \(\)"):
        ops.group_norm_silu(x, torch.tensor(1.0), None, 4)
    with pytest.raises(InvalidInputError, match=r"bias must have shape \(32,\), got \(16,\)"):
        ops.group_norm_silu(x, torch.ones(32), torch.ones(16), 4)
    with pytest.raises(InvalidInputError, match="weight must have shape"):  # weight checked before bias
        ops.group_norm_silu(x, torch.ones(16), torch.ones(16), 4)
    # (N, L, C): recognised from the weight; the checks then apply to C
    nlc = torch.randn(2, 6, 32)
    assert ops.group_norm_silu(nlc, torch.ones(32), torch.zeros(32), 8).shape == nlc.shape
    with pytest.raises(InvalidInputError, match=r"bias must have shape \(32,\), got \(6,\)"):
        ops.group_norm_silu(nlc, torch.ones(32), torch.zeros(6), 8)


def test_group_norm_layouts_kept_by_the_torch_path():
    x = torch.randn(2, 32, 5, 3).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(32) + 0.5, torch.randn(32)
    out = ops.group_norm_silu(x, w, b, 8)
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref = torch.nn.functional.silu(torch.nn.functional.group_norm(x.contiguous(), 8, w, b))
    assert torch.allclose(out, ref, atol=1e-5)
    y = ops.group_norm_silu(x.contiguous(), w, b, 8, silu=False)
    assert y.is_contiguous() and torch.allclose(y, torch.nn.functional.group_norm(x.contiguous(), 8, w, b), atol=1e-6)
    nlc = torch.randn(2, 7, 32)
    out = ops.group_norm_silu(nlc, w, b, 8)
    ref = torch.nn.functional.silu(torch.nn.functional.group_norm(nlc.transpose(1, 2), 8, w, b)).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-5)


def test_attention_input_checks():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(InvalidInputError, match=r"attention: q must be a 4-D tensor"):
        ops.attention(q[0], q, q)
    with pytest.raises(InvalidInputError, match=r"attention: k must be a 4-D tensor"):
        ops.attention(q, q.numpy(), q)
    with pytest.raises(InvalidInputError, match=r"attention: v must be a 4-D tensor"):
        ops.attention(q, q, q[..., None])
    k = torch.randn(1, 2, 5, 16)
    for bad_k, bad_v in [(torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)),   # batch
                         (torch.randn(1, 3, 5, 16), torch.randn(1, 3, 5, 16)),   # heads
                         (torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)),     # head dim of k
                         (k, torch.randn(1, 2, 6, 16)),                           # Lk of v
                         (k, torch.randn(2, 2, 5, 16)),                           # batch of v
                         (k, torch.randn(1, 1, 5, 16))]:                          # heads of v
        with pytest.raises(InvalidInputError, match=r"shapes q \(1, 2, 8, 16\), k .* do not match"):
            ops.attention(q, bad_k, bad_v)
    out = ops.attention(q, k, torch.randn(1, 2, 5, 24))  # v may have its own head dim
    assert out.shape == (1, 2, 8, 24)
    for scale in (-1.0, 0.0, float("inf"), float("nan"), "0.1"):
        with pytest.raises(InvalidInputError, match="scale must be a positive finite number"):
            ops.attention(q, q, q, scale=scale)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, k, scale=0.3)
    assert torch.equal(ops.attention(q, k, k, scale=0.3), ref)
    assert torch.equal(ops.attention(q, k, k, scale=2), torch.nn.functional.scaled_dot_product_attention(q, k, k, scale=2))


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------

def test_eager_calls_do_not_recompile_a_compiled_graph():
    """Tracing resolves without the plan cache, so plans added later by eager calls guard nothing."""
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    torch._dynamo.reset()
    ops._PLANS.clear()  # so that the eager calls below surely add plans
    x, w, b = gn_input("cpu")
    f = torch.compile(lambda t: ops.group_norm_silu(t, w, b, 4) * 2, backend=counting_backend, fullgraph=True)
    assert torch.allclose(f(x), ops.group_norm_silu(x, w, b, 4) * 2)
    ops.group_norm_silu(x, w, b, 4, backend="reference")  # new plans, made eagerly
    ops.attention(*qkv("cpu"), backend="reference")
    f(x)
    assert len(compiles) == 1
    torch._dynamo.reset()
