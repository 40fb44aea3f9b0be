"""The hand-written LayerNorm and attention against torch.nn, in first and second order."""

import torch
from torch import nn
from torch.nn import functional as F

from polca_study.snapshots.model import CausalSelfAttention, LayerNorm, ModelConfig, Transformer


def second_directional(f, x, v):
    """vᵀ∇²f(x)v of a scalar f by nested forward mode (what POLCA uses)."""
    inner = lambda t: torch.func.jvp(f, (t,), (v,))[1]  # noqa: E731
    return torch.func.jvp(inner, (x,), (v,))[1]


def double_backward(f, x, v):
    """vᵀ∇²f(x)v by reverse-over-reverse: an independent route."""
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x), x, create_graph=True)
    return v.flatten() @ torch.autograd.grad(g.flatten() @ v.flatten(), x)[0].flatten()


def test_layernorm_matches_torch_in_first_and_second_order():
    torch.manual_seed(0)
    ours, ref = LayerNorm(6).double(), nn.LayerNorm(6).double()
    with torch.no_grad():
        for p in (ours.weight, ref.weight, ours.bias, ref.bias):
            p.copy_(torch.randn(6))
        ref.weight.copy_(ours.weight), ref.bias.copy_(ours.bias)
    x, v, w = (torch.randn(3, 6, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(ours(x), ref(x))
    f_ours = lambda t: (ours(t) * w).sum().sin()  # noqa: E731
    f_ref = lambda t: (ref(t) * w).sum().sin()  # noqa: E731
    torch.testing.assert_close(
        torch.autograd.functional.jacobian(f_ours, x), torch.autograd.functional.jacobian(f_ref, x)
    )
    torch.testing.assert_close(second_directional(f_ours, x, v), double_backward(f_ref, x, v))


def test_attention_matches_scaled_dot_product_attention():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=8, n_heads=2, n_ctx=5)
    attn = CausalSelfAttention(cfg).double()

    def reference(x):
        B, T, C = x.shape
        q, k, v = attn.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, 2, 4).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return attn.proj(y.transpose(1, 2).reshape(B, T, C))

    x, v, w = (torch.randn(2, 5, 8, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(attn(x), reference(x))
    f_ours = lambda t: (attn(t) * w).sum().tanh()  # noqa: E731
    f_ref = lambda t: (reference(t) * w).sum().tanh()  # noqa: E731
    torch.testing.assert_close(
        torch.autograd.functional.jacobian(f_ours, x), torch.autograd.functional.jacobian(f_ref, x)
    )
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        want = double_backward(f_ref, x, v)
    torch.testing.assert_close(second_directional(f_ours, x, v), want)


def test_transformer_is_causal_and_shaped():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layers=2, d_model=16, n_heads=4, d_mlp=32, n_ctx=7, d_vocab=9))
    tokens = torch.randint(0, 9, (3, 7))
    logits = model(tokens)
    assert logits.shape == (3, 7, 9)
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 9
    torch.testing.assert_close(model(changed)[:, :-1], logits[:, :-1])
    assert not torch.allclose(model(changed)[:, -1], logits[:, -1])


def test_model_config_rejects_bad_heads():
    import pytest

    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(d_model=10, n_heads=4)
