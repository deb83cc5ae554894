"""Every check that can fail before any data is loaded or any step is trained: the settings that cannot work
together, flash-attn, the GPU, the local --data file, the loggers, the folders and the memory estimate.

Each raises ConfigError with one line that says what is wrong and how to fix it; under torchrun the experiment
runs them on every rank through Distributed.agree, so that rank 0 can say which rank failed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from arms.registry import arm_builders, check_arm_names
from common.errors import ConfigError
from common.hardware import BF16, cuda_capability, resolve_device, resolve_precision
from common.reporting import check_writable
from config.settings import ExperimentConfig
from data.dataset import TokenData
from data.sources import check_local_path
from models.attention import interface_problem
from models.attention_ops import FLASH_ATTN_INSTALL, flash_attn_import_error, flash_attn_unusable
from models.huggingface import GenerationError, modeling_source
from models.memory import check_fits, shape_only_model
from models.transformer import ModelBuilder
from training.distributed import DATA, SINGLE, Distributed
from training.lineup import LADDER, lineup_of
from training.memory_plan import ADVICE, experiment_memory, planned_vocab_size
from training.metrics_log import check_loggers
from training.trainer import check_cuda_graph


def check_parallel(config: ExperimentConfig, builders: Mapping[str, ModelBuilder], mode: str) -> None:
    """What the arms and the parallel mode rule out, the same on every rank (checked before the ranks join)."""
    if config.cuda_graph and mode == DATA:
        raise ConfigError("--cuda-graph captures one process's step; with --parallel data the gradient all-reduce "
                          "would be inside it: use --parallel seeds, or drop --cuda-graph")
    check_arm_names(config.arms, builders)
    if LADDER in config.studies:
        check_arm_names(config.ladder_arms, builders, "--ladder-arms")
    check_arm_names(sorted({entry.arm for entry in lineup_of(config).entries}), builders, "the study's arms")


def preflight(config: ExperimentConfig, builders: Mapping[str, ModelBuilder] | None = None,
              dist: Distributed = SINGLE) -> torch.device:
    """Every check that can fail on this rank before any data is loaded, the memory estimate included (of the
    registry's arms unless `builders` says otherwise); returns the device this rank trains on (its own GPU under
    torchrun)."""
    config.validate()
    builders = builders or arm_builders()
    device = resolve_device(config.device, dist.device_rank)
    check_flash_attn(config, device)
    if config.compile and resolve_precision(config.precision, device) != BF16:
        raise ConfigError("--compile needs bf16 (the grouped-GEMM MoE compiles only in bf16): add --precision bf16, "
                          "or drop --compile")
    if config.cuda_graph:
        check_cuda_graph(config, device)
    if config.data_path:
        check_local_path(config.data_path)
    check_loggers(config)
    check_attention_interfaces(config, builders)
    check_memory(config, builders, device, dist)
    for path, what, flag in ((config.output_dir, "results", "--output-dir"), (config.cache_dir, "the token cache", "--cache-dir")):
        try:
            check_writable(Path(path))
        except OSError as error:
            raise ConfigError(f"cannot write {what} to {path!r} ({error.strerror or error}); choose another {flag}") from error
    return device


def check_attention_interfaces(config: ExperimentConfig, builders: Mapping[str, ModelBuilder]) -> None:
    """ConfigError naming the arm whose attention does not declare what the costs need (score_dims, and the size
    of each cache mode it offers), found on a shape-only model before anything trains; and, when models are saved,
    the arm whose attention has no source for the saved model's code (models/huggingface.py: a lambda, say)."""
    vocab_size = planned_vocab_size(config)
    generated: set[str] = set()
    for entry in lineup_of(config).entries:
        model = shape_only_model(builders[entry.arm], entry.config.replace(vocab_size=vocab_size))
        problem = interface_problem(model.attention_modules()[0])
        if problem is not None:
            raise ConfigError(f"arm {entry.arm}: {problem}; an attention module declares it for the cost accounting "
                              "(README: Add your own attention)")
        if config.save_checkpoints and entry.arm not in generated:
            try:
                modeling_source(model.attention_factory, entry.arm)
            except GenerationError as error:
                raise ConfigError(f"arm {entry.arm}: a saved model carries its code, which cannot be generated: {error} "
                                  "(or train with --no-save)") from None
            generated.add(entry.arm)


def check_memory(config: ExperimentConfig, builders: Mapping[str, ModelBuilder], device: torch.device,
                 dist: Distributed) -> None:
    """ConfigError unless this machine holds the run's estimated memory (training/memory_plan.py): under
    data-parallel the ranks share each batch, and the ranks on one machine share its RAM."""
    check_fits(experiment_memory(config, builders, dist.batch_shards), device, ADVICE, dist.local_world_size)


def check_flash_attn(config: ExperimentConfig, device: torch.device) -> None:
    """Import flash-attn once, before any data is loaded: `--attention-backend flash-attn` stops here when
    it cannot run (not installed, a wheel built for another torch, fp32, no or an unsupported GPU); `auto`
    falls back to SDPA and its run's backend line says why (deepseek_modeling)."""
    if config.attention_backend == "auto" and device.type == "cuda":
        flash_attn_import_error()
    if config.attention_backend != "flash-attn":
        return
    if device.type != "cuda":
        raise ConfigError("--attention-backend flash-attn needs a CUDA GPU; use --attention-backend sdpa on CPU")
    if resolve_precision(config.precision, device) != BF16:
        raise ConfigError("--attention-backend flash-attn with --precision fp32: flash-attn runs only in fp16/bf16; "
                          "use --precision bf16 (or auto), or --attention-backend sdpa")
    reason = flash_attn_unusable(cuda_capability(device))
    if reason is None:
        return
    fix = "use --attention-backend auto (SDPA's FlashAttention kernel)"
    if reason == flash_attn_import_error():  # the package is missing or broken, not the card unsupported
        fix = f"run `{FLASH_ATTN_INSTALL}` (it builds against the installed torch), or {fix}"
    raise ConfigError(f"--attention-backend flash-attn: {reason}; {fix}")


def check_vocab_size(config: ExperimentConfig, data: TokenData) -> None:
    if config.vocab_size is not None and config.vocab_size < data.vocab_size:
        raise ConfigError(f"vocab_size={config.vocab_size} is smaller than the tokenizer's {data.vocab_size}; leave it unset")
