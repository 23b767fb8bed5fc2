"""Codecs: round-trip error within the documented bound, honest payload sizes, error feedback,
AQ-SGD caches, low rank, configs. Tensor-level only (no pipeline)."""

from __future__ import annotations

import io
import math
import pathlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbw.compress import CODECS, build_codec
from lowbw.compress import quantize_cpu
from lowbw.compress.payload import _CODE as _DTYPE_CODE
from lowbw.compress.payload import pack_layout, packed_size, part_nbytes, part_tensor, unpack
from lowbw.errors import ConfigError

torch.set_num_threads(1)

ROOT = pathlib.Path(__file__).resolve().parents[1]

SPECS = [
    {"name": "none"},
    {"name": "fp16"},
    {"name": "bf16"},
    {"name": "int8"},
    {"name": "int4"},
    {"name": "int2"},
    {"name": "quant", "bits": 4, "symmetric": True},
    {"name": "quant", "bits": 8, "block": 0, "scale_dtype": "float16"},
    {"name": "int4", "block": 7, "scale_dtype": "float32"},
    {"name": "topk", "ratio": 0.05},
    {"name": "topk", "ratio": 1.0},
    {"name": "randk", "ratio": 0.1},
    {"name": "powersgd", "rank": 4},
    {"name": "powersgd", "rank": 2, "factor_dtype": "bfloat16"},
    {"name": "aqsgd"},
    {"name": "aqsgd", "bits": 2, "base_bits": 4, "cache_dtype": "bfloat16"},
]


def _id(spec):
    return "-".join(f"{v}" for v in spec.values()) if isinstance(spec, dict) else str(spec)


def random_tensor(seed=0, shape=(4, 32, 64)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def real_activations(seed=0, shape=(4, 32, 64)):
    """Output of a small transformer layer, with a few large outlier channels (as in LLM activations)."""
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(shape[-1], nhead=4, dim_feedforward=128, batch_first=True)
    with torch.no_grad():
        y = layer(torch.randn(shape))
    y[..., :2] *= 20.0
    return y


def run(spec, x, steps=1, ids=None):
    """Fresh sender/receiver pair; returns (inputs, decoded, bounds, payloads) over `steps` encodes."""
    snd, rcv = build_codec(spec), build_codec(spec)
    if ids is None and spec["name"] == "aqsgd":
        ids = torch.arange(x.shape[0])
    out = []
    for t in range(steps):
        xt = x * (1 + 0.01 * t)
        bound = snd.error_bound(xt, ids)
        payload = snd.encode(xt, ids)
        out.append((xt, rcv.decode(payload, ids), bound, payload))
    return out


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# --- round trip ----------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [random_tensor, real_activations], ids=["random", "activations"])
@pytest.mark.parametrize("spec", SPECS, ids=_id)
def test_round_trip_error_is_within_documented_bound(spec, make):
    for x, y, bound, payload in run(spec, make(), steps=3):
        assert y.shape == x.shape and y.dtype == x.dtype
        assert payload.dtype == torch.uint8 and payload.dim() == 1 and payload.is_contiguous()
        assert rel_err(y, x) <= bound, (rel_err(y, x), bound)


@pytest.mark.parametrize(
    "spec, at_most",
    [("none", 0.0), ("fp16", 5e-4), ("bf16", 4e-3), ("int8", 0.02), ("int4", 0.2), ("int2", 0.8)],
)
def test_typical_error_on_activations_is_small_for_each_precision(spec, at_most):
    (x, y, _, _), = run({"name": spec}, real_activations())
    assert rel_err(y, x) <= at_most


@pytest.mark.parametrize("spec", [s for s in SPECS if s["name"] in ("int8", "int4", "int2", "quant")], ids=_id)
def test_quantized_entries_are_within_half_a_step_of_the_input(spec):
    codec = build_codec(spec)
    x = real_activations(1).reshape(-1)[:1000].contiguous()  # 1000: not a multiple of any block
    y = codec.decode(codec.encode(x))
    q = codec.q
    e, _ = q.entry_bounds(x)
    per_entry = e.repeat_interleave(q._block(tuple(x.shape)))[: x.numel()]
    assert ((y.double() - x.double()).abs() <= per_entry).all()


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8]),
    block=st.sampled_from([0, 1, 3, 64]),
    symmetric=st.booleans(),
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    scale=st.sampled_from([1e-8, 1.0, 1e4]),
    offset=st.sampled_from([0.0, 3.0]),
    seed=st.integers(0, 1000),
)
def test_quant_bound_holds_for_any_shape_block_and_magnitude(bits, block, symmetric, shape, scale, offset, seed):
    codec = build_codec({"name": "quant", "bits": bits, "block": block, "symmetric": symmetric})
    x = (random_tensor(seed, tuple(shape)) + offset) * scale
    payload = codec.encode(x)
    assert payload.numel() == codec.payload_nbytes(tuple(shape), x.dtype)
    assert rel_err(codec.decode(payload), x) <= codec.error_bound(x)


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8]),
    block=st.sampled_from([0, 1, 7, 64]),
    symmetric=st.booleans(),
    scale_dtype=st.sampled_from(["bfloat16", "float16", "float32"]),
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    scale=st.sampled_from([1e-40, 1e-8, 1.0, 1e4, 3e38]),
    special=st.sampled_from([None, "nan", "inf", "-inf", "zeros", "-0.0", "float16", "float64"]),
    seed=st.integers(0, 1000),
)
def test_cpu_path_is_bit_identical_to_the_torch_path(bits, block, symmetric, scale_dtype, shape, scale, special, seed):
    """quantize_cpu (numpy views, bfloat16 rounding on bit patterns) against the torch ops other devices use:
    the same payload bytes and the same decoded bits, for every width, block, scale dtype and magnitude,
    denormals, zeros of both signs and non-finite entries included."""
    spec = {"name": "quant", "bits": bits, "block": block, "symmetric": symmetric, "scale_dtype": scale_dtype}
    codec = build_codec(spec)
    x = random_tensor(seed, tuple(shape)) * scale
    if special in ("nan", "inf", "-inf"):
        x.view(-1)[seed % x.numel()] = float(special)
    elif special in ("zeros", "-0.0"):
        x = torch.zeros_like(x) if special == "zeros" else -torch.zeros_like(x)
    elif special is not None:
        x = x.to(getattr(torch, special))
    q, shp = codec.q, tuple(shape)
    specs = [(torch.int64, (1 + len(shp),)), *q.specs(shp)]
    ref, (meta, stats, codes) = pack_layout(specs)
    meta.copy_(torch.tensor([_DTYPE_CODE[x.dtype], *shp]))
    q.quantize_into_torch(x, stats, codes)
    payload = codec.encode(x)
    assert _bits(payload) == _bits(ref)
    _, stats, codes = unpack(payload)
    assert _bits(codec.decode(payload)) == _bits(q.dequantize_torch(stats, codes, shp).to(x.dtype))
    assert _bits(q.dequantize(stats, codes, shp)) == _bits(q.dequantize_torch(stats, codes, shp))


def test_cpu_path_reads_and_writes_bfloat16_pairs_without_the_little_endian_shortcut(monkeypatch):
    """The branch a big-endian CPU takes gives the same bytes (it shifts values, never reinterprets bytes)."""
    x = real_activations(2)
    want = build_codec("int8").encode(x)
    monkeypatch.setattr(quantize_cpu, "_LITTLE", False)
    codec = build_codec("int8")
    assert _bits(codec.encode(x)) == _bits(want)
    monkeypatch.setattr(quantize_cpu, "_LITTLE", True)
    y = codec.decode(want)
    monkeypatch.setattr(quantize_cpu, "_LITTLE", False)
    assert _bits(codec.decode(want)) == _bits(y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("spec", SPECS, ids=_id)
def test_decode_restores_dtype_and_shape(spec, dtype):
    x = random_tensor(3, (3, 5, 7)).to(dtype)
    (_, y, _, _), = run(spec, x)
    assert y.dtype == dtype and y.shape == x.shape


@pytest.mark.parametrize("spec", SPECS, ids=_id)
def test_encode_leaves_its_input_untouched(spec):
    x = random_tensor(4)
    before = x.clone()
    run(spec, x, steps=2)
    assert torch.equal(x, before)


# --- bytes on the wire -----------------------------------------------------------------------------

SHAPE = (8, 128, 512)
N = 8 * 128 * 512


def _header(*ndims):  # payload.pack's header: u32 count, per tensor u8 dtype + u8 ndim + i64 dims, 8-aligned
    h = 4 + sum(2 + 8 * d for d in ndims)
    return h + (-h) % 8


@pytest.mark.parametrize(
    "spec, expected",
    [
        # casts: int64 dtype code (8 bytes) + 2 bytes an entry
        ({"name": "fp16"}, _header(1, 3) + 8 + 2 * N),
        ({"name": "bf16"}, _header(1, 3) + 8 + 2 * N),
        # quant: meta [dtype, 3 dims] + (min, max) bf16 per 64 entries + packed codes
        ({"name": "int8"}, _header(1, 2, 1) + 32 + (N // 64) * 2 * 2 + N),
        ({"name": "int4"}, _header(1, 2, 1) + 32 + (N // 64) * 2 * 2 + N // 2),
        ({"name": "int2"}, _header(1, 2, 1) + 32 + (N // 64) * 2 * 2 + N // 4),
        ({"name": "int4", "symmetric": True, "block": 0}, _header(1, 1, 1) + 32 + (N // 512) * 2 + N // 2),
        # topk: k float32 values + k int16 low index bits + one int32 count per 64 Ki entries
        ({"name": "topk", "ratio": 0.05}, _header(1, 1, 1, 1) + 32 + 4 * 26215 + 4 + 2 * 26215 + 2 + 4 * (N // 65536)),
        # randk: k values, indices regenerated from (seed, step); meta gains the step
        ({"name": "randk", "ratio": 0.05}, _header(1, 1) + 40 + 4 * 26215 + 4),
        # powersgd: P [1024, r] and Q [512, r] float32
        ({"name": "powersgd", "rank": 4}, _header(1, 2, 2) + 32 + 4 * 4 * (1024 + 512)),
    ],
    ids=_id,
)
def test_payload_bytes_equal_the_formula(spec, expected):
    codec = build_codec(spec)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    payload = codec.encode(x)
    assert payload.numel() == expected
    assert codec.estimate_ratio(SHAPE, torch.float32) == pytest.approx(4 * N / expected, rel=1e-12)


# Every parameter each codec takes, drawn at random: payload_nbytes must hold for all of them.
_QUANT_PARAMS = {"block": st.sampled_from([0, 1, 3, 7, 64, 100]), "symmetric": st.booleans(),
                 "scale_dtype": st.sampled_from(["bfloat16", "float16", "float32"])}
_SPARSE_PARAMS = {"ratio": st.floats(1e-3, 1.0), "error_feedback": st.booleans()}
CODEC_PARAMS = {
    "none": {}, "fp16": {}, "bf16": {},
    "quant": {"bits": st.sampled_from([2, 4, 8]), **_QUANT_PARAMS},
    "int8": _QUANT_PARAMS, "int4": _QUANT_PARAMS, "int2": _QUANT_PARAMS,
    "topk": _SPARSE_PARAMS,
    "randk": {**_SPARSE_PARAMS, "seed": st.integers(0, 99)},
    "powersgd": {"rank": st.integers(1, 9), "factor_dtype": st.sampled_from(["float32", "bfloat16", "float16"]),
                 "seed": st.integers(0, 99)},
    "aqsgd": {"bits": st.sampled_from([2, 4, 8]), "base_bits": st.sampled_from([2, 4, 8]), **_QUANT_PARAMS,
              "cache_dtype": st.sampled_from(["float32", "bfloat16"])},
}


def test_every_registered_codec_has_its_parameters_drawn_in_the_payload_size_test():
    assert set(CODEC_PARAMS) == set(CODECS)


@st.composite
def codec_specs(draw):
    name = draw(st.sampled_from(sorted(CODEC_PARAMS)))
    return {"name": name, **{k: draw(v) for k, v in CODEC_PARAMS[name].items()}}


@settings(max_examples=300, deadline=None)
@given(spec=codec_specs(), shape=st.lists(st.integers(1, 40), min_size=1, max_size=4),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]), seed=st.integers(0, 99))
def test_payload_nbytes_is_the_length_encode_produces_for_every_codec_and_parameter(spec, shape, dtype, seed):
    codec = build_codec(spec)
    x = random_tensor(seed, tuple(shape)).to(dtype)
    nbytes = codec.payload_nbytes(tuple(shape), dtype)
    if spec["name"] == "aqsgd":  # length depends on the cache: no formula from the shape alone
        assert nbytes is None
        ids = torch.arange(shape[0])
        seen = shape[0] // 2
        codec.encode(x[:seen], ids[:seen])  # the first half of the rows is in the cache before
        assert codec.encode(x, ids).numel() == codec.payload_bytes(tuple(shape), n_new=shape[0] - seen)
        return
    for _ in range(2):  # stateful codecs (residuals, warm starts, counters): the second message too
        assert codec.encode(x).numel() == nbytes
    if spec["name"] != "none":  # `none` is the reference: ratio 1 by definition, headers left out
        assert codec.estimate_ratio(tuple(shape), dtype) == pytest.approx(
            x.numel() * x.element_size() / nbytes, rel=1e-12)


@settings(max_examples=100, deadline=None)
@given(spec=codec_specs(), shape=st.lists(st.integers(1, 40), min_size=1, max_size=4),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]), seed=st.integers(0, 99))
def test_the_pieces_a_codec_sends_join_into_its_payload(spec, shape, dtype, seed):
    whole, pieces = build_codec(spec), build_codec(spec)  # two instances: stateful codecs advance alike
    x = random_tensor(seed, tuple(shape)).to(dtype)
    ids = torch.arange(shape[0])
    for _ in range(2):
        parts = pieces.encode_parts(x, ids)
        tensors = [part_tensor(p) for p in parts]
        assert all(t.dtype == torch.uint8 and t.dim() == 1 and t.numel() == part_nbytes(p)
                   for t, p in zip(tensors, parts))
        assert torch.equal(torch.cat(tensors), whole.encode(x, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # numpy has no bfloat16: torch views then
def test_codec_none_sends_the_tensors_own_bytes_without_copying_them(dtype):
    x = torch.randn(2, 8, 16).to(dtype)
    parts = build_codec("none").encode_parts(x)
    ptr = lambda p: p.data_ptr() if isinstance(p, torch.Tensor) else p.ctypes.data if isinstance(p, np.ndarray) else 0
    assert any(ptr(p) == x.data_ptr() and part_nbytes(p) == x.numel() * x.element_size() for p in parts)


def int8_wire_ratio(shape: tuple[int, ...]) -> tuple[int, int]:
    """(bytes of the uncompressed float32 payload, bytes of the int8 payload) for a tensor of ``shape``,
    from the payload layout alone: ``none`` packs the tensor itself; ``int8`` packs an int64 meta
    ``[dtype, *shape]``, a (min, max) bfloat16 pair per block of 64 entries and one uint8 code an entry."""
    n = math.prod(shape)
    blocks = -(-n // 64)
    raw = packed_size([(torch.float32, shape)])
    int8 = packed_size([(torch.int64, (1 + len(shape),)), (torch.bfloat16, (blocks, 2)), (torch.uint8, (blocks * 64,))])
    return raw, int8


def test_int8_ratio_at_the_default_boundary_is_the_payload_layout_ratio():
    # the default run's boundary tensor: 2 sequences (batch 8 / 4 microbatches) x 64 bytes x n_embd 64
    shape = (2, 64, 64)
    raw, int8 = int8_wire_ratio(shape)
    x = real_activations(0, shape)
    assert build_codec("none").encode(x).numel() == raw
    assert build_codec("int8").encode(x).numel() == int8
    assert build_codec("int8").estimate_ratio(shape, torch.float32) == pytest.approx(4 * 8192 / int8, rel=1e-12)
    # the fixed headers keep a small tensor's ratio below the large-tensor limit 4 * 64 / (64 + 4)
    assert raw / int8 < 4 * 64 / 68
    big_raw, big_int8 = int8_wire_ratio(SHAPE)
    assert raw / int8 < big_raw / big_int8 < 4 * 64 / 68


def test_bit_packing_really_stores_int4_in_half_a_byte_and_int2_in_a_quarter():
    x = torch.randn(SHAPE)
    sizes = {b: build_codec({"name": f"int{b}"}).encode(x).numel() for b in (8, 4, 2)}
    assert sizes[8] - sizes[4] == N // 2
    assert sizes[4] - sizes[2] == N // 4


def test_none_codec_payload_is_the_raw_bytes_plus_a_small_header():
    payload = build_codec("none").encode(torch.randn(SHAPE))
    assert payload.numel() == 4 * N + _header(3)


def test_aqsgd_payload_bytes_equal_the_formula_for_mixed_new_and_seen_rows():
    codec = build_codec("aqsgd")
    x = torch.randn(8, 16, 64)
    codec.encode(x[:4], torch.arange(4))
    payload = codec.encode(x, torch.arange(8))  # rows 0-3 seen, 4-7 new
    assert payload.numel() == codec.payload_bytes((8, 16, 64), n_new=4)
    assert codec.payload_nbytes((8, 16, 64), torch.float32) is None


def test_estimate_ratio_for_a_billion_parameter_shape_needs_no_allocation():
    shape = (64, 2048, 8192)  # 1 Gi entries: 4 GiB if anyone allocated it
    for name in sorted(CODECS):
        ratio = build_codec(name).estimate_ratio(shape, torch.float32)
        assert 0.99 < ratio < 1e6, name


# --- error feedback ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["topk", "randk"])
def test_error_feedback_makes_sum_of_sent_converge_to_sum_of_inputs(name):
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(16, 64, generator=g)

    def gap(error_feedback):
        spec = {"name": name, "ratio": 0.05, "error_feedback": error_feedback}
        snd, rcv = build_codec(spec), build_codec(spec)
        sent_sum, in_sum = torch.zeros(16, 64), torch.zeros(16, 64)
        for _ in range(400):
            x = mean + 0.5 * torch.randn(16, 64, generator=g)
            sent_sum += rcv.decode(snd.encode(x))
            in_sum += x
        if error_feedback:  # the identity behind it: what is missing is exactly the carried residual
            assert torch.allclose(in_sum - sent_sum, snd.state_dict()["residual"], atol=1e-3)
        return rel_err(sent_sum, in_sum)

    assert gap(error_feedback=True) < 0.1
    assert gap(error_feedback=False) > 0.5


def test_topk_sends_the_largest_entries_of_input_plus_residual():
    codec = build_codec({"name": "topk", "ratio": 0.25})
    x = torch.tensor([[1.0, -8.0, 3.0, 0.5]])
    assert torch.equal(codec.decode(codec.encode(x)), torch.tensor([[0.0, -8.0, 0.0, 0.0]]))
    # residual now [1, 0, 3, .5]; + x = [2, -8, 6, 1] -> -8 again; residual [2, 0, 6, 1]
    codec.encode(x)
    assert torch.equal(codec.decode(codec.encode(x)), torch.tensor([[0.0, 0.0, 9.0, 0.0]]))


def test_topk_indices_survive_tensors_larger_than_one_index_chunk():
    x = torch.zeros(3 * 65536 + 5)
    hot = torch.tensor([0, 65535, 65536, 2 * 65536 + 40000, 3 * 65536 + 4])
    x[hot] = torch.arange(1.0, 6.0)
    codec = build_codec({"name": "topk", "ratio": 5 / x.numel()})
    assert torch.equal(codec.decode(codec.encode(x)), x)


def test_randk_receiver_regenerates_indices_without_any_state():
    snd = build_codec({"name": "randk", "ratio": 0.1, "seed": 7})
    x = torch.randn(1000)
    payloads = [snd.encode(x) for _ in range(3)]
    for p in reversed(payloads):  # any order, any fresh receiver
        y = build_codec({"name": "randk", "ratio": 0.1, "seed": 7}).decode(p)
        assert (y != 0).sum() == 100


# --- low rank ------------------------------------------------------------------------------------------


def test_powersgd_recovers_a_rank_r_input_exactly():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(256, 3, generator=g) @ torch.randn(3, 64, generator=g)).reshape(4, 64, 64)
    (_, y, _, _), = run({"name": "powersgd", "rank": 3}, x)
    assert rel_err(y, x) < 1e-5


def test_powersgd_warm_start_converges_to_the_best_rank_r_approximation():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(512, 64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    m = u @ torch.diag(0.8 ** torch.arange(64.0)) @ v.t()  # decaying spectrum
    s = torch.linalg.svdvals(m)
    best = float(s[4:].norm() / s.norm())
    errs = [rel_err(y, x) for x, y, _, _ in run({"name": "powersgd", "rank": 4}, m, steps=8)]
    assert errs[0] > 1.02 * best
    assert errs[-1] < 1.02 * best


@pytest.mark.parametrize("spec", [{"name": "powersgd", "rank": 4},
                                  {"name": "powersgd", "rank": 2, "factor_dtype": "bfloat16"}], ids=_id)
def test_powersgd_bound_is_the_residual_of_the_sent_subspace_and_beats_no_svd(spec):
    u_f = {"float32": 2.0**-24, "bfloat16": 2.0**-8}[spec.get("factor_dtype", "float32")]
    r = spec["rank"]
    rounding = 3 * u_f * (math.sqrt(r) + 1) + 1e-4  # what 16-bit factors can add or take away, with margin
    for x, y, bound, _ in run(spec, real_activations(), steps=3):
        err = rel_err(y, x)
        assert err <= bound <= err + rounding  # tight: the bound is the error up to rounding
        assert bound < 0.7  # far from the trivial ||x_hat - x|| <= ||x|| of any projection
        s = torch.linalg.svdvals(x.double().reshape(-1, x.shape[-1]))
        assert err >= float(s[r:].norm() / s.norm()) - rounding  # Eckart-Young: no rank-r matrix does better


def test_powersgd_bound_catches_a_receiver_that_decodes_a_damaged_or_stale_factor():
    snd = build_codec({"name": "powersgd", "rank": 4})
    x0 = real_activations(0)
    x1 = 1.01 * x0 + 0.05 * random_tensor(5)  # the next, slightly different activation
    for _ in range(3):  # a warm-started sender, as in training
        old_q = unpack(snd.encode(x0))[2].clone()
    bound = snd.error_bound(x1)
    payload = snd.encode(x1)
    assert rel_err(build_codec("powersgd").decode(payload), x1) <= bound
    _, _, q = unpack(payload)  # views into the payload
    fresh_q = q.clone()
    q[:, -1] = 0  # the weakest direction lost on the way
    dropped = rel_err(build_codec("powersgd").decode(payload), x1)
    q.copy_(old_q)  # the previous message's Q with this message's P
    stale = rel_err(build_codec("powersgd").decode(payload), x1)
    q.copy_(fresh_q)
    for wrong in (dropped, stale):
        assert bound < wrong < 1.0  # caught by the bound; a bound of 1 (any projection) would miss it


def test_powersgd_receiver_keeps_no_state_because_payload_carries_p_and_q():
    snd = build_codec({"name": "powersgd", "rank": 2})
    xs = [real_activations(i) for i in range(3)]
    payloads = [snd.encode(x) for x in xs]
    fresh = [build_codec({"name": "powersgd", "rank": 2}).decode(p) for p in payloads]
    for x, y in zip(xs, fresh):
        assert rel_err(y, x) < 1.0
    assert build_codec("powersgd").state_dict()["q"].numel() == 0


# --- AQ-SGD --------------------------------------------------------------------------------------------


def _epochs(codec_spec, epochs=3, n=32, batch=8, drift=0.02):
    g = torch.Generator().manual_seed(0)
    data = torch.randn(n, 16, 64, generator=g)
    snd, rcv = build_codec(codec_spec), build_codec(codec_spec)
    sent, errs = [], []
    for e in range(epochs):
        data = data + drift * torch.randn(data.shape, generator=g)  # the model moves a little
        total = 0
        for ids in torch.randperm(n, generator=g).split(batch):
            x = data[ids]
            payload = snd.encode(x, ids)
            y = rcv.decode(payload, ids)
            assert torch.equal(y, snd.reconstruction(payload, ids))
            total += payload.numel()
            errs.append(rel_err(y, x))
        sent.append(total)
    return snd, rcv, sent, errs


def test_aqsgd_second_epoch_sends_fewer_bytes_and_both_ends_stay_in_sync():
    snd, rcv, sent, errs = _epochs({"name": "aqsgd", "bits": 4, "base_bits": 8})
    assert sent[1] < 0.6 * sent[0] and sent[2] == sent[1]
    assert max(errs) < 0.01  # deltas are small, so 4 bits of delta beat 8 bits of value
    assert torch.equal(snd.state_dict()["ids"], rcv.state_dict()["ids"])
    assert torch.equal(snd.state_dict()["cache"], rcv.state_dict()["cache"])


def test_aqsgd_reports_cache_memory():
    snd, rcv, _, _ = _epochs({"name": "aqsgd"}, epochs=1)
    assert snd.cached_samples() == 32
    assert 32 * 16 * 64 * 4 + 32 * 8 <= snd.cache_bytes() == rcv.cache_bytes() <= 2 * (32 * 16 * 64 * 4) + 32 * 8
    half = build_codec({"name": "aqsgd", "cache_dtype": "bfloat16"})
    half.encode(torch.randn(32, 16, 64), torch.arange(32))
    assert half.cache_bytes() == 32 * 16 * 64 * 2 + 32 * 8


def test_aqsgd_receiver_detects_caches_out_of_step():
    snd, rcv = build_codec("aqsgd"), build_codec("aqsgd")
    x, ids = torch.randn(4, 8, 64), torch.arange(4)
    rcv.decode(snd.encode(x, ids), ids)
    rcv.reset()
    with pytest.raises(RuntimeError, match="out of step"):
        rcv.decode(snd.encode(x, ids), ids)


def test_aqsgd_without_sample_ids_bypasses_the_cache():
    snd, rcv = build_codec("aqsgd"), build_codec("aqsgd")
    x = torch.randn(4, 8, 64)
    payload = snd.encode(x)
    assert rel_err(rcv.decode(payload), x) < 0.01
    assert torch.equal(rcv.decode(payload), snd.reconstruction(payload))
    assert snd.cached_samples() == rcv.cached_samples() == 0


def test_aqsgd_duplicate_sample_in_one_microbatch_keeps_ends_in_sync():
    snd, rcv = build_codec("aqsgd"), build_codec("aqsgd")
    ids = torch.tensor([3, 5, 3])
    for step in range(3):
        x = torch.randn(3, 4, 64)
        rcv.decode(snd.encode(x, ids), ids)
    assert torch.equal(snd.state_dict()["cache"], rcv.state_dict()["cache"])


# --- state ---------------------------------------------------------------------------------------------

STATEFUL = [
    ({"name": "topk", "ratio": 0.1}, False),
    ({"name": "randk", "ratio": 0.1}, False),
    ({"name": "powersgd", "rank": 3}, False),
    ({"name": "aqsgd"}, True),
]


def _save_load(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("spec, ids", STATEFUL, ids=_id)
def test_state_dict_round_trip_continues_exactly_like_the_original(spec, ids):
    x = [real_activations(i) for i in range(4)]
    sample_ids = torch.arange(4) if ids else None
    a, ra = build_codec(spec), build_codec(spec)
    for t in range(2):
        ra.decode(a.encode(x[t], sample_ids), sample_ids)
    b, rb = build_codec(spec), build_codec(spec)
    b.load_state_dict(_save_load(a.state_dict()))
    rb.load_state_dict(_save_load(ra.state_dict()))
    for t in range(2, 4):
        pa, pb = a.encode(x[t], sample_ids), b.encode(x[t], sample_ids)
        assert torch.equal(pa, pb)
        assert torch.equal(ra.decode(pa, sample_ids), rb.decode(pb, sample_ids))


@pytest.mark.parametrize("spec, ids", STATEFUL, ids=_id)
def test_reset_makes_a_codec_behave_like_a_fresh_one(spec, ids):
    sample_ids = torch.arange(4) if ids else None
    used, fresh = build_codec(spec), build_codec(spec)
    for i in range(3):
        used.encode(real_activations(i), sample_ids)
    used.reset()
    assert torch.equal(used.encode(real_activations(9), sample_ids), fresh.encode(real_activations(9), sample_ids))
    assert all(v.numel() == 0 for v in build_codec(spec).state_dict().values() if v.dim())


def test_stateless_codecs_have_empty_state_and_reject_foreign_state():
    codec = build_codec("int8")
    assert codec.state_dict() == {} and not codec.stateful
    with pytest.raises(ValueError):
        codec.load_state_dict({"residual": torch.zeros(3)})


# --- configuration -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, setting",
    [
        ({"name": "topk", "ratio": 0.0}, "ratio"),
        ({"name": "topk", "ratio": 1.5}, "ratio"),
        ({"name": "randk", "ratio": -0.1}, "ratio"),
        ({"name": "topk", "ratio": "much"}, "ratio"),
        ({"name": "quant", "bits": 3}, "bits"),
        ({"name": "quant", "bits": 16}, "bits"),
        ({"name": "aqsgd", "bits": 5}, "bits"),
        ({"name": "aqsgd", "base_bits": 1}, "base_bits"),
        ({"name": "int8", "block": -1}, "block"),
        ({"name": "int8", "scale_dtype": "int8"}, "scale_dtype"),
        ({"name": "powersgd", "rank": 0}, "rank"),
        ({"name": "powersgd", "rank": -2}, "rank"),
        ({"name": "powersgd", "rank": 2.5}, "rank"),
        ({"name": "int4", "bits": 8}, "bits"),
        ({"name": "topk", "ratoi": 0.1}, "ratoi"),
        ({"name": "fp16", "ratio": 0.1}, "ratio"),
        ({"name": "int9"}, "int9"),
        ({"name": "topk", "error_feedback": "yes"}, "error_feedback"),
    ],
    ids=_id,
)
def test_bad_config_raises_config_error_naming_the_setting(spec, setting):
    with pytest.raises(ConfigError, match=setting) as info:
        build_codec(spec)
    assert info.value.args[0].count(". ") == 0  # one sentence


def _yaml_files():
    return sorted((ROOT / "configs" / "compress").glob("*/*.yaml"))


def test_every_codec_has_a_config_for_each_direction_it_serves():
    names = {(p.parent.name, p.stem) for p in _yaml_files()}
    for name, cls in CODECS.items():
        for direction in ("fwd", "bwd"):
            assert ((direction, name) in names) == (direction in cls.directions), (direction, name)


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_codec_configs_build_and_declare_their_package(path):
    from omegaconf import OmegaConf

    text = path.read_text()
    assert text.splitlines()[0] == f"# @package compress.{path.parent.name}"
    node = OmegaConf.to_container(OmegaConf.load(path))
    assert node["name"] == path.stem
    codec = build_codec(node)
    assert codec.name == path.stem
    for key in set(node) - {"name"}:  # every parameter is documented with a comment
        assert any(line.startswith(f"{key}:") and "#" in line for line in text.splitlines()), key
