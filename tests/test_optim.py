"""Per-matrix Muon: every logical matrix (Q, K, V, O; MLA's latent, rope key, k_nope, v, ...) gets its own
orthogonalised update and LR, in every arm; every parameter is in exactly one optimizer; no weight decay on
norms and the embedding; --optimizer adamw is an AdamW-only control."""

from __future__ import annotations

import copy
import math
import re
from collections import defaultdict
from typing import Any, TypeGuard, TypeVar

import pytest
import torch
from torch import nn
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

import training.optim as training_optim
from arms.registry import arm_builders
from common.errors import ConfigError
from config.cli import config_from_args
from config.settings import MUON_ADJUST_LR_FNS, ExperimentConfig
from deepseek_modeling import DeepseekV3Attention
from exp6_baseline_attention_model import MultiHeadAttention
from exp6_trainer import build_parser
from models.attention import CausalSelfAttention
from models.transformer import MoELanguageModel
from training.optim import BlockMuon, PerBlockMuon, build_optimizers, build_schedulers, collapsed_lr_scales
from training.step import forward_loss, training_step

CPU = torch.device("cpu")
ARMS = list(arm_builders())
MLA_BLOCKS = {"kv_a_proj_with_mqa.weight": ["latent", "k_rope"], "kv_b_proj.weight": ["k_nope", "v"]}
MHA_BLOCKS = {"qkv_proj.weight": ["q", "k", "v"]}  # MHA and its variants (GQA, MQA, ...): one fused QKV


Attention = TypeVar("Attention", bound=CausalSelfAttention)


def blocks_of(attention: CausalSelfAttention, cls: type[Attention]) -> TypeGuard[Attention]:
    """True when `attention` is a `cls` (MHA or one of its variants, MLA) with the blocks `cls` declares."""
    return isinstance(attention, cls) and type(attention).muon_blocks is cls.muon_blocks


def declared_blocks(model: MoELanguageModel) -> dict[str, list[str]]:
    """fused parameter (within an attention module) -> its logical blocks, as the arm's attention declares them
    (muon_blocks()); for MHA and its variants and for MLA, the blocks they must declare."""
    attention = model.attention_modules()[0]
    declared = {attr: [name for name, _ in blocks] for attr, blocks in attention.muon_blocks().items()}
    if blocks_of(attention, MultiHeadAttention):
        assert declared == MHA_BLOCKS
    if blocks_of(attention, DeepseekV3Attention):
        assert declared == MLA_BLOCKS
    return declared


def _model(config: ExperimentConfig, arm: str, **changes: object) -> tuple[MoELanguageModel, ExperimentConfig]:
    cfg = config.replace(vocab_size=50, n_heads=4, **changes)  # 4 heads: GQA's 2 K/V heads divide them
    return arm_builders()[arm](cfg), cfg


def _muon(optimizers: list[torch.optim.Optimizer]) -> BlockMuon:
    muon = optimizers[0]
    assert isinstance(muon, BlockMuon)
    return muon


@pytest.mark.parametrize("arm", ARMS)
def test_each_logical_block_gets_its_own_orthogonalised_update(config, arm):
    """After one step from fresh state, every block moved by -lr * sqrt(max(1, rows/cols)) * NS(its own grad
    rows) (Muon's first Nesterov step is along the grad; NS removes its scale), computed here with torch's
    own Muon helpers, and not by what orthogonalising the whole fused matrix would give. (A bf16 run's chain:
    bf16, as torch's; the loss itself is computed in fp32 here.)"""
    model, cfg = _model(config, arm, weight_decay=0.0, precision="bf16")
    optimizers = build_optimizers(model, cfg, CPU)
    muon = _muon(optimizers)
    group = muon.param_groups[0]
    x = torch.randint(0, 50, (4, 12))
    forward_loss(model, x, x, cfg, CPU, "fp32")[1].backward()
    before = {id(p): p.detach().clone() for p in model.parameters()}
    grads = {id(p): p.grad.detach().clone() for p in model.parameters() if p.grad is not None}
    muon.step()

    def ns_update(grad: torch.Tensor) -> torch.Tensor:
        buf = torch.zeros_like(grad).lerp_(grad, 1 - group["momentum"])  # exactly Muon's first Nesterov step
        direction = grad.lerp(buf, group["momentum"])
        orthogonal = _zeropower_via_newtonschulz(direction, group["ns_coefficients"], group["ns_steps"], group["eps"])
        return -_adjust_lr(group["lr"], "original", grad.shape) * orthogonal.float()

    fused_seen: dict[str, list[str]] = defaultdict(list)
    fused_sources: dict[int, torch.Tensor] = {}
    for block in muon.blocks:
        source = block.source
        rows = block.rows if block.rows is not None else torch.arange(source.shape[0])
        delta = (source.detach() - before[id(source)])[rows]
        grad = grads[id(source)][rows]
        assert grad.shape == block.shape
        expected = ns_update(grad)
        torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-7, msg=block.name)
        # orthogonalised: the largest singular value is about one (NS gives roughly 0.5..1.5; tiny ones lag)
        singular = torch.linalg.svdvals(expected / _adjust_lr(group["lr"], "original", grad.shape))
        assert 0.5 < singular.max() < 1.6, block.name
        if block.rows is not None:
            attr = block.name.split(".attention.")[1]
            fused_seen[attr.split("[")[0]].append(attr.split("[")[1].rstrip("]"))
            fused_sources[id(source)] = source
    for fused in fused_sources.values():  # orthogonalising the whole fused matrix instead would give another update
        delta, whole = fused.detach() - before[id(fused)], ns_update(grads[id(fused)])
        assert (delta - whole).abs().max() > 0.2 * delta.abs().max(), "a fused matrix was updated as one matrix"
    n_layers = cfg.n_layers
    assert {attr: names[:len(names) // n_layers] for attr, names in fused_seen.items()} == declared_blocks(model)


@pytest.mark.parametrize("arm", ARMS)
def test_block_rows_partition_each_fused_matrix_with_the_declared_shapes(config, arm):
    model, cfg = _model(config, arm)
    muon = _muon(build_optimizers(model, cfg, CPU))
    rows_of: dict[int, list[torch.Tensor]] = defaultdict(list)
    for block in muon.blocks:
        assert len(block.shape) == 2
        # the strided view the optimizer reads and writes the block through is exactly its rows
        view = block.row_runs().view(block.source.detach())
        rows = block.rows if block.rows is not None else torch.arange(block.source.shape[0])
        assert torch.equal(view.reshape(block.shape), block.source.detach()[rows])
        assert view.data_ptr() >= block.source.data_ptr()  # a view, not a copy: writes reach the parameter
        if block.rows is not None:
            assert block.rows.dtype == torch.int64 and block.rows.device == block.source.device
            rows_of[id(block.source)].append(block.rows)
    sources = {id(p): p for p in model.parameters()}
    assert bool(rows_of) == bool(declared_blocks(model)), "a declared fused matrix was not split, or one was split"
    for key, parts in rows_of.items():
        assert torch.equal(torch.cat(parts).sort().values, torch.arange(sources[key].shape[0]))
    head_dim = cfg.head_dim
    shapes = {block.name.split(".attention.")[1]: block.shape[0] for block in muon.blocks
              if block.name.startswith("blocks.0.attention.")}
    attention = model.attention_modules()[0]
    fused = attention.muon_blocks()  # each block has the rows its attention declares; other matrices are one block
    assert shapes == {**{f"{attr}[{name}]": len(rows) for attr, blocks in fused.items() for name, rows in blocks},
                      **{attr: p.shape[0] for attr, p in attention.named_parameters() if p.ndim == 2 and attr not in fused}}
    if blocks_of(attention, DeepseekV3Attention):
        assert shapes["kv_a_proj_with_mqa.weight[latent]"] == cfg.kv_lora_rank
        assert shapes["kv_a_proj_with_mqa.weight[k_rope]"] == cfg.qk_rope_head_dim
        assert shapes["kv_b_proj.weight[k_nope]"] == cfg.n_heads * cfg.qk_nope_head_dim
        assert shapes["kv_b_proj.weight[v]"] == cfg.n_heads * cfg.v_head_dim
    if blocks_of(attention, MultiHeadAttention):  # its K/V heads: n_heads (MHA), gqa_kv_heads (GQA), 1 (MQA)
        kv_heads = attention.n_kv_heads
        assert {"qkv_proj.weight[q]": cfg.n_heads * head_dim, "qkv_proj.weight[k]": kv_heads * head_dim,
                "qkv_proj.weight[v]": kv_heads * head_dim, "o_proj.weight": cfg.d_model}.items() <= shapes.items()


def test_mla_blocks_are_the_rows_that_make_each_part_of_k_and_v(config):
    """Zeroing a block's rows zeroes exactly its part of MLA's keys/values: the declared rows match the forward."""
    cfg = config.replace(vocab_size=50, n_heads=4)
    attention = DeepseekV3Attention(cfg)
    x = torch.randn(2, 5, cfg.d_model)
    nope = cfg.qk_nope_head_dim
    _, k0, v0 = attention.project_qkv(x)
    parts = {"k_nope": lambda k, v: k[..., :nope], "k_rope": lambda k, v: k[..., nope:], "v": lambda k, v: v}
    zeroed_by = {"kv_b_proj.weight": {"k_nope": {"k_nope"}, "v": {"v"}},
                 "kv_a_proj_with_mqa.weight": {"latent": {"k_nope", "v"}, "k_rope": {"k_rope"}}}
    for attr, blocks in attention.muon_blocks().items():
        weight = attention.get_parameter(attr)
        for block, rows in blocks:
            saved = weight.detach().clone()
            with torch.no_grad():
                weight[rows] = 0.0
                _, k, v = attention.project_qkv(x)
                weight.copy_(saved)
            for part, take in parts.items():
                if part in zeroed_by[attr][block]:
                    assert take(k, v).abs().max() == 0, (attr, block, part)
                else:
                    torch.testing.assert_close(take(k, v), take(k0, v0), msg=f"{attr}[{block}] changed {part}")


@pytest.mark.parametrize("arm", ARMS)
@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_every_parameter_is_in_exactly_one_optimizer_and_norms_are_not_decayed(config, arm, optimizer):
    model, cfg = _model(config, arm, optimizer=optimizer)
    optimizers = build_optimizers(model, cfg, CPU)
    names = {id(p): n for n, p in model.named_parameters()}
    matrices = {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2}
    owners: dict[str, int] = defaultdict(int)
    decay: dict[str, float] = {}
    muon_sources: set[str] = set()
    for opt in optimizers:
        if isinstance(opt, BlockMuon):
            assert opt.param_groups[0]["weight_decay"] == cfg.weight_decay > 0
            for source_id in {id(block.source) for block in opt.blocks}:
                owners[names[source_id]] += 1
                muon_sources.add(names[source_id])
            continue
        assert isinstance(opt, torch.optim.AdamW)
        for group in opt.param_groups:
            for p in group["params"]:
                owners[names[id(p)]] += 1
                decay[names[id(p)]] = group["weight_decay"]
    assert dict(owners) == {n: 1 for n in names.values()}
    no_decay = {n for n in names.values() if n not in matrices}
    assert "embed.weight" in no_decay and "norm.weight" in no_decay
    assert any("attn_norm" in n for n in no_decay) and all(p.ndim == 1 for n, p in model.named_parameters()
                                                           if n in no_decay and n != "embed.weight")
    if arm == "deepseek":
        assert any("kv_a_layernorm" in n for n in no_decay) and any("q_a_layernorm" in n for n in no_decay)
    assert all(decay[n] == 0.0 for n in no_decay)
    if optimizer == "muon":
        assert len(optimizers) == 2 and muon_sources == matrices
    else:
        assert len(optimizers) == 1 and not muon_sources
        assert all(decay[n] == cfg.weight_decay for n in matrices)


def test_block_muon_keeps_momentum_and_follows_the_schedule(config):
    model, cfg = _model(config, "deepseek")
    optimizers = build_optimizers(model, cfg, CPU)
    schedulers = build_schedulers(optimizers, cfg)
    muon = _muon(optimizers)
    x = torch.randint(0, 50, (2, 8))
    for step in range(3):
        training_step(model, optimizers, schedulers, x, x, cfg, CPU, "fp32")
        for block in muon.blocks:  # one momentum buffer per source matrix: each block's is its rows
            assert muon.state[block.source]["momentum_buffer"].abs().sum() > 0
    fused = [block.source for block in muon.blocks if block.rows is not None]
    forward_loss(model, x, x, cfg, CPU, "fp32")[1].backward()
    muon.zero_grad()
    assert all(p.grad is None for p in fused)  # the trainer's zero_grad reaches the fused weights
    assert muon.param_groups[0]["lr"] == pytest.approx(cfg.muon_lr * schedulers[0].lr_lambdas[0](3))


@pytest.mark.parametrize("arm,adjust_lr_fn", [(arm, "original") for arm in ARMS]
                         + [("deepseek", rule) for rule in MUON_ADJUST_LR_FNS if rule != "original"])
def test_batched_muon_equals_per_block_torch_muon_over_steps(config, arm, adjust_lr_fn):
    """BlockMuon (momentum and decay by foreach, one batched Newton-Schulz chain per shape) gives every block
    the update torch.optim.Muon gives it on its own (PerBlockMuon), step after step: the same gradients fed to
    both, with the LR schedule, weight decay and both LR rules, and parameters skipped when they have no
    gradient. The two differ only in bf16 rounding inside Newton-Schulz (a bf16 run's chain, as torch's)."""
    model, cfg = _model(config, arm, max_steps=6, muon_adjust_lr_fn=adjust_lr_fn, precision="bf16")
    reference = copy.deepcopy(model)
    batched, per_block = build_optimizers(model, cfg, CPU), build_optimizers(reference, cfg, CPU, reference=True)
    assert isinstance(batched[0], BlockMuon) and isinstance(per_block[0], PerBlockMuon)
    schedulers = [build_schedulers(batched, cfg), build_schedulers(per_block, cfg)]
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    params, reference_params = dict(model.named_parameters()), dict(reference.named_parameters())
    skipped = {"blocks.0.moe.experts.1.up.weight", next(n for n in params if n.startswith("blocks.1.attention."))}
    lrs = []
    for step in range(cfg.max_steps):
        x = torch.randint(0, 50, (4, 12))
        for optimizer in batched:
            optimizer.zero_grad()
        forward_loss(model, x, x, cfg, CPU, "fp32")[1].backward()
        for name, param in params.items():
            if step in (2, 4) and name in skipped:  # e.g. an expert no token reached: Muon leaves it alone
                param.grad = None
            reference_params[name].grad = None if param.grad is None else param.grad.clone()
        lrs.append(batched[0].param_groups[0]["lr"])
        before = {name: (params[name].detach().clone(), reference_params[name].detach().clone()) for name in skipped}
        for optimizers, scheduler_pair in zip((batched, per_block), schedulers):
            for optimizer in optimizers:
                optimizer.step()
            for scheduler in scheduler_pair:
                scheduler.step()
        if step in (2, 4):  # the second time, BlockMuon reuses the plan it made for these gradients
            for name in skipped:
                assert torch.equal(params[name], before[name][0]), f"{name} moved without a gradient"
                assert torch.equal(reference_params[name], before[name][1]), f"{name} moved without a gradient"
    assert len(set(lrs)) == cfg.max_steps - 1  # the schedule moved the LR (warmup reaches the peak, which the cosine starts at)
    for name, param in params.items():
        moved, moved_reference = param.detach() - start[name], reference_params[name].detach() - start[name]
        assert moved.abs().max() > 0, name
        torch.testing.assert_close(moved, moved_reference, rtol=2e-2, atol=2e-2 * moved_reference.abs().max().item(),
                                   msg=name)


def test_block_muon_makes_one_plan_per_set_of_missing_gradients_and_keeps_the_last_few(config, monkeypatch):
    """A step where some matrices have no gradient (the mask loop's unreached experts) runs on a plan of the
    others: made the first time that set occurs, then reused (no new buffers, no host copy of the LR scales),
    and only the SUBSET_PLANS_KEPT sets used last are kept."""
    model, cfg = _model(config, "baseline")
    muon = _muon(build_optimizers(model, cfg, CPU))
    made: list[int] = []  # the size of each plan made
    real_plan = muon._plan

    def counted_plan(sources: list[nn.Parameter]) -> Any:
        made.append(len(sources))
        return real_plan(sources)

    monkeypatch.setattr(muon, "_plan", counted_plan)
    experts = [p for name, p in model.named_parameters() if ".experts." in name]

    def step_without(missing: list[nn.Parameter]) -> None:
        for p in muon.param_groups[0]["params"]:
            p.grad = None if any(p is m for m in missing) else torch.randn_like(p)
        muon.step()

    step_without([])  # every gradient present: the full plan, made in __init__
    assert made == []
    for missing in ([experts[0]], [experts[0]], [experts[1], experts[2]], [experts[0]]):
        step_without(missing)
    assert made == [len(muon._full_plan.sources) - 1, len(muon._full_plan.sources) - 2]  # two sets, one plan each
    for i in range(training_optim.SUBSET_PLANS_KEPT):  # as many other sets: the first one is dropped
        step_without([experts[3 + i]])
    assert len(muon._subset_plans) == training_optim.SUBSET_PLANS_KEPT
    made.clear()
    step_without([experts[0]])
    assert made == [len(muon._full_plan.sources) - 1]


@pytest.mark.parametrize("rule", MUON_ADJUST_LR_FNS)
def test_each_blocks_lr_factor_is_muons_rule_of_its_own_shape(rule):
    """What the JSON records per arm (muon_lr_scales): at the full sizes, under the default rule, MLA's q_b_proj
    gets x1.73 and its k_nope and v blocks x1.41 while every MHA/GQA/MQA attention block gets x1; under
    match_rms_adamw the factor is 0.2 * sqrt(max(rows, cols)) for every block."""
    cfg = ExperimentConfig(vocab_size=64, muon_adjust_lr_fn=rule)
    for arm in ARMS:
        model = arm_builders()[arm](cfg)
        muon = _muon(build_optimizers(model, cfg, CPU))
        scales = collapsed_lr_scales(muon.lr_scales())
        assert len(scales) == len({re.sub(r"(blocks|experts)\.\d+\.", "", b.name) for b in muon.blocks})
        for block in muon.blocks:
            rows, cols = block.shape
            expected = math.sqrt(max(1, rows / cols)) if rule == "original" else 0.2 * math.sqrt(max(rows, cols))
            assert muon.lr_scales()[block.name] == pytest.approx(expected), block.name
        if rule == "original":
            attention = {name.split("attention.")[1]: scale for name, scale in scales.items() if ".attention." in name}
            module = model.attention_modules()[0]
            if blocks_of(module, DeepseekV3Attention):
                assert attention["q_b_proj.weight"] == pytest.approx(3 ** 0.5)
                assert attention["kv_b_proj.weight[k_nope]"] == attention["kv_b_proj.weight[v]"] == pytest.approx(2 ** 0.5)
                assert sum(scale != 1 for scale in attention.values()) == 3
            if blocks_of(module, MultiHeadAttention):
                assert set(attention.values()) == {1.0}
            assert scales["blocks.*.moe.experts.*.up.weight"] == 2.0


def test_optimizer_flag_and_validation():
    config, _ = config_from_args(build_parser().parse_args(["--optimizer", "adamw"]), cuda_available=False)
    assert config.optimizer == "adamw"
    assert config_from_args(build_parser().parse_args([]), cuda_available=False)[0].optimizer == "muon"
    with pytest.raises(ConfigError, match="--optimizer"):
        ExperimentConfig(optimizer="sgd").validate()
    args = build_parser().parse_args(["--muon-adjust-lr-fn", "match_rms_adamw"])
    assert config_from_args(args, cuda_available=False)[0].muon_adjust_lr_fn == "match_rms_adamw"
    assert config_from_args(build_parser().parse_args([]), cuda_available=False)[0].muon_adjust_lr_fn == "original"
    with pytest.raises(ConfigError, match="--muon-adjust-lr-fn"):
        ExperimentConfig(muon_adjust_lr_fn="sqrt").validate()


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32), ("auto", torch.float32)])
def test_newton_schulz_runs_in_the_runs_precision(config, precision, dtype):
    """A bf16 run orthogonalises in bf16, as torch.optim.Muon does; an fp32 run (the CPU preset's) in fp32, where
    it is also closer to the exact orthogonalisation (float64) than bf16 is."""
    model, cfg = _model(config, "baseline", precision=precision)
    muon = _muon(build_optimizers(model, cfg, CPU))
    assert muon.ns_dtype == dtype and all(group.stacked.dtype == dtype for group in muon._full_plan.groups)
    update = torch.randn(3, 16, 48, generator=torch.Generator().manual_seed(0))
    exact = training_optim._orthogonalise(update.double().clone(), (3.4445, -4.7750, 2.0315), 5, 1e-7)
    errors = {kind: (training_optim._orthogonalise(update.to(kind).clone(), (3.4445, -4.7750, 2.0315), 5, 1e-7).double()
                     - exact).abs().max().item() for kind in (torch.float32, torch.bfloat16)}
    assert errors[torch.float32] < errors[torch.bfloat16] / 10
