"""Boundary methods (lowbw.boundary): subspace networks, residual bottlenecks, column sparsification.

The receiver of a subspace boundary rebuilds the sender's residual stream; pipelined gradients equal
one process's for every method; every method trains under GPipe, 1F1B and ZB-H1 and resumes bit for
bit; bytes on the wire, parameters and FLOPs equal their closed forms; the simulator charges the
methods' bytes.
"""

from __future__ import annotations

import math

import pytest
import torch

from lowbw.boundary import TOKEN_ID_BYTES, build_method
from lowbw.config import BoundaryConfig, ModelConfig
from lowbw.errors import ConfigError
from lowbw.models.flops import count_stage_flops, n_params, stage_flops
from lowbw.models.gpt import GPT
from lowbw.pipeline.stage import attach_tokens, split_tokens
from lowbw.simulate import compose as compose_simulation
from lowbw.simulate import simulate
from lowbw.testing.gradcheck import reference_grads
from lowbw.testing.train_check import Scenario, train_runs
from lowbw.validation import validate

SPECS = {"subspace": BoundaryConfig(name="subspace", rank=8), "bottleneck": BoundaryConfig(name="bottleneck", width=4),
         "columns": BoundaryConfig(name="columns", keep=0.25)}
ARCHS = [{"arch": "modern"}, {"arch": "modern", "mlp": "swiglu"}, {"arch": "gpt2"}]


def _model(**kw) -> ModelConfig:
    return ModelConfig(**{"n_layer": 3, "n_embd": 32, "n_head": 2, "block_size": 16, **kw})


# ---- the subspace boundary is exact ----------------------------------------------------------------


def _perturbed_subspace_model(seed=0):
    cfg = _model()
    model = GPT(cfg, [(0, 2), (2, 3)], seed=3, method=build_method(SPECS["subspace"], cfg, 3))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # weights far from their small initialisation: the blocks' writes are not negligible
        for q in model.parameters():
            q.add_(torch.randn(q.shape, generator=gen) * 0.3)
    return cfg, model


def _sender_stream(stage, ids):
    """The residual stream h at the end of the sending stage, as the stage itself computes it."""
    stream = stage.embed(ids)
    for block in stage.blocks:
        stream = block(stream)
    return stream


def test_the_subspace_receiver_rebuilds_the_senders_residual_stream_to_dtype_tolerance():
    _, model = _perturbed_subspace_model()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    sender, receiver = model.stages
    with torch.no_grad():
        h, c = _sender_stream(sender, ids)
        assert torch.equal(sender(ids), c)  # only the coordinates leave the stage
        rebuilt, _ = receiver.receive(c, ids)
        torch.testing.assert_close(rebuilt, h, rtol=1e-5, atol=1e-5)
        assert float((h - receiver.receive.F[ids]).norm()) > 0.5 * float(h.norm())  # the blocks' writes count
        # sent as bfloat16 (compress/fwd=bf16): U is orthonormal, so the error is the coordinates' rounding
        low, _ = receiver.receive(c.bfloat16().float(), ids)
        assert float((low - h).norm()) <= 2 ** -8 * float(c.norm()) + 1e-5 * float(h.norm())


def test_the_subspace_residual_stream_is_the_fixed_embedding_plus_span_u():
    _, model = _perturbed_subspace_model()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        h, c = _sender_stream(model.stages[0], ids)
        U, F = model.stages[0].embed.U, model.stages[0].embed.F
        rest = h - F[ids]
        torch.testing.assert_close(rest - rest @ U @ U.T, torch.zeros_like(rest), rtol=0, atol=1e-5)
        torch.testing.assert_close(rest @ U, c, rtol=1e-5, atol=1e-5)


def test_the_token_ids_travel_inside_the_payload_and_come_back_whole():
    payload, ids = torch.arange(13, dtype=torch.uint8), torch.randint(0, 256, (3, 16))
    wire = attach_tokens(payload, ids)
    assert wire.numel() == 32 + 16 + 2 * 48  # header (4 + 10 + 18, padded), payload padded to 8, 2 bytes a token
    inner, back = split_tokens(wire)
    assert torch.equal(inner, payload) and torch.equal(back, ids)


# ---- parameters and FLOPs: closed forms against the modules and flop_counter ----------------------


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: "-".join(map(str, a.values())))
@pytest.mark.parametrize("spec", [*SPECS.values(), BoundaryConfig(name="subspace", rank=8, match_params=True)],
                         ids=["subspace", "bottleneck", "columns", "subspace-matched"])
def test_parameters_and_flops_of_every_method_equal_their_closed_forms(arch, spec):
    cfg, mb = _model(**arch), 2
    method = build_method(spec, cfg, 5)
    model = GPT(cfg, [(0, 1), (1, 2), (2, 3)], seed=5, method=method)
    assert sum(q.numel() for q in model.parameters()) == n_params(cfg) + method.param_delta(3)
    formula, _ = stage_flops(cfg, 3, mb, [1, 1, 1], method=method)
    ids = torch.zeros(mb, 16, dtype=torch.long)
    for s, stage in enumerate(model.stages):
        x = ids if s == 0 else torch.randn(mb, 16, method.wire_width())
        assert count_stage_flops(stage, x, ids if s == 2 else None, ids) == pytest.approx(formula[s], rel=1e-12)


def test_matched_subspace_blocks_hold_the_dense_blocks_parameters():
    cfg = _model()
    dense = GPT(cfg, [(0, 3)], seed=0)
    matched = GPT(cfg, [(0, 3)], seed=0, method=build_method(BoundaryConfig(name="subspace", rank=8,
                                                                            match_params=True), cfg, 0))
    per_block = [sum(q.numel() for q in m.stages[0].blocks[0].parameters()) for m in (dense, matched)]
    assert per_block[1] <= per_block[0] < per_block[1] + 32 + 8  # within one hidden unit (d + k weights)


# ---- in a pipeline: gradients, training, resume, bytes ---------------------------------------------

METHODS = {"subspace": {"name": "subspace", "rank": 8}, "bottleneck": {"name": "bottleneck", "width": 4},
           "columns": {"name": "columns", "keep": 0.25}}
TRAIN = ["train.lr=0.01"]
SCENARIOS = [Scenario(sched, stages=2, n_layer=2, boundary=spec, extra=TRAIN)
             for spec in METHODS.values() for sched in ("gpipe", "1f1b", "zb_h1")]
SCENARIOS += [
    Scenario("1f1b", stages=3, n_layer=3, boundary=METHODS["subspace"], extra=TRAIN),  # ids relayed by stage 1
    Scenario("1f1b", stages=2, n_layer=2, boundary=METHODS["subspace"], extra=TRAIN + ["compress/fwd=int8"]),
]
STEPS, RESUME_AFTER = 6, 2


@pytest.fixture(scope="module")
def runs():
    torch.set_num_threads(1)
    return train_runs(SCENARIOS, STEPS, RESUME_AFTER)


def _label(sc: Scenario) -> str:
    return f"{sc.boundary['name']}/{sc.schedule}/{sc.stages} stages{' ' + ' '.join(sc.extra[1:]) if sc.extra[1:] else ''}"


def test_pipelined_gradients_of_every_method_equal_single_process_gradients(runs):
    for sc, got in zip(SCENARIOS, runs):
        if sc.extra[1:]:  # a lossy codec on top: not the same computation
            continue
        want = reference_grads(sc)
        assert got["grads"].keys() == want.keys(), _label(sc)
        for name, g in want.items():
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{_label(sc)} {name}: {m}")
            assert float(g.abs().sum()) > 0, (_label(sc), name)  # every parameter learns, the boundary's too


def test_every_method_trains_under_every_schedule(runs):
    for sc, r in zip(SCENARIOS, runs):
        losses = r["losses"]
        assert losses[-1] < losses[0] - 0.3, (_label(sc), losses)


def test_every_method_resumes_bit_for_bit(runs):
    for sc, r in zip(SCENARIOS, runs):
        assert r["resumed"] == r["losses"][RESUME_AFTER + 1:], _label(sc)
        for name, w in r["weights"].items():
            assert torch.equal(w, r["weights_resumed"][name]), (_label(sc), name)


def _none_payload(values: int) -> int:
    """Codec ``none`` on a float32 [mb, T, w] tensor: layout header (4 + 2 + 8 x 3, padded to 8) + data."""
    return 32 + 4 * values


def _int8_payload(shape) -> int:
    from test_codecs import int8_wire_ratio  # the int8 codec's byte formula, as its own tests state it

    return int8_wire_ratio(shape)[1]


def test_bytes_on_the_wire_equal_the_formula_for_every_method(runs):
    for sc, r in zip(SCENARIOS, runs):
        cfg = r["cfg"]
        method = build_method(cfg.boundary, cfg.model, cfg.seed)
        mb, T, m = cfg.train.batch_size // cfg.pipeline.microbatches, cfg.model.block_size, cfg.pipeline.microbatches
        shape = (mb, T, method.wire_width())
        fwd = _int8_payload(shape) if cfg.compress.fwd.name == "int8" else _none_payload(math.prod(shape))
        if method.sends_tokens:
            fwd = 32 + fwd + math.ceil(TOKEN_ID_BYTES * mb * T / 8) * 8
        bwd = _none_payload(math.prod(shape))
        for boundary in range(sc.stages - 1):
            assert r["codecs"][f"{boundary}.fwd"] == (m * fwd, m), _label(sc)
            assert r["codecs"][f"{boundary}.bwd"] == (m * bwd, m), _label(sc)


# ---- the simulator ------------------------------------------------------------------------------


def _simulated(overrides):
    return simulate(compose_simulation(["model.n_layer=8", "model.n_embd=1024", "model.n_head=16",
                                        "model.block_size=1024", "pipeline.stages=8", "pipeline.microbatches=16",
                                        "schedule=1f1b", "net=ideal", "net.emulate=true", "net.uplink_mbps=200",
                                        "net.downlink_mbps=200", "net.latency_ms=50", "sim.picture_steps=0",
                                        "sim.steps=3", *overrides]))


def test_the_simulator_sends_322_bytes_a_token_forward_for_a_subspace_of_rank_160_in_bf16():
    dense, sub = _simulated([]), _simulated(["boundary=subspace", "boundary.rank=160"])
    tokens = sub["tokens_per_step"] // sub["microbatches"]  # per message
    assert dense["message_bytes"] == {"fwd": 2048 * tokens, "bwd": 2048 * tokens}
    assert sub["message_bytes"] == {"fwd": 322 * tokens, "bwd": 320 * tokens}  # 2 k + the token id; 2 k back
    assert sub["step_time_s"] < dense["step_time_s"] / 2
    assert sub["model_params"] < dense["model_params"]


@pytest.mark.parametrize("name,field,values", [("subspace", "rank", [1, 16, 160]), ("bottleneck", "width", [8, 64]),
                                               ("columns", "keep", [0.01, 0.1, 0.5])])
def test_the_simulators_message_bytes_equal_the_formula_for_every_method_and_size(name, field, values):
    for v in values:
        for codec, per_value in (("none", 2), ("int8", None)):
            s = _simulated([f"boundary={name}", f"boundary.{field}={v}", f"compress/fwd={codec}"])
            tokens = s["tokens_per_step"] // s["microbatches"]
            method = build_method(BoundaryConfig(name=name, **{field: v}), ModelConfig(n_embd=1024), 0)
            w = method.wire_width()
            ids = TOKEN_ID_BYTES * tokens if method.sends_tokens else 0
            raw = 2 * w * tokens
            fwd = raw if codec == "none" else round(raw / s["codec_ratio"]["fwd"])
            assert s["message_bytes"] == {"fwd": fwd + ids, "bwd": raw}, (name, v, codec)
            if per_value:
                assert s["message_bytes"]["fwd"] / tokens == per_value * w + (2 if method.sends_tokens else 0)


def test_the_simulator_adds_each_methods_flops_and_parameters():
    dense, bott = _simulated([]), _simulated(["boundary=bottleneck", "boundary.width=64"])
    assert bott["model_params"] - dense["model_params"] == 7 * 2 * 1024 * 64
    side = 2 * 1024 * 1024 * 64  # a microbatch of one sequence of 1024 tokens through one d x w product
    assert bott["stage_flops"][0]["forward"] - dense["stage_flops"][0]["forward"] == pytest.approx(2 * side)
    assert bott["stage_flops"][3]["backward"] - dense["stage_flops"][3]["backward"] == pytest.approx(6 * side)


# ---- bad settings ------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,match", [
    (["boundary=subspace", "boundary.rank=0"], r"boundary.rank=0 must be an integer in \[1, 65,535\] \(subspace"),
    (["boundary=subspace", "boundary.rank=64"], r"boundary.rank=64 must be less than model.n_embd=64"),
    (["boundary=bottleneck", "boundary.width=0"], r"boundary.width=0 must be an integer in \[1, 65,535\]"),
    (["boundary=bottleneck", "boundary.width=100"], r"boundary.width=100 must be less than model.n_embd=64"),
    (["boundary=columns", "boundary.keep=1.0"], r"boundary.keep=1.0 must be a number in \(0, 1\) \(the fraction"),
    (["boundary=columns", "boundary.keep=0"], r"boundary.keep=0.0 must be a number in \(0, 1\)"),
    (["boundary=columns", "boundary.keep=0.999"], r"boundary.keep=0.999 keeps all 64 columns of model.n_embd=64"),
    (["boundary.name=lowrank"], "boundary='lowrank' is not a boundary method; use one of"),
    (["boundary=columns", "regime=gpt_1b"], "boundary=columns with regime=gpt_1b: the regime charges"),
])
def test_bad_boundary_settings_are_rejected_naming_the_setting(compose, overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose(overrides))


@pytest.mark.parametrize("overrides,match", [
    (["boundary=subspace", "boundary.rank=-3"], r"boundary.rank=-3 must be an integer in \[1, 65,535\]"),
    (["boundary=columns", "boundary.keep=1.5"], r"boundary.keep=1.5 must be a number in \(0, 1\)"),
    (["boundary=bottleneck", "boundary.width=2048"], r"boundary.width=2048 must be less than model.n_embd=1024"),
])
def test_the_simulator_refuses_a_bad_boundary_size_naming_the_setting(overrides, match):
    with pytest.raises(ConfigError, match=match):
        simulate(compose_simulation(["model.n_embd=1024", "model.n_head=16", *overrides]))
