"""The modern block (RMSNorm, rotary positions, QK-norm, GELU / squared-ReLU / SwiGLU MLP) and Muon.

Pipelined gradients equal one process's and torch.distributed.pipelining's; FLOPs by formula equal
flop_counter's; Muon through lowbw takes the step one process takes, and a crashed Muon run resumes
bit for bit.
"""

from __future__ import annotations

import io
import json

import pytest
import torch

from lowbw.config import ModelConfig, TrainConfig
from lowbw.data.corpus import Corpus
from lowbw.errors import ConfigError
from lowbw.launch import RunFailed
from lowbw.models.boundary_stats import block_outputs, effective_rank, max_over_rms
from lowbw.models.flops import count_stage_flops, flop_formula, flop_parts, n_params, stage_flops
from lowbw.models.gpt import GPT, GPTStage
from lowbw.optim import MuonWithAdamW, build_optimizer
from lowbw.pipeline.partition import partition_layers
from lowbw.testing.gradcheck import Scenario, pipeline_grads, reference_grads
from lowbw.testing.torch_peer import torch_grads
from lowbw.train import run
from lowbw.validation import validate

VARIANTS = [{"arch": "modern"}, {"arch": "modern", "mlp": "gelu", "qk_norm": False},
            {"arch": "modern", "mlp": "swiglu"}, {"arch": "gpt2"}]


# ---- FLOPs and parameters ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS + [{"arch": "modern", "mlp": "relu2", "qk_norm": False}])
def test_flop_formula_equals_flop_counter_for_each_block(variant):
    cfg = ModelConfig(n_layer=2, n_embd=64, n_head=4, block_size=32, **variant)
    assert flop_parts(cfg, 3) == flop_formula(cfg, 3)


def test_flop_formula_equals_flop_counter_on_real_modern_stages():
    """What lowbw-train counts on a meta copy of each real stage is what the simulator's formula says."""
    cfg = ModelConfig(n_layer=3, n_embd=48, n_head=4, block_size=16, arch="modern", mlp="swiglu")
    mb, T, d = 2, 16, 48
    per_stage, _ = stage_flops(cfg, 2, mb, [1, 2])
    for s, (a, b) in enumerate([(0, 1), (1, 3)]):
        stage = GPTStage(cfg, a, b, s == 0, s == 1, seed=0)
        x = torch.zeros(mb, T, dtype=torch.long) if s == 0 else torch.randn(mb, T, d)
        y = torch.zeros(mb, T, dtype=torch.long) if s == 1 else None
        assert count_stage_flops(stage, x, y) == pytest.approx(per_stage[s], rel=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_n_params_counts_every_parameter(variant):
    cfg = ModelConfig(n_layer=3, n_embd=48, n_head=4, block_size=16, **variant)
    model = GPT(cfg, partition_layers(3, 2, None), seed=0)
    assert sum(q.numel() for q in model.parameters()) == n_params(cfg)


def test_the_modern_model_has_no_position_table_and_no_biases():
    model = GPT(ModelConfig(arch="modern"), partition_layers(4, 2, None), seed=0)
    names = [n for n, _ in model.named_parameters()]
    assert not any("wpe" in n or n.endswith("bias") for n in names)
    assert any("q_norm" in n for n in names)


def test_rotary_positions_make_attention_depend_on_order():
    """Without a position table, the first stage's output must still change when tokens are permuted."""
    torch.manual_seed(0)
    stage = GPTStage(ModelConfig(arch="modern", n_layer=1), 0, 1, True, False, seed=0)
    ids = torch.randint(0, 256, (1, 16))
    perm = torch.randperm(16)
    out, out_perm = stage(ids), stage(ids[:, perm])
    assert not torch.allclose(out[:, perm], out_perm, atol=1e-4)


# ---- gradients -----------------------------------------------------------------------------------

MODERN = {"arch": "modern"}
SCENARIOS = [
    Scenario("gpipe", stages=2, n_layer=3, model_args=MODERN),
    Scenario("1f1b", stages=2, n_layer=4, partition=[3, 1], model_args={**MODERN, "mlp": "swiglu"}),
    Scenario("gpipe", stages=3, n_layer=4, partition=[1, 2, 1], model_args={**MODERN, "mlp": "gelu", "qk_norm": False}),
    Scenario("1f1b", stages=3, n_layer=3, model_args=MODERN),
    Scenario("1f1b", stages=3, n_layer=5, partition=[2, 2, 1], model_args={**MODERN, "mlp": "swiglu"}, microbatches=2),
    Scenario("gpipe", stages=3, n_layer=3, model_args={**MODERN, "mlp": "swiglu", "qk_norm": False}),
    Scenario("1f1b", stages=2, n_layer=3, model_args={"arch": "gpt2"}),  # the 2019 block, whatever the default
]
TORCH_PEER = [0, 1, 6]  # the two-stage scenarios


@pytest.fixture(scope="module")
def pipelined():
    torch.set_num_threads(1)
    return pipeline_grads(SCENARIOS)


def _assert_same(sc, got, want):
    assert got.keys() == want.keys(), sc
    for name in want:
        assert got[name] is not None and want[name] is not None, (sc, name)
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{sc} {name}: {m}")
    assert all(float(g.abs().sum()) > 0 for g in want.values()), sc  # every parameter really learns


def test_pipelined_gradients_of_the_modern_block_equal_single_process_gradients(pipelined):
    for sc, got in zip(SCENARIOS, pipelined):
        _assert_same(sc, got, reference_grads(sc))


def test_pipelined_gradients_of_the_modern_block_equal_torch_pipelining(pipelined):
    peer = torch_grads([SCENARIOS[i] for i in TORCH_PEER])
    for i, want in zip(TORCH_PEER, peer):
        _assert_same(SCENARIOS[i], pipelined[i], want)


# ---- the optimizer -------------------------------------------------------------------------------


def _model_and_muon(seed=0):
    cfg = ModelConfig(arch="modern", mlp="swiglu", n_layer=2, n_embd=32, n_head=2, block_size=16)
    model = GPT(cfg, partition_layers(2, 2, None), seed=seed)
    return model, build_optimizer(TrainConfig(optimizer="muon"), list(model.stages))


def test_muon_takes_the_blocks_matrices_and_adamw_everything_else():
    model, opt = _model_and_muon()
    muon = {id(q) for g in opt.parts["muon"].param_groups for q in g["params"]}
    adamw = {id(q) for g in opt.parts["adamw"].param_groups for q in g["params"]}
    for name, q in model.named_parameters():
        in_block_matrix = ".blocks." in name and q.ndim == 2
        assert (id(q) in muon, id(q) in adamw) == (in_block_matrix, not in_block_matrix), name
    assert isinstance(opt.parts["muon"], torch.optim.Muon) and isinstance(opt.parts["adamw"], torch.optim.AdamW)
    assert len(opt.param_groups) == 2  # the parts' own groups: an lr scheduler reaches both


def _train(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 256, (2, 16), generator=gen)
        opt.zero_grad(set_to_none=True)
        GPTStage.loss(model(x), torch.roll(x, -1, 1)).backward()
        opt.step()


def test_muon_state_survives_a_checkpoint_round_trip_bit_for_bit():
    model, opt = _model_and_muon()
    _train(model, opt, 2, seed=1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)  # as lowbw.checkpoint saves
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # ... and reads
    assert saved["optimizer"]["muon"]["state"]  # momentum buffers are in it
    twin, twin_opt = _model_and_muon(seed=99)  # other weights: everything must come from the file
    twin.load_state_dict(saved["model"])
    twin_opt.load_state_dict(saved["optimizer"])
    _train(model, opt, 2, seed=2)
    _train(twin, twin_opt, 2, seed=2)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name


def test_an_adamw_checkpoint_does_not_load_into_muon():
    model, opt = _model_and_muon()
    adamw = build_optimizer(TrainConfig(optimizer="adamw"), list(model.stages))
    with pytest.raises(ValueError, match="train.optimizer changed"):
        opt.load_state_dict({"state": {}, "param_groups": adamw.state_dict()["param_groups"]})
    assert isinstance(opt, MuonWithAdamW) and isinstance(opt, torch.optim.Optimizer)


# ---- Muon through lowbw ------------------------------------------------------------------------

MUON_RUN = ["model.arch=modern", "model.n_layer=3", "model.n_embd=32", "model.n_head=2", "model.block_size=16",
            "progress=false", "pipeline.stages=2", "schedule=1f1b", "train.optimizer=muon", "train.weight_decay=0.01",
            "train.steps=4", "train.eval_batches=1", "clock=virtual", "clock.durations=flops", "net=home",
            "net.jitter_ms=5", "checkpoint.every=1", "checkpoint.keep=4"]


@pytest.fixture(scope="module")
def muon_run(tmp_path_factory):
    from lowbw.train import compose

    d = tmp_path_factory.mktemp("muon")
    cfg = compose(MUON_RUN)
    return cfg, run(cfg, d), d


def test_muon_steps_through_lowbw_equal_the_same_optimizer_in_one_process(muon_run):
    cfg, summary, d = muon_run
    assert summary["status"] == "completed"
    ranges = partition_layers(cfg.model.n_layer, 2, None)
    model = GPT(cfg.model, ranges, cfg.seed)
    opt = build_optimizer(cfg.train, list(model.stages))
    corpus = Corpus(cfg.data.path, cfg.model.block_size, cfg.data.val_fraction, cfg.seed)
    m = cfg.pipeline.microbatches
    losses = [json.loads(line)["loss"] for line in open(d / "metrics.jsonl")]
    for step in range(cfg.train.steps):
        batch = corpus.train_batch(step, cfg.train.batch_size)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for x, y in zip(batch.x.chunk(m), batch.y.chunk(m)):  # the microbatches the executor cuts
            loss = GPTStage.loss(model(x), y)
            total += float(loss.detach())
            (loss / m).backward()
        opt.step()
        assert total / m == pytest.approx(losses[step], rel=1e-6)
        for s, stage in enumerate(model.stages):
            saved = torch.load(d / "checkpoints" / f"rank{s}" / f"step{step:08d}.pt", weights_only=True)
            for name, want in stage.state_dict().items():
                torch.testing.assert_close(saved["model"][str(s)][name], want, rtol=0, atol=0,
                                           msg=lambda msg: f"step {step} stage {s} {name}: {msg}")


def test_a_crashed_muon_run_resumes_bit_for_bit(compose, muon_run, tmp_path):
    _, whole, whole_dir = muon_run
    with pytest.raises(RunFailed):
        run(compose(MUON_RUN + ["faults.crash_rank=0", "faults.crash_step=3"]), tmp_path)
    resumed = run(compose(MUON_RUN + ["resume=true"]), tmp_path)  # after step 2: reruns step 3
    assert resumed["status"] == "completed"
    a = [json.loads(line) for line in open(whole_dir / "metrics.jsonl")]
    b = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in b] == list(range(4))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["step_time_s"] for r in a] == [r["step_time_s"] for r in b]
    assert resumed["val_loss"] == whole["val_loss"]
    for rank in (0, 1):  # the weights and both optimizers' states after the last step
        x = torch.load(whole_dir / "checkpoints" / f"rank{rank}" / "step00000003.pt", weights_only=True)
        y = torch.load(tmp_path / "checkpoints" / f"rank{rank}" / "step00000003.pt", weights_only=True)
        for name, t in x["model"][str(rank)].items():
            assert torch.equal(t, y["model"][str(rank)][name]), name
        for part in ("muon", "adamw"):
            for i, st in x["optimizer"][part]["state"].items():
                for k, t in st.items():
                    assert torch.equal(t, y["optimizer"][part]["state"][i][k]), (rank, part, i, k)


# ---- bad settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,match", [
    (["model.arch=llama"], "model.arch='llama' is not a block family; use one of gpt2, modern"),
    (["model.mlp=tanh"], "model.mlp='tanh': use one of gelu, relu2, swiglu"),
    (["model.arch=gpt2", "model.mlp=swiglu"], "model.mlp=swiglu is a setting of the modern block"),
    (["model.arch=gpt2", "model.qk_norm=true"], "model.qk_norm=true is a setting of the modern block"),
    (["model.n_embd=60", "model.n_head=4"], "= 15 is odd, but rotary positions"),
    (["train.optimizer=lamb"], "train.optimizer='lamb': use one of adamw, muon, sgd"),
    (["train.optimizer=muon", "train.muon_momentum=1.0"], "train.muon_momentum=1.0 must be a number in \\[0, 1\\)"),
    (["train.optimizer=muon", "train.muon_lr=0"], "train.muon_lr=0.0 must be a number in \\(0, inf\\)"),
    (["train.weight_decay=-0.1"], "train.weight_decay=-0.1 must be a number in \\[0, inf\\)"),
])
def test_bad_model_and_optimizer_settings_are_rejected_naming_the_setting(compose, overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose(overrides))


def test_the_gpt2_block_accepts_its_own_gelu_and_no_qk_norm(compose):
    validate(compose(["model.arch=gpt2", "model.mlp=gelu", "model.qk_norm=false"]))


# ---- boundary statistics -------------------------------------------------------------------------


def test_effective_rank_and_max_over_rms_on_matrices_whose_values_are_known():
    q, _ = torch.linalg.qr(torch.randn(64, 16, dtype=torch.float64))
    assert effective_rank(q) == pytest.approx(16.0, rel=1e-9)  # 16 equal singular values
    u, v = torch.randn(64, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    assert effective_rank(torch.outer(u, v)) == pytest.approx(1.0, abs=1e-9)
    assert max_over_rms(torch.full((8, 4), -3.0)) == pytest.approx(1.0)
    x = torch.zeros(100, 4)
    x[0, 0] = 1.0
    assert max_over_rms(x) == pytest.approx(20.0)  # RMS = 1/sqrt(400)


def test_block_outputs_are_what_a_boundary_sends_and_receives():
    """After the last block of stage 0: its output (sent forward) and the loss gradient (sent back)."""
    cfg = ModelConfig(arch="modern", n_layer=3, n_embd=32, n_head=2, block_size=16)
    model = GPT(cfg, [(0, 2), (2, 3)], seed=0)
    b = Corpus(None, 16, 0.1, 0).val_batch(0, 4)
    acts, grads = block_outputs(model, [(b.x, b.y)])
    assert [a.shape for a in acts] == [torch.Size([64, 32])] * 3
    sent = model.stages[0](b.x)
    received, = torch.autograd.grad(GPTStage.loss(model.stages[1](sent), b.y), sent)
    torch.testing.assert_close(acts[1], sent.detach().reshape(64, 32), rtol=0, atol=0)
    torch.testing.assert_close(grads[1], received.reshape(64, 32), rtol=1e-6, atol=1e-9)
    assert all(q.grad is None for q in model.parameters())  # leaves the model as it found it
