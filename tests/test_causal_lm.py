"""POLCA on a Hugging Face causal language model (a tiny GPT-NeoX built from a config,
no download), in float64, against per-token brute-force autograd."""

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
from tests.test_polca import MODES, brute_force

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


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_on_a_layernorm_model_matches_per_token_brute_force(mode):
    model = tiny_neox(seed=2)
    ids = torch.randint(0, 23, (2, 4), generator=torch.Generator().manual_seed(3))
    loss_fn = causal_lm_loss(model, ids)
    theta = flatten_parameters(model)
    g = torch.Generator().manual_seed(4)
    theta_next = theta + 0.02 * torch.randn(theta.shape, generator=g)
    vectors, _ = torch.linalg.qr(torch.randn(theta.numel(), 2, generator=g))
    got = decompose(loss_fn, theta, theta_next, vectors, mode)
    want = brute_force(loss_fn, theta, theta_next, vectors, mode)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
    assert loss_fn.choose_route(2) == "forward"  # LayerNorm has no per-sample rule: auto avoids reverse


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
