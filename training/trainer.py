"""Training and evaluation of one model on one seed.

The hot path has no host-device synchronisation: losses are accumulated on the device and read
back only at logging steps (every `log_every` steps), which is also where a non-finite loss is
noticed. Training time excludes evaluation, saving and the logging (metrics.jsonl, TensorBoard, W&B): the
clock stops at each of those host syncs and starts again when they are done.

Under data-parallel (`--parallel data`, training/distributed.py) the same loop runs on every rank:
DistributedDataParallel averages the gradients, each rank takes its slice of every global batch and
of the validation windows, and the logged losses and metrics are reduced over the ranks.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from common.errors import ConfigError
from common.hardware import (
    BF16,
    autocast,
    cuda_capability,
    peak_memory_mb,
    precision_label,
    reset_peak_memory,
    resolve_precision,
    synchronize,
)
from config.settings import ExperimentConfig
from data.dataset import TokenData, batch_starts, training_batch, validation_windows
from models.costs import parameter_count
from models.moe import GROUPED_FUSED, MASK_LOOP, plan_dispatch
from models.transformer import MoELanguageModel
from training.distributed import SINGLE, Distributed, shard_batch, shard_rows
from training.optim import BlockMuon, build_optimizers, build_schedulers, collapsed_lr_scales
from training.step import GraphedStep, count_step_operators, optimizer_step, training_step, unchanged_training_state
from training.train_state import ResumePoint, TrainingState, starts_digest

MetricsCallback = Callable[[dict[str, Any]], None]  # gets {step, tokens, seconds, train_loss[, val_loss, val_accuracy]}
# a run's curve (its record's "curve", one value per evaluation): each key, with the key of the same value in a point
CURVE_KEYS = {"step": "step", "training_seconds": "seconds", "tokens_seen": "tokens", "train_loss": "train_loss",
              "val_loss": "val_loss", "val_accuracy": "val_accuracy"}


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss; `step` is the first optimizer step where it did."""

    def __init__(self, step: int) -> None:
        super().__init__(f"non-finite training loss at step {step}")
        self.step = step


def perplexity(loss: float) -> float:
    """exp(loss), without overflowing for a diverged model."""
    return math.exp(loss) if loss < 700 else float("inf")


@torch.no_grad()
def evaluate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int,
             device: torch.device, precision: str, dist: Distributed = SINGLE) -> dict[str, float]:
    """Token-weighted loss, next-token accuracy and perplexity over the whole fixed validation set.

    Under data-parallel each rank passes its share of the windows and the sums are added over ranks."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, len(inputs), batch_size):
        x, y = inputs[start : start + batch_size], targets[start : start + batch_size]
        with autocast(device, precision):
            logits, _ = model(x)
        loss_sum += F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="sum")
        correct += (logits.argmax(dim=-1) == y).sum()
    model.train(was_training)
    totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(targets.numel()), dtype=torch.float64, device=device)])
    if dist.data_parallel:
        dist.all_reduce(totals)
    loss_total, correct_total, count = totals.tolist()
    loss = loss_total / count
    return {"val_loss": loss, "val_accuracy": correct_total / count, "val_perplexity": perplexity(loss)}


def warm_up(model: nn.Module, optimizers: list[torch.optim.Optimizer], inputs: torch.Tensor, targets: torch.Tensor,
            config: ExperimentConfig, device: torch.device, precision: str) -> dict[str, int]:
    """Untimed warm-up, after which weights and optimizer state are as before (unchanged_training_state), so
    that one-time costs (CUDA context, kernel selection, the optimizers' state, compiling the blocks and the
    optimizer step, allocator growth) are not charged to whichever model runs first: an optimizer step on zero
    gradients (creates the optimizers' state), then one training step, eager, whose operators are counted
    (count_step_operators; returned), then, when something is compiled, one step as training runs it."""
    with unchanged_training_state(model, optimizers):
        for param in model.parameters():
            param.grad = torch.zeros_like(param)
        optimizer_step(optimizers, [])
        counts = count_step_operators(model, optimizers, inputs, targets, config, device, precision)
        if config.compile or config.compile_optimizer:
            training_step(model, optimizers, [], inputs, targets, config, device, precision)
    synchronize(device)
    return counts


def compiled_so_far() -> dict[str, int]:
    """torch.compile's work in this process so far (dynamo's counters): frames compiled and graphs made."""
    from torch._dynamo.utils import counters

    return {"frames": counters["frames"]["ok"], "graphs": counters["stats"]["unique_graphs"]}


def make_step(model: nn.Module, optimizers: list[torch.optim.Optimizer], schedulers: list[Any],
              inputs: torch.Tensor, targets: torch.Tensor, config: ExperimentConfig, device: torch.device,
              precision: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training step as config asks for it: eager (the blocks compiled with config.compile, the optimizer
    with config.compile_optimizer), or the whole step replayed from a CUDA graph (config.cuda_graph; captured
    here on `inputs`, `targets`, leaving weights and optimizer state unchanged)."""
    if config.cuda_graph:
        return GraphedStep(model, optimizers, schedulers, inputs, targets, config, device, precision)
    return lambda x, y: training_step(model, optimizers, schedulers, x, y, config, device, precision)


def new_run_record(name: str, model: nn.Module, seed: int) -> dict[str, Any]:
    params = parameter_count(model)
    return {
        "model_name": name, "seed": seed, "status": "running", "val_loss": None, "val_accuracy": None,
        "val_perplexity": None, "training_time_minutes": None, "parameter_count": params,
        "parameters_millions": round(params / 1e6, 3), "tokens_per_second": None, "tokens_seen": 0,
        "peak_gpu_memory_mb": None, "precision": None, "compiled": None, "attention_backend": None, "moe_dispatch": None,
        "step_mode": None,  # eager, or what was compiled / graphed (step_mode_label)
        "step_operators": None,  # aten operators one eager step dispatches: forward, backward_and_clip, optimizer, total
        "compilation": None,  # dynamo's counts: frames compiled and graphs made before the clock started, and after
        "muon_lr_scales": None,  # each Muon block's LR factor (layers and experts with equal factors collapsed to *)
        "muon_newton_schulz_dtype": None,  # bfloat16 in a bf16 run (as torch.optim.Muon), float32 in an fp32 run
        "checkpoint": None,  # {"directory", "bytes", "files"} once a completed run's model is saved
        "curve": {key: [] for key in CURVE_KEYS},
    }


def step_mode_label(config: ExperimentConfig) -> str:
    """How the training step runs, in words, for the JSON."""
    parts = (["blocks compiled"] if config.compile else []) + (["optimizer compiled"] if config.compile_optimizer else [])
    if config.cuda_graph:
        parts.append("whole step in one CUDA graph")
    return ", ".join(parts) or "eager"


def check_cuda_graph(config: ExperimentConfig, device: torch.device) -> None:
    """Raise ConfigError unless a CUDA-graphed step can run here: CUDA, and the fused grouped_mm MoE (the other
    paths read expert sizes back to the host, which a graph cannot)."""
    if device.type != "cuda":
        raise ConfigError("--cuda-graph needs a CUDA GPU; drop it on the CPU")
    dtype = torch.bfloat16 if resolve_precision(config.precision, device) == BF16 else torch.float32
    capability = cuda_capability(device)
    path = plan_dispatch(config.moe_dispatch, device, dtype, config.d_model, config.d_ff, capability)
    if path != GROUPED_FUSED:
        if plan_dispatch("grouped_mm", device, dtype, config.d_model, config.d_ff, capability) == GROUPED_FUSED:
            fix = "pass --moe-dispatch grouped_mm (auto keeps the fused kernel off on sm100 for now) or drop --cuda-graph"
        else:
            fix = "drop --cuda-graph"
        raise ConfigError(f"--cuda-graph needs static shapes, i.e. the fused grouped_mm MoE (sm90 in bf16, or sm100 "
                          f"with --moe-dispatch grouped_mm); here the MoE would run the {path}: {fix}")


def prepare_model(model: MoELanguageModel, config: ExperimentConfig, device: torch.device, precision: str) -> list[str]:
    """Move to the device, fix each MoE layer's dispatch for the compute dtype, compile if asked; returns
    the MoE paths planned.

    Blocks are compiled one by one, in place, so parameter names (and the Muon/AdamW split) are unchanged.
    """
    model.to(device).train()
    paths = model.plan_moe_dispatch(device, torch.bfloat16 if precision == BF16 else torch.float32)
    model.plan_attention(device)
    if config.compile:
        for block in model.transformer_blocks():
            block.compile()
    return paths


def saves_state_after(done: int, config: ExperimentConfig, is_eval: bool) -> bool:
    """Whether the training state is saved after `done` steps: at the last step only with --keep-training-state
    (a completed run needs none), else every config.save_every steps, or at each evaluation when that is 0."""
    if done == config.max_steps:
        return config.keep_training_state
    if config.save_every:
        return done % config.save_every == 0
    return is_eval


def train_model(model: MoELanguageModel, data: TokenData, config: ExperimentConfig, seed: int,
                device: torch.device, record: dict[str, Any], dist: Distributed = SINGLE,
                state: TrainingState | None = None, on_metrics: MetricsCallback | None = None) -> dict[str, Any]:
    """Train `model` for config.max_steps optimizer steps, filling `record` as it goes.

    `record` is updated in place so that a caller still holds the partial curve when this raises
    (NonFiniteLoss, KeyboardInterrupt). Under data-parallel (`dist`) every rank calls this for the same
    run and the model is trained by all of them; the record holds the global batch's numbers.
    `state`: where the run's training state is saved every config.save_every steps (0: at each
    evaluation) and, when it resumes, restored from. `on_metrics`: called at every logged step and
    evaluation with what was measured (the live curves: metrics.jsonl, TensorBoard, W&B).
    """
    torch.manual_seed(dist.training_seed(seed))  # dropout and router noise: the same stream for every arm
    Trainer(model, data, config, seed, device, record, dist, state, on_metrics).train()
    return record


class Trainer:
    """One run's training: the model on its device with its optimizers, batches and validation windows, and the
    loop, whose only host syncs are the logged steps (where the clock stops, losses are read back and a
    non-finite one is noticed), the evaluations and the training-state saves."""

    def __init__(self, model: MoELanguageModel, data: TokenData, config: ExperimentConfig, seed: int,
                 device: torch.device, record: dict[str, Any], dist: Distributed, state: TrainingState | None,
                 on_metrics: MetricsCallback | None) -> None:
        self.model, self.config, self.seed, self.device, self.record = model, config, seed, device, record
        self.dist, self.state, self.on_metrics = dist, state, on_metrics
        self.compiled_before = compiled_so_far()
        self.precision = resolve_precision(config.precision, device)
        paths = prepare_model(model, config, device, self.precision)
        self.net = dist.wrap(model, device, find_unused_parameters=MASK_LOOP in paths)  # DDP under data-parallel
        record.update(precision=precision_label(self.precision), compiled=config.compile, step_mode=step_mode_label(config))
        self.optimizers = build_optimizers(model, config, device)
        self.schedulers = build_schedulers(self.optimizers, config)
        if isinstance(self.optimizers[0], BlockMuon):
            record["muon_lr_scales"] = collapsed_lr_scales(self.optimizers[0].lr_scales())
            record["muon_newton_schulz_dtype"] = str(self.optimizers[0].ns_dtype).removeprefix("torch.")
        self.train_tokens = data.train.to(device)
        starts = batch_starts(len(data.train), config, seed)  # the global batches, (max_steps, batch_size)
        self.batches = starts_digest(starts)
        self.starts = (shard_batch(starts, dist.rank, dist.world_size) if dist.data_parallel else starts).to(device)
        val_x, val_y = validation_windows(data.val, config.max_seq_len)
        self.n_val_windows = len(val_x)
        if dist.data_parallel:
            val_x, val_y = shard_rows(val_x, dist.rank, dist.world_size), shard_rows(val_y, dist.rank, dist.world_size)
        self.val_x, self.val_y = val_x.to(device), val_y.to(device)
        self.tokens_per_step = config.batch_size * config.max_seq_len  # the global batch
        reset_peak_memory(device)

    def train(self) -> None:
        """Warm up, restore or start the curve, run the steps, and fill the record of a completed run."""
        step_fn, resumed = self.start()
        self.loss_sum, self.steps_in_window = resumed.loss_sum, resumed.steps_in_window
        self.training_seconds = resumed.training_seconds
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        self.progress = tqdm(total=self.config.max_steps, initial=resumed.step,
                             desc=f"{self.record['model_name']} (seed {self.seed})", unit="step", dynamic_ncols=True,
                             mininterval=1.0 if sys.stderr.isatty() else 30.0, disable=not self.dist.is_main)
        self.wait_for_all()
        self.segment_start = time.perf_counter()
        try:
            for step in range(resumed.step, self.config.max_steps):
                x, y = training_batch(self.train_tokens, self.starts[step], self.config.max_seq_len)
                loss = step_fn(x, y)
                self.first_bad_step = torch.where((self.first_bad_step < 0) & ~torch.isfinite(loss),
                                                  torch.full_like(self.first_bad_step, step), self.first_bad_step)
                self.loss_sum += loss
                self.steps_in_window += 1
                self.after_step(step + 1, loss)
        finally:
            self.progress.close()
            self.dist.unwrap(self.model)
            compiled_now = compiled_so_far()  # any compilation from here on ran inside the training loop: a recompile
            self.record["compilation"].update(
                frames_compiled_during_training=compiled_now["frames"] - self.compiled_at_start["frames"],
                graphs_during_training=compiled_now["graphs"] - self.compiled_at_start["graphs"])
        self.finish()

    def start(self) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ResumePoint]:
        """Warm up (untimed, leaving weights and optimizer state as they were), make the step, and restore the
        training state, or evaluate the untrained model as the curve's first point."""
        first_batch = training_batch(self.train_tokens, self.starts[0], self.config.max_seq_len)
        self.record["step_operators"] = warm_up(self.net, self.optimizers, *first_batch, self.config, self.device,
                                                self.precision)
        step_fn = make_step(self.net, self.optimizers, self.schedulers, *first_batch, self.config, self.device,
                            self.precision)
        torch.manual_seed(self.dist.training_seed(self.seed))  # training's random stream must not depend on the warm-up
        resumed = (self.state.restore(self.model, self.optimizers, self.schedulers, self.record, self.batches,
                                      self.device, self.dist) if self.state else None)
        if resumed is None:
            resumed = ResumePoint(step=0, training_seconds=0.0, loss_sum=torch.zeros((), device=self.device),
                                  steps_in_window=0)
            self.add_point(0, 0.0, None)  # curves start at 0 s, before any update; compiles the eval mode, before the clock
        self.compiled_at_start = compiled_so_far()
        self.record["compilation"] = {
            "frames_compiled_before_training": self.compiled_at_start["frames"] - self.compiled_before["frames"],
            "graphs_before_training": self.compiled_at_start["graphs"] - self.compiled_before["graphs"],
        }
        return step_fn, resumed

    def after_step(self, done: int, loss: torch.Tensor) -> None:
        """After `done` steps: at a logged step, evaluation or save (the only host syncs of the loop) the clock
        stops, a non-finite loss fails the run, the progress bar and curves are fed, and the clock starts again
        once the logging, evaluation and saving are done."""
        config = self.config
        is_eval = done % config.eval_every == 0 or done == config.max_steps
        is_save = self.state is not None and saves_state_after(done, config, is_eval)
        if not (done % config.log_every == 0 or is_eval or is_save):
            return
        self.wait_for_all()
        self.training_seconds += time.perf_counter() - self.segment_start  # what follows is not training
        self.check_finite()
        step_loss = self.global_mean(loss).item()
        self.show_progress(done, step_loss)
        if is_eval:
            mean_train = self.global_mean(self.loss_sum / self.steps_in_window).item()
            self.add_point(done, self.training_seconds, mean_train)
            self.loss_sum.zero_()
            self.steps_in_window = 0
            self.record["tokens_seen"] = done * self.tokens_per_step
            self.record["training_time_minutes"] = self.training_seconds / 60
        else:
            self.report(done, step_loss)
        if is_save:
            assert self.state is not None
            self.state.save(ResumePoint(done, self.training_seconds, self.loss_sum, self.steps_in_window), self.model,
                            self.optimizers, self.schedulers, self.record, self.batches, self.device, self.dist)
        if is_eval or is_save:  # their device work done, and every rank past rank 0's writes
            self.wait_for_all()
        # at a logged step the device has nothing queued (the loss was just read back)
        self.segment_start = time.perf_counter()

    def check_finite(self) -> None:
        """NonFiniteLoss at the first step whose loss was not finite; under data-parallel every rank stops at the
        same (first) bad step."""
        if self.dist.data_parallel:
            never = self.config.max_steps
            bad = torch.where(self.first_bad_step < 0, never, self.first_bad_step)
            self.dist.all_reduce(bad, "min")
            self.first_bad_step = torch.where(bad == never, -1, bad)
        if (bad_step := int(self.first_bad_step)) >= 0:
            raise NonFiniteLoss(bad_step)

    def global_mean(self, loss: torch.Tensor) -> torch.Tensor:
        """The global batch's loss: under data-parallel the mean of the ranks' equal slices."""
        return self.dist.all_reduce(loss / self.dist.world_size) if self.dist.data_parallel else loss

    def show_progress(self, done: int, step_loss: float) -> None:
        self.progress.set_postfix(loss=f"{step_loss:.3f}",
                                  tok_s=f"{done * self.tokens_per_step / self.training_seconds:,.0f}", refresh=False)
        if done < self.config.max_steps:
            self.progress.update(done - self.progress.n)
        else:
            self.progress.n = done  # close() draws the final 100% line, once

    def wait_for_all(self) -> None:
        """The device's queued work done (on every rank, under data-parallel): where a training timer may
        start or stop. Seed-parallel ranks train different runs and never wait for each other here."""
        synchronize(self.device)
        if self.dist.data_parallel:
            self.dist.barrier()

    def report(self, step: int, train_loss: float | None) -> None:
        if self.on_metrics is not None:
            self.on_metrics({"step": step, "tokens": step * self.tokens_per_step, "seconds": self.training_seconds,
                             "train_loss": train_loss})

    def add_point(self, step: int, seconds: float, train_loss: float | None) -> None:
        """Evaluate on the whole validation set and add the point to the record's curve and the live curves."""
        metrics = evaluate(self.model, self.val_x, self.val_y, self.config.batch_size, self.device, self.precision,
                           self.dist)
        point = {"step": step, "tokens": step * self.tokens_per_step, "seconds": seconds,
                 "train_loss": train_loss, "val_loss": metrics["val_loss"], "val_accuracy": metrics["val_accuracy"]}
        for curve_key, point_key in CURVE_KEYS.items():
            self.record["curve"][curve_key].append(point[point_key])
        self.record["attention_backend"] = self.model.attention_backends()
        if self.on_metrics is not None:
            self.on_metrics(point)

    def finish(self) -> None:
        """The record of a completed run: final metrics, time, speed, memory and what ran."""
        record, seconds, model = self.record, self.training_seconds, self.model
        record.update(
            status="completed",
            val_loss=record["curve"]["val_loss"][-1],
            val_accuracy=record["curve"]["val_accuracy"][-1],
            val_perplexity=perplexity(record["curve"]["val_loss"][-1]),
            training_seconds=seconds,
            training_time_minutes=seconds / 60,
            tokens_per_second=record["tokens_seen"] / seconds if seconds > 0 else None,
            peak_gpu_memory_mb=peak_memory_mb(self.device),
            moe_dispatch=model.moe_dispatch_used(),
            **({"replicas_identical": self.dist.replicas_identical(model)} if self.dist.data_parallel else {}),
            validation_set=f"all {self.n_val_windows} non-overlapping {self.config.max_seq_len}-token windows of the "
                           "validation split",
        )
