"""The architecture a store's parameters belong to, and rebuilding it.

A model is rebuilt only from what the user's config or a known library names: our
`Transformer` from its config, a `transformers` model from its config (with eager
attention, which forward-mode AD can differentiate), anything else through
`snapshots.factory`, an import path the user gives. A store's manifest never chooses
code to import.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from polca_study.errors import ConfigError

# How a manifest names our Transformer. The name is data, written into every store (and
# so into its fingerprint): it stays as the first stores wrote it.
OURS = "polca_study.model.Transformer"


class ModelOf(nn.Module):
    """A `transformers` causal LM as `inputs (S, T) -> logits (S, T, V)`, the way the
    stages and `evaluate` call our own model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs):
        return self.model(input_ids=inputs, use_cache=False).logits


def model_info(module: nn.Module) -> dict | None:
    """What a reader needs to rebuild `module` without trusting the store: our
    Transformer's config, or a `transformers` model's config; None for anything else
    (give such a store's reader `snapshots.factory`)."""
    from polca_study.snapshots.model import Transformer

    if isinstance(module, ModelOf):
        module = module.model
    if isinstance(module, Transformer):
        return {"class": OURS, "config": module.config_dict()}
    config = getattr(module, "config", None)
    if (
        config is not None
        and hasattr(config, "to_dict")
        and type(module).__module__.startswith("transformers.")
    ):
        return {"transformers": type(module).__name__, "config": config.to_dict()}
    return None


def build_model(info: dict | None, factory: str | None = None) -> nn.Module:
    """A module of the architecture `info` describes, its parameters in store order."""
    if factory:
        module_name, _, function = factory.partition(":")
        if not function:
            raise ConfigError(f"snapshots.factory must be 'package.module:function', got {factory!r}")
        return getattr(importlib.import_module(module_name), function)(**((info or {}).get("config") or {}))
    if info and info.get("class") == OURS:
        from polca_study.snapshots.model import ModelConfig, Transformer

        return Transformer(ModelConfig(**info["config"]))
    if info and ("transformers" in info or str(info.get("class", "")).startswith("transformers.")):
        from transformers import AutoConfig, AutoModelForCausalLM

        config = dict(info["config"])
        config = AutoConfig.for_model(config.pop("model_type"), **config)
        hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
        return ModelOf(hf)
    raise ValueError(
        f"the snapshots' model ({info!r}) is neither polca-study's Transformer nor a "
        "`transformers` model: set snapshots.factory=package.module:function (returning the module)"
    )
