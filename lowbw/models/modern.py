"""The block of today's small language models: RMSNorm, rotary positions, QK-norm, a choice of MLP.

Read top to bottom: the settings a config resolves to, rotary position embedding, attention (with
optional QK-norm), the three MLPs, the block. :mod:`lowbw.models.gpt` assembles stages from it.

What differs from the GPT-2 block in :mod:`lowbw.models.gpt`, and where it comes from:

* RMSNorm instead of LayerNorm (Zhang & Sennrich 2019, arXiv 1910.07467): no mean subtraction, no bias.
* Rotary position embedding (Su et al. 2021, RoFormer, arXiv 2104.09864) on queries and keys instead
  of a learned position table added to the input: the first stage owns no position parameters.
* QK-norm (Henry et al. 2020, arXiv 2010.04245; Dehghani et al. 2023, arXiv 2302.05442): queries and
  keys RMS-normalised per head before the dot product, which bounds attention logits.
* MLP: GELU (GPT-2), squared ReLU (So et al. 2021, Primer, arXiv 2109.08668; the NanoGPT speedrun's
  choice) or SwiGLU (Shazeer 2020, arXiv 2002.05202; Llama).
* No biases in any linear layer (Llama, the speedrun).
* Queries, keys and values are three matrices rather than one fused ``qkv``: same FLOPs, and an
  optimizer that works per matrix (Muon orthogonalises each update) treats them separately, as the
  speedrun does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

# RoFormer's base of the rotation frequencies theta_i = base^(-2i/d) (Su et al. 2021, section 3.2).
ROPE_BASE = 10_000.0
MLPS = ("gelu", "relu2", "swiglu")


def modern_settings(cfg: Any) -> tuple[str, bool]:
    """(mlp, qk_norm) of a model config with its nulls resolved: squared ReLU and QK-norm, as the speedrun."""
    mlp = cfg.mlp if cfg.mlp is not None else "relu2"
    qk_norm = True if cfg.qk_norm is None else bool(cfg.qk_norm)
    return mlp, qk_norm


def swiglu_hidden(d: int) -> int:
    """SwiGLU's hidden width: 2/3 of the 4d of a two-matrix MLP, so its three matrices hold about as
    many parameters and FLOPs as the two of width 4d (Shazeer 2020, GLU Variants Improve Transformer)."""
    return 8 * d // 3


class Rotary(nn.Module):
    """Rotates each (i, i + hd/2) pair of a head's channels by position x theta_i (the GPT-NeoX layout)."""

    def __init__(self, head_dim: int, max_len: int):
        super().__init__()
        theta = ROPE_BASE ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angle = torch.outer(torch.arange(max_len, dtype=torch.float32), theta)  # [T, hd/2]
        # not persistent: derived from the shape alone, so checkpoints hold only what training changes
        self.register_buffer("cos", angle.cos(), persistent=False)
        self.register_buffer("sin", angle.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, heads, T, hd]."""
        T = x.shape[-2]
        cos, sin = self.cos[:T], self.sin[:T]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: Any, qk_norm: bool):
        super().__init__()
        d, self.n_head = cfg.n_embd, cfg.n_head
        head_dim = d // cfg.n_head
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.q_norm = nn.RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.rotary = Rotary(head_dim, cfg.block_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

        q = self.rotary(self.q_norm(heads(self.q(x))))
        k = self.rotary(self.k_norm(heads(self.k(x))))
        y = F.scaled_dot_product_attention(q, k, heads(self.v(x)), is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """Two matrices of width 4d around GELU or squared ReLU (relu(x)^2)."""

    def __init__(self, d: int, activation: str):
        super().__init__()
        self.activation = activation
        self.fc = nn.Linear(d, 4 * d, bias=False)
        self.proj = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h = F.gelu(h) if self.activation == "gelu" else F.relu(h).square()
        return self.proj(h)


class SwiGLU(nn.Module):
    """proj(silu(gate(x)) * fc(x)), hidden width :func:`swiglu_hidden`."""

    def __init__(self, d: int):
        super().__init__()
        h = swiglu_hidden(d)
        self.gate = nn.Linear(d, h, bias=False)
        self.fc = nn.Linear(d, h, bias=False)
        self.proj = nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.gate(x)) * self.fc(x))


class ModernBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: Any):
        super().__init__()
        mlp, qk_norm = modern_settings(cfg)
        self.norm1 = nn.RMSNorm(cfg.n_embd)
        self.attn = Attention(cfg, qk_norm)
        self.norm2 = nn.RMSNorm(cfg.n_embd)
        self.mlp = SwiGLU(cfg.n_embd) if mlp == "swiglu" else MLP(cfg.n_embd, mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def branches(self) -> tuple[tuple[nn.Module, nn.Module], ...]:
        """The residual branches in order, (norm, branch): what boundary methods rewire (lowbw.boundary)."""
        return (self.norm1, self.attn), (self.norm2, self.mlp)
