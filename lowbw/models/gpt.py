"""A small decoder-only transformer (nanoGPT-shaped) that can be cut into pipeline stages.

Read top to bottom: the GPT-2 block (attention, MLP, block), the block families ``model.arch``
picks from (this GPT-2 block, or the modern block of :mod:`lowbw.models.modern`), then
:class:`GPTStage` -- a contiguous slice of the model: the first stage owns the token embedding (and
the position table, for GPT-2), the last owns the final norm, the head and the loss. Stacking all
stages of a partition gives the whole model (:class:`GPT`), which is what single-process training
runs; parameters are initialised per block from the seed, so a stage built alone on its rank has
exactly the weights it has inside the whole model.

The head is never tied to the embedding (nanoGPT and GPT-2 tie them; the NanoGPT speedrun and
Llama do not). With the embedding on the first rank and the head on the last, a tied matrix would
be two copies that must stay equal: every step their gradients would have to be summed across the
pipeline's two ends -- a V x d all-reduce between ranks that are not neighbours, over the slowest
links lowbw models, outside the schedule -- and both copies updated identically. An untied head
costs V x d parameters (V = 256 bytes here: 7% of the tiny model's 230 k) and nothing on the wire.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lowbw.boundary import BoundaryMethod
from lowbw.config import ModelConfig
from lowbw.models.modern import ModernBlock


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))

    def branches(self) -> tuple[tuple[nn.Module, nn.Module], ...]:
        """The residual branches in order, (norm, branch): what boundary methods rewire (lowbw.boundary)."""
        return (self.ln1, self.attn), (self.ln2, self.mlp)


@dataclass(frozen=True)
class Arch:
    """A block family (``model.arch``): its block, and what it needs around its blocks."""

    block: Callable[[ModelConfig], nn.Module]
    norm: Callable[[int], nn.Module]  # the final norm before the head
    learned_positions: bool  # a position table added on the first stage (else positions live in the blocks)
    head_bias: bool  # the head has a bias


ARCHS = {
    "gpt2": Arch(Block, nn.LayerNorm, learned_positions=True, head_bias=True),
    "modern": Arch(ModernBlock, nn.RMSNorm, learned_positions=False, head_bias=False),
}


def _init_weights(module: nn.Module, n_layer: int) -> None:
    # GPT-2 initialisation (as nanoGPT): N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer).
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj") else 0.02
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)


def _seeded(seed: int, part: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + part)


class GPTStage(nn.Module):
    """Blocks [first, last) of the model, plus embeddings if first stage, plus head if last.

    ``method`` (lowbw.boundary; None = the dense model) decides what crosses the stage's boundaries:
    a stage that is not the last ends with the method's sender (``send``) and one that is not the
    first starts with its receiver (``receive``); ``index`` is the stage's place in the model (its
    boundaries are index - 1 and index). Their parameters are the stage's.
    """

    def __init__(self, cfg: ModelConfig, first: int, last: int, is_first: bool, is_last: bool, seed: int,
                 method: Optional[BoundaryMethod] = None, index: int = 0):
        super().__init__()
        self.cfg, self.is_first, self.is_last = cfg, is_first, is_last
        self.block_range = (first, last)
        self.method = method = method or BoundaryMethod(cfg, None, seed)
        arch = ARCHS[cfg.arch]
        self.learned_positions = arch.learned_positions
        with torch.random.fork_rng(devices=[]):
            if is_first:
                torch.manual_seed(_seeded(seed, 0).initial_seed())
                self._embedding(cfg, arch, method)
                _init_weights(self, cfg.n_layer)
            blocks = []
            for i in range(first, last):
                torch.manual_seed(_seeded(seed, 1 + i).initial_seed())
                block = method.adapt_block(arch.block(cfg))
                _init_weights(block, cfg.n_layer)
                blocks.append(block)
            self.blocks = nn.ModuleList(blocks)
            if is_last:
                torch.manual_seed(_seeded(seed, 1 + cfg.n_layer).initial_seed())
                self.ln_f = arch.norm(cfg.n_embd)
                self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=arch.head_bias)
                _init_weights(self.head, cfg.n_layer)
        # built outside the seeded streams: the methods seed their own tensors (lowbw.boundary.base.seeded)
        self.receive = None if is_first else method.receiver(index - 1)
        self.send = None if is_last else method.sender(index)

    def _embedding(self, cfg: ModelConfig, arch: Arch, method: BoundaryMethod) -> None:
        embed = method.embedding()
        if embed is not None:
            self.embed = embed
            return
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if arch.learned_positions:
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)

    def forward(self, x: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """First stage: x is token ids [B, T]; others: what crossed the boundary before it ([B, T, C] for
        the dense model), with the token ids that crossed with it when the method sends them. Last
        stage returns logits; the others what crosses their boundary after them."""
        if self.is_first and hasattr(self, "embed"):
            x = self.embed(x)
        elif self.is_first and self.learned_positions:
            pos = torch.arange(x.shape[1], device=x.device)
            x = self.wte(x) + self.wpe(pos)
        elif self.is_first:
            x = self.wte(x)
        elif self.receive is not None:
            x = self.receive(x, tokens)
        for block in self.blocks:
            x = block(x)
        if self.is_last:
            return self.head(self.ln_f(self.method.residual(x)))
        return self.send(x) if self.send is not None else x

    def hidden_spec(self, tokens: tuple[int, ...]) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of what crosses a boundary for token ids of shape ``tokens`` ([B, T]): what this stage
        takes in (unless first) and gives out (unless last) -- and their gradients, the other way."""
        return (*tokens, self.method.wire_width()), next(self.parameters()).dtype  # n_embd unless a boundary method

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class GPT(nn.Module):
    """The whole model as the sequence of its stages (single-process reference)."""

    def __init__(self, cfg: ModelConfig, ranges: list[tuple[int, int]], seed: int,
                 method: Optional[BoundaryMethod] = None):
        super().__init__()
        n = len(ranges)
        self.stages = nn.ModuleList(
            GPTStage(cfg, a, b, is_first=(i == 0), is_last=(i == n - 1), seed=seed, method=method, index=i)
            for i, (a, b) in enumerate(ranges)
        )

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = idx
        for stage in self.stages:
            x = stage(x, idx)
        return x
