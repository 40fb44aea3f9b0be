"""POLCA on a Hugging Face causal language model (a tiny GPT-NeoX built from a config,
no download), in float64, against per-token brute-force autograd."""

import types

import pytest
import torch

from polca_study import polca
from polca_study.polca import (
    SecondOrderError,
    causal_lm_loss,
    check_second_order,
    decompose,
    flatten_parameters,
)
from tests._toy import MODES, brute_force

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def tiny_neox(seed=0):
    config = transformers.GPTNeoXConfig(
        vocab_size=23,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        rotary_pct=0.5,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return transformers.GPTNeoXForCausalLM(config).double().eval()


def tiny_gpt2(seed=0, dropout=0.0):
    """GPT-2: Conv1D layers (transposed Linear), tied input/output embeddings, learned
    positions, LayerNorm."""
    config = transformers.GPT2Config(
        vocab_size=23,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=16,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).double().eval()


def tiny_llama(seed=0, kv_heads=2):
    """Llama: RMSNorm, SwiGLU, rotary; kv_heads < 2 heads is grouped-query attention."""
    config = transformers.LlamaConfig(
        vocab_size=23,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=kv_heads,
        max_position_embeddings=16,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).double().eval()
    for module in model.modules():  # RMSNorm computes in float32 even in a float64 model,
        if type(module).__name__ == "LlamaRMSNorm":  # which would bound these checks at 1e-5
            module.forward = types.MethodType(_rms_norm_in_input_dtype, module)
    return model


def _rms_norm_in_input_dtype(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


MODELS = {
    "gpt_neox": tiny_neox,
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
    "llama_gqa": lambda seed=0: tiny_llama(seed, kv_heads=1),
}


def test_causal_lm_loss_is_the_next_token_loss_in_flatten_order():
    model = tiny_neox()
    ids = torch.randint(0, 23, (3, 6), generator=torch.Generator().manual_seed(1))
    loss_fn = causal_lm_loss(model, ids)
    theta = flatten_parameters(model)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    want = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 23), ids[:, 1:].reshape(-1), reduction="none"
    )
    torch.testing.assert_close(loss_fn(theta), want)  # positions 1..T-1, row-major
    moved = theta.clone()
    moved[0] += 1.0  # the first parameter of flatten order is the embedding's first entry
    with torch.no_grad():
        model.get_input_embeddings().weight[0, 0] += 1.0
        again = model(input_ids=ids).logits
    want = torch.nn.functional.cross_entropy(
        again[:, :-1].reshape(-1, 23), ids[:, 1:].reshape(-1), reduction="none"
    )
    torch.testing.assert_close(loss_fn(moved), want)


# GPT-2 in the fast tier; the others (about 40 s together) with the slow tests
ARCHS = [pytest.param(a, marks=() if a == "gpt2" else pytest.mark.slow) for a in MODELS]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_and_route_matches_per_token_brute_force(arch, mode):
    model = MODELS[arch](seed=2)
    ids = torch.randint(0, 23, (2, 4), generator=torch.Generator().manual_seed(3))
    loss_fn = causal_lm_loss(model, ids)
    theta = flatten_parameters(model)
    g = torch.Generator().manual_seed(4)
    theta_next = theta + 0.02 * torch.randn(theta.shape, generator=g)
    vectors, _ = torch.linalg.qr(torch.randn(theta.numel(), 2, generator=g))
    want = brute_force(loss_fn, theta, theta_next, vectors, mode)
    assert loss_fn.unsupported_parameters() == []  # the reverse route covers every parameter
    # GPT-NeoX's and Llama's eager attention take the softmax in float32 even in a float64
    # model, and forward and reverse mode round it differently: agreement to about 1e-10
    # of the largest value, which `paper` (a difference of gradients) loosens to 3e-7
    rtol = 1e-7 if arch == "gpt2" else 1e-6
    for route in ("forward", "reverse"):
        got = decompose(loss_fn, theta, theta_next, vectors, mode, route=route)
        torch.testing.assert_close(got, want, rtol=rtol, atol=1e-10, msg=f"{arch} {mode} {route}")


def test_tied_embeddings_are_one_parameter_in_store_order():
    from polca_study.snapshots.store import parameters_of

    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [p.name for p in parameters_of(model)]
    assert "lm_head.weight" not in names and names[0] == "transformer.wte.weight"
    assert flatten_parameters(model).numel() == sum(p.numel() for p in model.parameters())
    # moving the shared matrix moves both uses: the loss sees the output layer change too
    ids = torch.randint(0, 23, (2, 5), generator=torch.Generator().manual_seed(1))
    loss_fn = causal_lm_loss(model, ids)
    theta = flatten_parameters(model)
    moved = theta.clone()
    moved[: 23 * 16] += 0.1
    with torch.no_grad():
        model.transformer.wte.weight += 0.1
        logits = model(input_ids=ids).logits
    want = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 23), ids[:, 1:].reshape(-1), reduction="none"
    )
    torch.testing.assert_close(loss_fn(moved), want)


def test_self_check_catches_layernorm_without_the_composite_and_passes_with_it(monkeypatch):
    model = tiny_neox(seed=5)
    ids = torch.randint(0, 23, (2, 5), generator=torch.Generator().manual_seed(6))
    loss_fn = causal_lm_loss(model, ids)
    theta = flatten_parameters(model)
    assert check_second_order(loss_fn, theta) < 1e-8
    # the fused kernel left in place: the check stops the run and says what to use
    monkeypatch.setattr(
        polca.CompositeNorms, "__torch_function__", lambda self, f, t, a=(), k=None: f(*a, **(k or {}))
    )
    with pytest.raises(SecondOrderError, match="normalisation modules: GPTNeoXLayerNorm|LayerNorm") as err:
        check_second_order(loss_fn, theta)
    assert "polca.second_order=path" in str(err.value)
