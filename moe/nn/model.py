"""A small decoder-only MoE transformer: RoPE causal attention + MoE SwiGLU feed-forward, pre-RMSNorm.

Single-device model code; parallelism (DDP, DeepSpeed, expert parallel) is applied from outside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from moe.config import ModelConfig, RouterConfig
from moe.nn.layers import build_moe_layer
from moe.nn.routers import Router
from moe.nn.routing import RoutingResult


def validate_model_config(cfg: ModelConfig) -> None:
    if cfg.vocab_size <= 0 or cfg.max_seq_len <= 0:
        raise ValueError(
            f"model.vocab_size={cfg.vocab_size}, model.max_seq_len={cfg.max_seq_len}: both must be > 0 "
            "(train.py fills them from the data module)"
        )
    if cfg.d_model % cfg.n_head or (cfg.d_model // cfg.n_head) % 2:
        raise ValueError(f"model.d_model={cfg.d_model}: must split into model.n_head={cfg.n_head} heads of even size")
    if cfg.num_experts < 1:
        raise ValueError(f"model.num_experts={cfg.num_experts}: expected >= 1")


def rope_tables(seq_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[S, head_dim/2]`` for rotary position embeddings."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: ``[B, H, S, hd]``; rotates the pairs (x[..., :hd/2], x[..., hd/2:])."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x_BSD), "b s (three h hd) -> three b h s hd", three=3, h=self.n_head)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        return self.proj(rearrange(y, "b h s hd -> b s (h hd)"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, router: RouterConfig):
        super().__init__()
        self.norm_attn = nn.RMSNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.norm_moe = nn.RMSNorm(cfg.d_model)
        self.moe = build_moe_layer(cfg.d_model, cfg.d_ff, cfg.num_experts, router, cfg.moe, causal=True)

    def forward(self, x, cos, sin) -> tuple[torch.Tensor, RoutingResult]:
        x = x + self.attn(self.norm_attn(x), cos, sin)
        y, routing = self.moe(self.norm_moe(x))
        return x + y, routing


class MoETransformer(nn.Module):
    """tokens ``[B, S]`` -> (logits ``[B, S, V]``, one RoutingResult per layer)."""

    def __init__(self, cfg: ModelConfig, router: RouterConfig):
        super().__init__()
        validate_model_config(cfg)
        self.cfg, self.router_cfg = cfg, router
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.shift = nn.Linear(cfg.d_model, cfg.d_model, bias=False) if cfg.token_shift else None
        self.blocks = nn.ModuleList(Block(cfg, router) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.max_seq_len, cfg.d_model // cfg.n_head, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.head.weight, std=0.02)
        if self.shift is not None:
            nn.init.zeros_(self.shift.weight)
        for name, m in self.named_modules():
            if isinstance(m, Router):  # routers name their layer in errors
                m.layer_name = name

    @classmethod
    def tokenizer(cls, cfg: ModelConfig) -> None:
        """The tokenizer this model brings to the data (``moe.data.TrainData.from_config``): none, the data module
        chooses its own vocabulary (the tasks' symbols, or bytes for text)."""
        return None

    def forward(self, tokens_BS: torch.Tensor) -> tuple[torch.Tensor, list[RoutingResult]]:
        S = tokens_BS.shape[1]
        if S > self.cfg.max_seq_len:
            raise ValueError(f"tokens: sequence length {S} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(tokens_BS)
        if self.shift is not None:
            x = x + self.shift(F.pad(x[:, :-1], (0, 0, 1, 0)))  # position t sees token t-1 (zeros at t=0)
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]
        routings = []
        for block in self.blocks:
            x, r = block(x, cos, sin)
            routings.append(r)
        return self.head(self.norm(x)), routings
