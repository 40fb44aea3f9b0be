"""A small decoder-only transformer, written plainly (after nanoGPT).

Attention and LayerNorm are hand-written: on this stack nested forward-mode AD through
`F.layer_norm` returns wrong second derivatives without error, and fused attention
kernels fail under forward-mode AD and double backward on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from polca_study.errors import ConfigError


@dataclass
class ModelConfig:
    n_layers: int = 2  # transformer blocks
    d_model: int = 64  # residual stream width
    n_heads: int = 4  # attention heads; d_model must divide evenly
    d_mlp: int = 256  # hidden width of each MLP
    n_ctx: int | None = None  # longest input sequence; None: set by the dataset
    d_vocab: int | None = None  # token vocabulary size; None: set by the dataset
    init_std: float | None = None  # weight init std; None derives 1/sqrt(d_model)

    def __post_init__(self):
        for name in ("n_layers", "d_model", "n_heads", "d_mlp", "n_ctx", "d_vocab"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.init_std is None:
            self.init_std = self.d_model**-0.5
        if self.init_std <= 0:
            raise ConfigError(f"model.init_std must be > 0 or null, got {self.init_std}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})"
            )

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


class LayerNorm(nn.Module):
    """LayerNorm by elementary ops, exact under nested forward-mode AD."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))

    def normalize(self, x: Tensor) -> Tensor:
        x = x - x.mean(-1, keepdim=True)
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.normalize(x) * self.weight + self.bias

    def project_per_sample_grads(self, inputs, output_grad: Tensor, basis: dict) -> Tensor:
        """Per-sequence gradients Σ_t δ_t ⊙ x̂_t and Σ_t δ_t, projected on the basis (S, m)."""
        S, D = output_grad.shape[0], output_grad.shape[-1]
        x_hat = self.normalize(inputs[0]).detach().reshape(S, -1, D)
        delta = output_grad.reshape(S, -1, D)
        return (delta * x_hat).sum(1) @ basis["weight"] + delta.sum(1) @ basis["bias"]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        mask = torch.tril(torch.ones(cfg.n_ctx, cfg.n_ctx, dtype=torch.bool))
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])  # (B, nh, T, T)
        att = att.masked_fill(~self.mask[:T, :T], float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.down = nn.Linear(cfg.d_mlp, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.d_vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = LayerNorm(cfg.d_model)
        self.unembed = nn.Linear(cfg.d_model, cfg.d_vocab, bias=False)
        self.apply(self._init)

    def _init(self, module: nn.Module) -> None:
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (B, T) -> logits (B, T, d_vocab)."""
        B, T = tokens.shape
        if T > self.cfg.n_ctx:
            raise ConfigError(f"sequence length {T} exceeds model.n_ctx={self.cfg.n_ctx}")
        # positions expanded per sequence so per-sample gradients of `pos` stay separable
        positions = torch.arange(T, device=tokens.device).expand(B, T)
        x = self.embed(tokens) + self.pos(positions)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_f(x))

    def config_dict(self) -> dict:
        return asdict(self.cfg)
