"""FLOPs of a model's stages: counted by ``torch.utils.flop_counter`` and in closed form.

The virtual clock's ``durations=flops`` and the simulator both turn FLOPs into seconds with a
hardware profile's effective rate. :func:`count_stage_flops` counts a real module on a meta-device
copy; :func:`flop_formula` is the closed form the simulator uses for models too large to build,
checked against the counter in ``tests/test_simulate.py``.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Optional

import torch
import torch.nn.init as init
from torch.utils.flop_counter import FlopCounterMode

from lowbw.boundary import BoundaryMethod
from lowbw.models.gpt import GPTStage
from lowbw.models.modern import modern_settings, swiglu_hidden
from lowbw.pipeline.partition import partition_layers


def count_stage_flops(module: torch.nn.Module, inp: torch.Tensor, targets: Optional[torch.Tensor],
                      tokens: Optional[torch.Tensor] = None) -> tuple[float, float]:
    """(forward, backward) FLOPs of one microbatch through ``module``, by torch.utils.flop_counter.

    ``tokens``: the token ids that cross with the input (boundary methods that send them, lowbw.boundary).

    Counted on a meta-device copy: on CPU tensors torch dispatches attention to a fused kernel the
    counter does not see (0 FLOPs), on meta tensors it counts it -- and the copy costs no memory.
    """
    module = copy.deepcopy(module).to("meta")
    inp, targets = inp.to("meta"), None if targets is None else targets.to("meta")
    tokens = None if tokens is None else tokens.to("meta")
    counter = FlopCounterMode(display=False)
    inp = inp.detach().requires_grad_(inp.is_floating_point())
    with counter:
        out = module(inp, tokens)
        if targets is not None:
            out = GPTStage.loss(out, targets)
        fwd = counter.get_total_flops()
        out.backward(torch.ones_like(out) if targets is None else None)
        total = counter.get_total_flops()
    return float(fwd), float(total - fwd)


_FLOP_CACHE: dict[tuple, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {}


def flop_formula(model: Any, microbatch: int) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
    """Closed form of :func:`flop_parts` (what ``torch.utils.flop_counter`` counts for lowbw's GPT).

    N = microbatch x T tokens, width d: a block's matmuls are the attention projections 8 N d^2
    (q, k, v and the output projection, fused or not), the MLP and attention 4 microbatch T^2 d
    (flop_counter counts causal SDPA as full). The MLP is 16 N d^2 with two matrices of width 4d
    (GELU, squared ReLU) and 6 N d h with SwiGLU's three of width h. Backward is twice the forward.
    The head is 2 N d V; embeddings, norms, rotary positions, activations and the loss count 0
    (not matmuls). ``tests/test_simulate.py`` and ``tests/test_modern_model.py`` check this
    against the counter.
    """
    N, T, d, V = microbatch * model.block_size, model.block_size, model.n_embd, model.vocab_size
    swiglu = model.arch == "modern" and modern_settings(model)[0] == "swiglu"
    mlp = 6.0 * N * d * swiglu_hidden(d) if swiglu else 16.0 * N * d * d
    block = 8.0 * N * d * d + mlp + 4.0 * microbatch * T * T * d
    head = 2.0 * N * d * V
    return (block, 2 * block), (0.0, 0.0), (head, 2 * head)


def flop_parts(model: Any, microbatch: int) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
    """(forward, backward) FLOPs of one microbatch through: one block, the embeddings, the head + loss.

    Counted by ``torch.utils.flop_counter`` (:func:`count_stage_flops`) on modules of the real
    shape built on the meta device, so a 1B model costs no memory. A stage's FLOPs are
    ``n_blocks * block + embeddings (first stage) + head (last stage)``: the counter sums per op.
    """
    key = (model.arch, model.mlp, model.qk_norm, model.n_layer, model.n_embd, model.n_head, model.block_size,
           model.vocab_size, microbatch)
    if key in _FLOP_CACHE:
        return _FLOP_CACHE[key]
    T, d = model.block_size, model.n_embd
    with torch.device("meta"), _no_init():
        ids = torch.zeros(microbatch, T, dtype=torch.long)
        act = torch.zeros(microbatch, T, d)
        block = count_stage_flops(GPTStage(model, 0, 1, False, False, 0), act, None)
        embed = count_stage_flops(GPTStage(model, 0, 0, True, False, 0), ids, None)
        head = count_stage_flops(GPTStage(model, 0, 0, False, True, 0), act, ids)
    _FLOP_CACHE[key] = (block, embed, head)
    return block, embed, head


@contextlib.contextmanager
def _no_init():
    """Skip weight initialisation while building meta modules (init on meta costs seconds of imports)."""
    names = ("normal_", "zeros_", "ones_", "uniform_", "kaiming_uniform_")
    saved = {n: getattr(init, n) for n in names}
    try:
        for n in names:
            setattr(init, n, lambda t, *a, **k: t)
        yield
    finally:
        for n, f in saved.items():
            setattr(init, n, f)


def stage_blocks(n_layer: int, n_stages: int, partition: Optional[list[int]]) -> tuple[list[float], bool]:
    """Blocks per stage (fractional when there are more stages than blocks); whether it is fractional."""
    if n_stages <= n_layer or partition is not None:
        return [float(b - a) for a, b in partition_layers(n_layer, n_stages, partition)], False
    return [n_layer / n_stages] * n_stages, True


def stage_flops(model: Any, n_stages: int, microbatch: int, partition: Optional[list[int]] = None,
                counter: bool = False, method: Optional[BoundaryMethod] = None) -> tuple[list[tuple[float, float]], bool]:
    """Per-stage (forward, backward) FLOPs of one microbatch (``counter``: flop_counter, else the formula).

    ``method``: a boundary method (lowbw.boundary), whose closed-form terms are added to the dense
    model's: per block, on the first stage's embedding, on each stage's sending and receiving side."""
    block, embed, head = (flop_parts if counter else flop_formula)(model, microbatch)
    terms = method.flop_terms(microbatch) if method is not None else {}
    zero = (0.0, 0.0)
    t_block, t_embed, t_send, t_recv = (terms.get(k, zero) for k in ("block", "embed", "send", "recv"))
    blocks, fractional = stage_blocks(model.n_layer, n_stages, partition)
    out = []
    for s, nb in enumerate(blocks):
        first, last = s == 0, s == n_stages - 1
        out.append(tuple(nb * (block[j] + t_block[j]) + ((embed[j] + t_embed[j]) if first else t_recv[j])
                         + (head[j] if last else t_send[j]) for j in (0, 1)))
    return out, fractional


def n_params(model: Any) -> int:
    """Parameters of the whole GPT (untied head), closed form."""
    d, L, V, T = model.n_embd, model.n_layer, model.vocab_size, model.block_size
    if model.arch == "gpt2":
        block = 12 * d * d + 13 * d  # qkv 3d^2+3d, proj d^2+d, fc 4d^2+4d, proj 4d^2+d, 2 LayerNorms 4d
        return V * d + T * d + L * block + 2 * d + d * V + V
    mlp, qk_norm = modern_settings(model)
    mlp_params = 3 * d * swiglu_hidden(d) if mlp == "swiglu" else 8 * d * d
    head_dim = d // model.n_head
    block = 4 * d * d + mlp_params + 2 * d + (2 * head_dim if qk_norm else 0)  # q k v proj, MLP, 2 RMSNorms, QK-norms
    return V * d + L * block + d + d * V  # embedding, blocks, final RMSNorm, head (no bias)
