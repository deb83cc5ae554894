"""The question behind the question: at an equal KV-cache budget, which attention learns best, and does the answer
hold as the model grows? `python -m training.study`.

    python -m training.study --preset tiny              # both studies, a few minutes on a 2-core CPU
    python -m training.study --studies frontier --dry-run   # the plan only: runs, tokens, the time they take
    python -m training.study --resume                   # continue a stopped study; finished points are kept

Two studies on the experiment's own machinery (training/experiment.py: the same arms, data, seeds, paired
statistics, ledger, resume and torchrun), each a lineup of points (training/lineup.py states both rules):
the cache frontier (every attention at one size against its measured KV cache) and the size ladder (arms at
growing sizes, tokens in proportion to parameters). Before training it prints the plan: every point, its steps
and tokens, the time it should take from a step time measured on this machine for each model, what it would take
on an RTX 4090 and an H200 (from FLOPs: an estimate), and whether the data is too small not to repeat; --dry-run
stops there. The answer (training/study_report.py) goes into the results JSON's `study` key and two plots.
Every study setting is a flag and a TOML key, like the trainer's; a study defaults to three seeds, to exp6_study/
for its results, and to no saved models or greedy samples (--save, --sample-tokens N bring them back).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from arms.registry import ARMS
from common.hardware import resolve_device, resolve_precision, synchronize
from config.settings import STUDIES, ExperimentConfig
from models.costs import cost_report
from models.transformer import MoELanguageModel
from training.benchmark import DATASHEET_PEAK_TFLOPS
from training.command import Command, main
from training.lineup import Entry, lineup_of
from training.memory_plan import planned_vocab_size
from training.optim import build_optimizers
from training.step import training_step

EVALUATION_SHARE = 0.15  # what evaluation, logging and saving add to the steps' time, in the estimate
TIMED_STEPS, WARMUP_STEPS = 3, 2
REFERENCE_GPUS = tuple((name, peak) for name, peak, _ in DATASHEET_PEAK_TFLOPS
                       if name in ("RTX 4090", "H200"))  # the reference cards' dense bf16 TFLOP/s
REFERENCE_MFU = (0.2, 0.4)  # the share of that peak the estimate assumes, low and high


def plan_lines(config: ExperimentConfig) -> list[str]:
    """The plan: every point with its steps and tokens, and the time the whole study should take, from a step time
    measured here for each point's model (random tokens, the run's batch, precision and device); then what it would
    take on the reference GPUs (from FLOPs, an estimate) and whether the data is large enough not to repeat."""
    lineup = lineup_of(config)
    device = resolve_device(config.device)
    seeds = len(config.run_seeds)
    lines = [f"Plan: {len(lineup.entries)} points x {seeds} seed(s) = {len(lineup.entries) * seeds} runs, on "
             f"{device.type}, vocabulary {planned_vocab_size(config):,}{_vocab_note(config)}; step times measured "
             f"now, evaluation and saving add about {EVALUATION_SHARE:.0%}:"]
    total_seconds, total_tokens, total_flops, most_tokens = 0.0, 0, 0.0, 0
    for entry in lineup.entries:
        model = _point_model(entry, device)
        seconds = step_seconds(model, device)
        steps = entry.config.max_steps
        tokens = steps * entry.config.batch_size * entry.config.max_seq_len
        run_seconds = steps * seconds * (1 + EVALUATION_SHARE)
        total_seconds += run_seconds * seeds
        total_tokens += tokens * seeds
        total_flops += cost_report(model)["training_flops_per_token"] * tokens * seeds
        most_tokens = max(most_tokens, tokens)
        lines.append(f"  {entry.study:>8} {entry.name:>16}: d_model {entry.config.d_model}, {entry.config.n_layers} "
                     f"layer(s), {steps:,} steps, {tokens:,} tokens, {seconds * 1000:.0f} ms/step: "
                     f"~{_duration(run_seconds)} per seed")
    lines.append(f"Plan total: {total_tokens:,} tokens, {total_flops:.3g} training FLOPs, about "
                 f"{_duration(total_seconds)} on this machine.")
    lines.append(reference_gpu_line(total_flops))
    training_tokens = int(config.max_tokens * (1 - config.val_fraction))  # a study has no LR sweep
    if config.max_tokens and most_tokens > training_tokens:
        lines.append(f"Data: at most {training_tokens:,} training tokens (--max-tokens {config.max_tokens:,}); the "
                     f"largest point trains on {most_tokens:,}, so it sees them ~{most_tokens / training_tokens:.0f} "
                     "times: raise --max-tokens (or --data a larger corpus) for a scaling law without repetition.")
    return lines


def reference_gpu_line(flops: float) -> str:
    """What `flops` of training would take on the reference cards at REFERENCE_MFU of their dense bf16 datasheet
    peak: an estimate from FLOPs, not a measurement (small models are launch-bound and reach less)."""
    low, high = REFERENCE_MFU
    times = [f"{name} ~{_duration(flops / (peak * 1e12 * high))}-{_duration(flops / (peak * 1e12 * low))}"
             for name, peak in REFERENCE_GPUS]
    return (f"On a GPU (estimated from FLOPs at {low:.0%}-{high:.0%} of the dense bf16 peak, not measured): "
            f"{'; '.join(times)}.")


def _point_model(entry: Entry, device: torch.device) -> MoELanguageModel:
    config = entry.config.replace(vocab_size=planned_vocab_size(entry.config))
    torch.manual_seed(0)
    return ARMS[entry.arm].build(config).to(device).train()


def step_seconds(model: MoELanguageModel, device: torch.device) -> float:
    """The median time of one training step of `model` at its config's batch, measured after a short warm-up."""
    config = model.config
    precision = resolve_precision(config.precision, device)
    model.plan_moe_dispatch(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    optimizers = build_optimizers(model, config, device)
    tokens = torch.randint(0, config.vocab_size or 2, (config.batch_size, config.max_seq_len + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    times = []
    for index in range(WARMUP_STEPS + TIMED_STEPS):
        synchronize(device)
        start = time.perf_counter()
        training_step(model, optimizers, [], inputs, targets, config, device, precision)
        synchronize(device)
        if index >= WARMUP_STEPS:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _vocab_note(config: ExperimentConfig) -> str:
    """Why the plan's vocabulary may be larger than the run's: before the tokenizer loads, a run that may reach
    the Hub plans for the Hub tokenizer; without a network it falls back to the offline BPE, and steps are faster."""
    if config.vocab_size is not None or config.offline:
        return ""
    return f" (the Hub tokenizer's; a run that falls back offline has {config.offline_vocab_size:,}: --offline plans for that)"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


STUDY = Command(
    prog="python -m training.study",
    description="The equal-KV-cache frontier (MHA, GQA at each K/V head count, MQA, MLA at a ladder of latent ranks) "
                "and the size ladder (arms at growing sizes, tokens in proportion to parameters), over seeds, with "
                "paired intervals, Holm, scaling-law fits and a verdict on the gap's trend. Prints its plan first.",
    epilog="With no arguments: both studies at the machine's preset (--preset tiny: a few minutes on a CPU), three "
           "seeds, results in exp6_study/. Every setting of the experiment is a flag here too.",
    defaults={"studies": STUDIES, "seeds": (42, 43, 44), "output_dir": "exp6_study", "save_checkpoints": False,
              "sample_tokens": 0},
    plan=plan_lines,
)


if __name__ == "__main__":
    sys.exit(main(command=STUDY))
