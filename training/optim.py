"""Optimisers and learning-rate schedule: Muon on the blocks' logical matrices, batched by shape, AdamW for the rest.

Muon orthogonalises each matrix it is given and scales its LR by a rule of the matrix's shape
(`config.muon_adjust_lr_fn`, torch.optim.Muon's `adjust_lr_fn`: "original", sqrt(max(1, rows/cols)); or
"match_rms_adamw", 0.2 * sqrt(max(rows, cols))). The arms pack their attention weights differently (the
baseline's fused `qkv_proj`; MLA's `kv_a_proj_with_mqa` = [latent | rope key] and `kv_b_proj` = per head
[k_nope | v]), so handing Muon the raw parameters would treat a fused Q/K/V as one matrix in one arm and
separate matrices in another. `BlockMuon` instead runs Muon on every *logical* matrix (each attention module
declares them in `muon_blocks()`): Q, K, V, O; MLA's q_a, q_b, latent, rope key, k_nope, v, o; the router and
every expert matrix. Every block gets the same update rule and the same LR rule. The model's parameters and
its fused forward pass are unchanged.

torch.optim.Muon has no foreach path: it runs one Newton-Schulz chain of about 22 operators per matrix, so
the 63-72 blocks of a model cost about 2,000 operator launches per step, more host time than the GPU work of a
step at these sizes. `BlockMuon` computes the same update in 93-180 (tests/test_step_ops.py): momentum and
weight decay with foreach operators over the model's matrices, and one batched Newton-Schulz chain
(bmm/baddbmm, in bf16 as Muon in a bf16 run, in fp32 in an fp32 run) per group of blocks that share a shape (a tall block is transposed first, as Muon does,
so the experts' up and down matrices form one group), gathered and written back through views and buffers
made once. `PerBlockMuon`, torch.optim.Muon run block by block, is kept as the reference it is tested
against (tests/test_optim.py) and the benchmark's "before batching" rows.

Weight decay: Muon's matrices decay with config.weight_decay; the AdamW parameters (the embedding, which
is also the tied output head, every RMSNorm gain, including MLA's two latent norms, and any bias) get
weight_decay=0, in every arm. `--optimizer adamw` (config.optimizer) is an AdamW-only control run with
the same two decay groups. AdamW runs its fused kernel (on CUDA and on the CPU).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Sequence, overload

import torch
from torch import nn

from common.hardware import FP32, exit_if_torch_too_old, resolve_precision
from config.settings import ExperimentConfig
from models.attention import CausalSelfAttention

exit_if_torch_too_old()  # BlockMuon subclasses torch.optim.Muon (torch 2.9+): below, an older torch could not import

# BlockMuon's plans for subsets of its matrices (a step where some have no gradient: the mask-loop MoE's unreached
# experts) kept for reuse; each holds buffers the size of its matrices, so only the most recently used few.
SUBSET_PLANS_KEPT = 4


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(2-D weight matrices inside the blocks -> Muon, everything else -> AdamW without weight decay)."""
    muon: list[nn.Parameter] = []
    adamw: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        (muon if name.startswith("blocks.") and param.ndim == 2 else adamw).append(param)
    return muon, adamw


@dataclass(frozen=True)
class RowRuns:
    """Rows of a matrix that form `runs` equal runs of `length` consecutive rows, one run every `period` rows,
    each starting `start` rows into its period: e.g. MLA's k_nope rows of kv_b_proj (one run per head). Such
    rows are a strided view of the matrix, so a block can be read and written in place."""

    runs: int
    period: int
    start: int
    length: int

    @classmethod
    def of(cls, rows: list[int], total: int) -> "RowRuns":
        runs = 1 + sum(1 for a, b in zip(rows, rows[1:]) if b != a + 1)
        length = len(rows) // runs
        period = total // runs
        layout = cls(runs, period, rows[0] if rows else 0, length)
        if not rows or total % runs or layout.rows() != rows:
            raise ValueError(f"rows {rows[:4]}... are not equal runs spaced evenly over {total} rows")
        return layout

    def rows(self) -> list[int]:
        return [run * self.period + self.start + i for run in range(self.runs) for i in range(self.length)]

    def view(self, matrix: torch.Tensor) -> torch.Tensor:
        """These rows of `matrix` as a view: (rows, cols) for one run, (runs, length, cols) for several."""
        if self.runs == 1:
            return matrix if self.length == matrix.shape[0] else matrix[self.start:self.start + self.length]
        return matrix.view(self.runs, self.period, matrix.shape[1])[:, self.start:self.start + self.length]


@dataclass(frozen=True)
class MatrixBlock:
    """One logical matrix: the rows `rows` of the model parameter `source` (all of it when rows is None)."""

    name: str  # e.g. "blocks.0.attention.qkv_proj.weight[k]"; a whole matrix is named as its parameter
    source: nn.Parameter
    rows: torch.Tensor | None  # int64 row indices on source's device; None: the whole matrix

    @property
    def shape(self) -> torch.Size:
        if self.rows is None:
            return self.source.shape
        return torch.Size((self.rows.numel(), *self.source.shape[1:]))

    def row_runs(self) -> RowRuns:
        """The block's rows as a strided layout of its source (reads `rows` back to the host: build time only)."""
        total = self.source.shape[0]
        rows = list(range(total)) if self.rows is None else [int(r) for r in self.rows.tolist()]
        return RowRuns.of(rows, total)


def matrix_blocks(model: nn.Module) -> list[MatrixBlock]:
    """Every Muon matrix of `model` (see split_parameters) split into its logical blocks, as each attention
    module declares them in muon_blocks(); a matrix no module splits is one block."""
    declared: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            for attr, blocks in module.muon_blocks().items():
                declared[id(module.get_parameter(attr))] = blocks
    matrices = {id(p) for p in split_parameters(model)[0]}
    result: list[MatrixBlock] = []
    for name, param in model.named_parameters():
        if id(param) not in matrices:
            continue
        blocks = declared.pop(id(param), [])
        if not blocks:
            result.append(MatrixBlock(name, param, None))
            continue
        if sum(rows.numel() for _, rows in blocks) != param.shape[0]:
            raise ValueError(f"{name}: the blocks {[b for b, _ in blocks]} do not cover its {param.shape[0]} rows")
        result.extend(MatrixBlock(f"{name}[{block}]", param, rows.to(param.device)) for block, rows in blocks)
    if declared:
        raise ValueError("muon_blocks() names a parameter that is not a Muon matrix")
    return result


def lr_scale(shape: torch.Size, adjust_lr_fn: str | None) -> float:
    """The factor torch.optim.Muon multiplies a matrix's LR by (its own `_adjust_lr`, so both rules are Muon's)."""
    from torch.optim._muon import _adjust_lr  # here: at the top, a torch without Muon would fail before the check

    return _adjust_lr(1.0, adjust_lr_fn, shape)


def collapsed_lr_scales(scales: dict[str, float]) -> dict[str, float]:
    """Block name -> LR factor, with the layer and expert numbers replaced by * where every layer (expert) has
    the same factor: "blocks.*.attention.kv_b_proj.weight[k_nope]": 1.414..."""
    collapsed: dict[str, set[float]] = defaultdict(set)
    for name, scale in scales.items():
        collapsed[re.sub(r"(blocks|experts)\.\d+\.", r"\1.*.", name)].add(scale)
    if any(len(values) > 1 for values in collapsed.values()):
        return dict(scales)
    return {name: values.pop() for name, values in collapsed.items()}


# ------------------------------------------------------------------------------------------ batched Muon

@dataclass
class _SubBatch:
    """Blocks of one group that share a layout (orientation and runs of rows): gathered into the group's
    buffer with one operator and written back with two."""

    updates: list[torch.Tensor]  # each block's view of its source's update buffer (read)
    params: list[torch.Tensor]  # each block's view of its source parameter (written)
    into: torch.Tensor  # where torch.stack(updates) lands: this sub-batch's rows of the group's chain buffer
    start: int  # its first row in the group
    lr_scales: torch.Tensor  # (blocks, 1, 1) float32: each block's LR factor
    deltas_oriented: torch.Tensor  # the blocks' scaled updates as the group orients them (written by one mul)
    deltas: list[torch.Tensor]  # the same per block, laid out as `params` (contiguous)


@dataclass
class _Group:
    """Blocks whose matrix, transposed when tall, has one shape: one batched Newton-Schulz chain."""

    sub_batches: list[_SubBatch]
    stacked: torch.Tensor  # (blocks, rows, cols) in the chain's dtype, rows <= cols: the chain's input


@dataclass
class _Plan:
    """What one step touches, for a set of parameters that have gradients; its views and buffers are made once."""

    sources: list[nn.Parameter]
    weights: list[torch.Tensor]  # the sources detached: what the foreach operators update in place
    updates: list[torch.Tensor]  # scratch: this step's (Nesterov) update of each source
    groups: list[_Group]


def _orthogonalise(x: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                   eps: float) -> torch.Tensor:
    """torch.optim.Muon's Newton-Schulz iteration on a batch of wide (rows <= cols) matrices at once: each
    matrix normalised by its own Frobenius norm (in place), then the same quintic steps through bmm/baddbmm."""
    a, b, c = ns_coefficients
    x = x.div_(torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp_(min=eps))
    for _ in range(ns_steps):
        gram = torch.bmm(x, x.mT)
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, gram_update, x, beta=a)
    return x


def _muon_step(plan: _Plan, grads: list[torch.Tensor], buffers: list[torch.Tensor], lr: float | torch.Tensor,
               weight_decay: float, momentum: float, nesterov: bool, ns_coefficients: tuple[float, float, float],
               ns_steps: int, eps: float) -> None:
    """One Muon step over the plan's blocks (`buffers`: the sources' momentum): the arithmetic of
    torch.optim.Muon, per block, batched."""
    torch._foreach_lerp_(buffers, grads, 1 - momentum)
    if nesterov:  # grad.lerp(buf, momentum), as Muon computes it
        torch._foreach_copy_(plan.updates, grads)
        torch._foreach_lerp_(plan.updates, buffers, momentum)
    else:
        torch._foreach_copy_(plan.updates, buffers)
    if weight_decay:
        torch._foreach_mul_(plan.weights, 1 - lr * weight_decay)
    neg_lr = -lr
    for group in plan.groups:
        for sub in group.sub_batches:  # cast to the chain's dtype on the way in (bf16, as Muon does, in a bf16 run)
            torch.stack(sub.updates, out=sub.into)
        orthogonal = _orthogonalise(group.stacked, ns_coefficients, ns_steps, eps)
        for sub in group.sub_batches:
            part = orthogonal if len(group.sub_batches) == 1 else orthogonal[sub.start:sub.start + len(sub.params)]
            # float32, the LR applied as Muon's add_(update, alpha=-lr * scale)
            torch.mul(part, sub.lr_scales * neg_lr, out=sub.deltas_oriented)
            torch._foreach_add_(sub.params, sub.deltas)


class BlockMuon(torch.optim.Muon):
    """torch.optim.Muon's update on every logical block of the model's matrices, batched by shape.

    Per block exactly as Muon treats a separate matrix: its own momentum (the rows of its source's
    momentum buffer: momentum is elementwise), its own Nesterov update, its own orthogonalisation
    (normalised by its own norm), its own LR scale from its shape, and decoupled weight decay lr * wd.
    The batching changes only how many operators run: the test suite holds it equal to PerBlockMuon.

    param_groups hold the model's Muon matrices themselves, so LR schedulers and zero_grad() work as with
    Muon. `lr` may be a tensor (a compiled or CUDA-graphed step reads it on the device). A parameter
    without a gradient is skipped, as Muon skips it. `compiled=True` compiles the update with torch.compile.
    """

    def __init__(self, blocks: Sequence[MatrixBlock], compiled: bool = False, ns_dtype: torch.dtype = torch.bfloat16,
                 **muon_kwargs: Any) -> None:
        self.blocks = list(blocks)
        self.ns_dtype = ns_dtype  # the Newton-Schulz chain's dtype: bf16 as torch.optim.Muon, or fp32 (an fp32 run)
        sources = list({id(b.source): b.source for b in self.blocks}.values())
        super().__init__(sources, **muon_kwargs)
        if len(self.param_groups) != 1:
            raise ValueError("BlockMuon takes one parameter group")
        group = self.param_groups[0]
        self._adjust_lr_fn: str | None = group["adjust_lr_fn"]
        for source in sources:
            self.state[source]["momentum_buffer"] = torch.zeros_like(source, memory_format=torch.preserve_format)
        self._updates = {id(s): torch.empty_like(s, memory_format=torch.preserve_format) for s in sources}
        self._runs = {id(block): block.row_runs() for block in self.blocks}
        self._full_plan = self._plan(sources)
        self._subset_plans: dict[tuple[int, ...], _Plan] = {}  # ids of the sources with gradients -> their plan
        self._step_fn: Callable[..., None] = torch.compile(_muon_step) if compiled else _muon_step

    def lr_scales(self) -> dict[str, float]:
        """Each block's LR factor (its effective LR is the group's lr times this), by block name."""
        return {block.name: lr_scale(block.shape, self._adjust_lr_fn) for block in self.blocks}

    def _plan(self, sources: list[nn.Parameter]) -> _Plan:
        """Group the blocks of `sources` by oriented shape, sub-batch them by layout, and make the views and
        buffers every step reuses (a step then makes no view and allocates only the chain's products)."""
        present = {id(s) for s in sources}
        by_shape: dict[tuple[int, int], dict[tuple[bool, tuple[int, ...]], list[MatrixBlock]]] = defaultdict(dict)
        for block in self.blocks:
            if id(block.source) not in present:
                continue
            rows, cols = block.shape
            layout = self._runs[id(block)]
            layout_shape: tuple[int, ...] = (rows, cols) if layout.runs == 1 else (layout.runs, layout.length, cols)
            tall = rows > cols
            by_shape[(cols, rows) if tall else (rows, cols)].setdefault((tall, layout_shape), []).append(block)
        weights = {id(s): s.detach() for s in sources}  # one base per source: its views alias it, and only it
        groups = []
        for oriented, subs in by_shape.items():
            device = sources[0].device
            stacked = torch.empty((sum(len(m) for m in subs.values()), *oriented), dtype=self.ns_dtype, device=device)
            sub_batches, start = [], 0
            for (tall, layout_shape), members in subs.items():
                rows_of_group = stacked[start:start + len(members)]
                natural = rows_of_group.mT if tall else rows_of_group  # (blocks, rows, cols) as the blocks lie
                into = natural.unflatten(1, layout_shape[:2]) if len(layout_shape) == 3 else natural
                deltas = torch.empty((len(members), *layout_shape), dtype=torch.float32, device=device)
                deltas_natural = deltas.view(len(members), -1, layout_shape[-1])
                scales = [lr_scale(b.shape, self._adjust_lr_fn) for b in members]
                sub_batches.append(_SubBatch(
                    updates=[self._runs[id(b)].view(self._updates[id(b.source)]) for b in members],
                    params=[self._runs[id(b)].view(weights[id(b.source)]) for b in members],
                    into=into, start=start,
                    lr_scales=torch.tensor(scales, dtype=torch.float32, device=device).view(-1, 1, 1),
                    deltas_oriented=deltas_natural.mT if tall else deltas_natural, deltas=list(deltas.unbind(0))))
                start += len(members)
            groups.append(_Group(sub_batches, stacked))
        return _Plan(list(sources), list(weights.values()), [self._updates[id(s)] for s in sources], groups)

    def _subset_plan(self, present: list[nn.Parameter]) -> _Plan:
        """The plan of a subset of the sources (those with gradients), made once per subset: its buffers are
        scratch that every step overwrites whole. The SUBSET_PLANS_KEPT subsets used last are kept."""
        key = tuple(id(p) for p in present)
        plan = self._subset_plans.pop(key, None) or self._plan(present)
        self._subset_plans[key] = plan  # the most recently used last
        if len(self._subset_plans) > SUBSET_PLANS_KEPT:
            del self._subset_plans[next(iter(self._subset_plans))]
        return plan

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        plan = self._full_plan
        grads = [p.grad for p in plan.sources if p.grad is not None]
        if not grads:
            return loss
        if len(grads) < len(plan.sources):  # e.g. an expert no token reached in the mask loop
            plan = self._subset_plan([p for p in plan.sources if p.grad is not None])
        buffers = [self.state[p]["momentum_buffer"] for p in plan.sources]
        step = self._step_fn if plan is self._full_plan else _muon_step  # a subset would recompile: run it eagerly
        step(plan, grads, buffers, group["lr"], group["weight_decay"], group["momentum"], group["nesterov"],
             group["ns_coefficients"], group["ns_steps"], group["eps"])
        return loss


class PerBlockMuon(torch.optim.Muon):
    """torch.optim.Muon run block by block (the reference BlockMuon is tested against, and the benchmark's
    "before" row): one Newton-Schulz chain per block.

    A whole-matrix block is handed to Muon as the model parameter itself. For a block of a fused
    parameter, a block parameter holding a copy of its rows is created once and handed to Muon instead;
    each step() gathers the fused parameter's current rows and gradient rows into it (index_select),
    runs Muon's own step, and scatters the updated rows back (index_copy_). So every block is
    orthogonalised on its own, with its own momentum buffer (kept across steps), LR scaled by
    sqrt(max(1, block rows / cols)) and decoupled weight decay, exactly as Muon treats a separate
    matrix. No host syncs: the index tensors live on the parameters' device.

    param_groups hold the block parameters, so LR schedulers work as with Muon; zero_grad() also clears
    the fused parameters' gradients.
    """

    def __init__(self, blocks: Sequence[MatrixBlock], **muon_kwargs: Any) -> None:
        self.blocks: list[tuple[MatrixBlock, nn.Parameter]] = []
        for block in blocks:
            if block.rows is None:
                param = block.source
            else:
                param = nn.Parameter(block.source.detach().index_select(0, block.rows).clone())
            self.blocks.append((block, param))
        self._fused = [(block, param) for block, param in self.blocks if block.rows is not None]
        self._fused_sources = list({id(b.source): b.source for b, _ in self._fused}.values())
        super().__init__([param for _, param in self.blocks], **muon_kwargs)

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepped: list[tuple[MatrixBlock, nn.Parameter]] = []
        for block, param in self._fused:
            grad = block.source.grad
            assert block.rows is not None
            if grad is None:
                param.grad = None
                continue
            param.copy_(block.source.index_select(0, block.rows))
            param.grad = grad.index_select(0, block.rows)
            stepped.append((block, param))
        super().step()
        for block, param in stepped:
            assert block.rows is not None
            block.source.index_copy_(0, block.rows, param)
            param.grad = None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for source in self._fused_sources:
            if set_to_none:
                source.grad = None
            elif source.grad is not None:
                source.grad.detach_().zero_()


def build_optimizers(model: nn.Module, config: ExperimentConfig, device: torch.device,
                     reference: bool = False) -> list[torch.optim.Optimizer]:
    """config.optimizer "muon": [BlockMuon (Nesterov, momentum 0.95, lr muon_lr, weight decay, LR rule
    config.muon_adjust_lr_fn) on every logical matrix of the blocks, AdamW (lr adamw_lr, no weight decay) on
    the embedding/tied head, norm gains and biases]. "adamw": [one AdamW at adamw_lr with two groups: the block
    matrices with weight decay, the rest without] (AdamW is elementwise, so fused or split matrices are the
    same to it). AdamW runs its fused kernel. `reference`: the optimizers as they were before batching,
    PerBlockMuon and an AdamW fused only on CUDA (what the tests and the benchmark's "before" rows compare with).

    A compiled optimizer step (config.compile_optimizer) or a CUDA-graphed step (config.cuda_graph) reads the
    LRs from device tensors, which the schedulers update in place, so a new LR neither recompiles nor is
    frozen into the graph; a graphed AdamW is `capturable`."""
    matrices, others = split_parameters(model)

    def lr(value: float, on_device: bool) -> float | torch.Tensor:
        return torch.tensor(value, dtype=torch.float32, device=device) if on_device else value

    adamw_lr = lr(config.adamw_lr, config.cuda_graph)
    adamw_options: dict[str, Any] = {"fused": True if not reference else (device.type == "cuda" or None),
                                     "capturable": config.cuda_graph}
    if config.optimizer == "adamw":
        groups: list[dict[str, Any]] = [{"params": matrices}, {"params": others, "weight_decay": 0.0}]
        return [torch.optim.AdamW(groups, lr=adamw_lr, weight_decay=config.weight_decay, **adamw_options)]
    muon_options: dict[str, Any] = {
        "lr": lr(config.muon_lr, config.cuda_graph or config.compile_optimizer), "weight_decay": config.weight_decay,
        "momentum": 0.95, "nesterov": True, "adjust_lr_fn": config.muon_adjust_lr_fn}
    blocks = matrix_blocks(model)
    muon = (PerBlockMuon(blocks, **muon_options) if reference
            else BlockMuon(blocks, compiled=config.compile_optimizer, ns_dtype=newton_schulz_dtype(config, device),
                           **muon_options))
    return [muon, torch.optim.AdamW(others, lr=adamw_lr, weight_decay=0.0, **adamw_options)]


def newton_schulz_dtype(config: ExperimentConfig, device: torch.device) -> torch.dtype:
    """The dtype of Muon's Newton-Schulz chain: bf16 in a bf16 run, as torch.optim.Muon computes it, and fp32 in an
    fp32 run (the CPU preset: bf16 bmm runs about 15x slower than fp32 on a CPU and would dominate its step)."""
    return torch.float32 if resolve_precision(config.precision, device) == FP32 else torch.bfloat16


def lr_factor(step: int, config: ExperimentConfig) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio.

    The cosine reaches min_lr_ratio exactly at the last step, max_steps - 1.
    """
    warmup = config.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, config.max_steps - 1 - warmup)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_schedulers(optimizers: list[torch.optim.Optimizer], config: ExperimentConfig) -> list[torch.optim.lr_scheduler.LambdaLR]:
    """One LambdaLR per optimizer, stepped once per optimizer step."""
    return [torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, config)) for opt in optimizers]
