"""Compare DeepSeek-V3 MLA (via FlashAttention-2) with standard multi-head attention in one MoE LM.

    python exp6_trainer.py            # the full experiment on a CUDA GPU; the CPU preset without one
    torchrun --nproc_per_node 2 exp6_trainer.py --seeds 42 43   # one seed per GPU (--parallel seeds)
    torchrun --nproc_per_node 2 exp6_trainer.py --parallel data # every batch split over both GPUs

Results: exp6_results/exp6_attention_comparison.json and two loss plots beside it; the trained models
in exp6_results/checkpoints/ (unless --no-save).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hardware import check_gpu_usable

if TYPE_CHECKING:
    from models.transformer import ModelBuilder

from experiment_config import (ATTENTION_BACKENDS, MOE_DISPATCHES, MUON_ADJUST_LR_FNS, OPTIMIZERS, PARALLEL_MODES,
                               PRECISIONS, PRESETS, ConfigError, ExperimentConfig)


FULL_DEFAULTS = PRESETS["full"](ExperimentConfig())
CPU_DEFAULTS = PRESETS["cpu"](ExperimentConfig())


def _number(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) and value >= 10_000 else str(value)


def _default(field: str) -> str:
    """'default 1000; CPU preset 300', read from the config and the CPU preset, never written out by hand."""
    full, cpu = getattr(FULL_DEFAULTS, field), getattr(CPU_DEFAULTS, field)
    if full == cpu:
        return f"default {_number(full)}, both presets"
    return f"default {_number(full)}; CPU preset {_number(cpu)}"


def build_parser() -> argparse.ArgumentParser:
    seeds = " ".join(str(s) for s in FULL_DEFAULTS.run_seeds)
    parser = argparse.ArgumentParser(
        description="Train the same small MoE language model once per attention arm (standard multi-head attention, "
                    "DeepSeek-V3 Multi-head Latent Attention and, with --arms, grouped-query and multi-query attention) "
                    "and compare validation loss, speed and cost.",
        epilog="With no arguments: the full experiment on a CUDA GPU, or the labelled CPU preset when there is none.",
    )
    parser.add_argument("--config", metavar="JSON", help="start from the settings in this file instead of a preset: a results "
                        "JSON (reruns its experiment), a saved model's config.json, or an object of settings; flags override it")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="full: the experiment as published (default on CUDA); "
                        "cpu: a scaled-down run that finishes in minutes on 2 cores (default without CUDA)")
    parser.add_argument("--steps", type=int, metavar="N", help=f"optimizer steps per model ({_default('max_steps')})")
    parser.add_argument("--batch-size", type=int, metavar="N", help=f"sequences per optimizer step ({_default('batch_size')})")
    parser.add_argument("--seq-len", type=int, metavar="N", help=f"tokens per training window ({_default('max_seq_len')})")
    parser.add_argument("--eval-every", type=int, metavar="N",
                        help=f"steps between validation passes ({_default('eval_every')}; never more than --steps)")
    parser.add_argument("--max-tokens", type=int, metavar="N",
                        help=f"tokens in the corpus, train + validation ({_default('max_tokens')})")
    parser.add_argument("--num-documents", type=int, metavar="N",
                        help=f"documents read from the corpus before tokenizing ({_default('num_documents')})")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                        help=f"train every arm once per seed, e.g. --seeds 42 43 44 (default {seeds})")
    parser.add_argument("--arms", nargs="+", metavar="ARM",
                        help=f"which attention arms to train: baseline (MHA, always), deepseek (MLA), gqa (grouped-query, "
                             f"--gqa-kv-heads K/V heads), mqa (multi-query, 1 K/V head); e.g. --arms baseline deepseek gqa mqa "
                             f"(default {' '.join(FULL_DEFAULTS.arms)})")
    parser.add_argument("--gqa-kv-heads", type=int, metavar="N",
                        help=f"K/V heads of the gqa arm; must divide the {FULL_DEFAULTS.n_heads} query heads "
                             f"({_default('gqa_kv_heads')})")
    parser.add_argument("--lr-sweep", nargs="*", type=float, metavar="M",
                        help="before the comparison, tune each arm's learning rates: a short run per multiplier M (scaling "
                             "both the Muon and the AdamW LR) on a seed not among --seeds, keeping each arm's best by its "
                             "loss on the tuning set (carved from the end of the training tokens; never the validation set) "
                             f"(default multipliers {' '.join(map(str, FULL_DEFAULTS.lr_sweep_multipliers))}, e.g. --lr-sweep 0.5 1 2)")
    parser.add_argument("--lr-sweep-steps", type=int, metavar="N",
                        help="optimizer steps per sweep run (default --steps / 4)")
    parser.add_argument("--lr-sweep-seed", type=int, metavar="SEED",
                        help="the sweep runs' seed; must not be one of --seeds (default: one above the largest of --seeds)")
    parser.add_argument("--tuning-fraction", type=float, metavar="F",
                        help=f"with --lr-sweep: this fraction of all tokens, just before the validation set, is the tuning "
                             f"set the sweep selects on; nothing trains on it ({_default('tuning_fraction')}; without "
                             "--lr-sweep these tokens train)")
    parser.add_argument("--device", help=f"auto, cpu, cuda or cuda:N (default {FULL_DEFAULTS.device})")
    parser.add_argument("--attention-backend", choices=ATTENTION_BACKENDS,
                        help="kernel for the MLA model: auto (flash-attn if installed, else SDPA), flash-attn, sdpa, eager "
                             f"(default {FULL_DEFAULTS.attention_backend})")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help=f"default {FULL_DEFAULTS.precision}; auto: bf16 autocast on CUDA, fp32 on CPU; "
                             "bf16 on CPU rehearses the GPU's mixed precision")
    parser.add_argument("--moe-dispatch", choices=MOE_DISPATCHES,
                        help=f"how tokens reach their experts (default {FULL_DEFAULTS.moe_dispatch}): auto picks grouped_mm where it runs as one fused "
                             "kernel (sm90+ in bf16, or CPU) and the one-sync sorted split elsewhere (e.g. RTX 4090, A100); "
                             "loop is the public version's per-expert mask loop")
    parser.add_argument("--optimizer", choices=OPTIMIZERS,
                        help=f"default {FULL_DEFAULTS.optimizer}: Muon on every logical matrix of the blocks (Q, K, V, O, MLA's "
                             "latent/rope-key/k_nope/v parts, router, experts) + AdamW for the embedding and norms; "
                             "adamw: AdamW only, a control run (norms and the embedding are never weight-decayed)")
    parser.add_argument("--muon-adjust-lr-fn", choices=MUON_ADJUST_LR_FNS,
                        help=f"Muon's LR factor per block, torch.optim.Muon's adjust_lr_fn (default {FULL_DEFAULTS.muon_adjust_lr_fn}): "
                             "original = sqrt(max(1, rows/cols)), so MLA's q_b_proj gets x1.73 and its k_nope and v x1.41 "
                             "while MHA/GQA/MQA attention gets x1; match_rms_adamw = 0.2 * sqrt(max(rows, cols))")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (CUDA, or CPU with --precision bf16; "
                        "off by default because its speed-up has not been measured on a GPU yet)")
    parser.add_argument("--compile-optimizer", action="store_true",
                        help="torch.compile Muon's batched update as well (its LR then lives on the device)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="capture the whole training step in one CUDA graph and replay it: one launch per step; needs "
                             "static shapes, i.e. the fused grouped_mm MoE (sm90+ in bf16), one process per run")
    parser.add_argument("--data", metavar="PATH", help="your own .txt, .jsonl or .parquet file instead of the Hub corpus")
    parser.add_argument("--offline", action="store_true", help="do not contact the Hub: use the built-in offline corpus (or your --data file) "
                        "with a tokenizer trained on it")
    parser.add_argument("--output-dir", help=f"where the JSON and plots go (default {FULL_DEFAULTS.output_dir}); "
                        "one run at a time per folder")
    parser.add_argument("--cache-dir", help=f"where tokenized data is cached (default {FULL_DEFAULTS.cache_dir})")
    parser.add_argument("--parallel", choices=PARALLEL_MODES,
                        help="under torchrun (several processes): seeds = each rank trains whole seeds (every arm), rank 0 "
                             "gathers the results; data = every run trained by all ranks with DistributedDataParallel, the "
                             "global --batch-size split over them; auto = seeds when there are at least as many seeds as "
                             f"ranks, else data (default {FULL_DEFAULTS.parallel}; ignored by a single process)")
    parser.add_argument("--dist-timeout", type=float, metavar="MIN",
                        help="under torchrun: minutes a rank waits for the others in one collective before the job stops "
                             f"(default {FULL_DEFAULTS.dist_timeout_minutes:g}; raise it when one model's run takes longer)")
    parser.add_argument("--no-save", action="store_true", help="do not save the trained models (by default each completed "
                        "run saves its weights, config and tokenizer to OUTPUT_DIR/checkpoints/<model>-seed<seed>/)")
    return parser


def config_from_args(args: argparse.Namespace, cuda_available: bool) -> tuple[ExperimentConfig, str | None]:
    """The config the arguments ask for, and a one-line notice when the CPU preset was chosen for the user."""
    notice = None
    preset = args.preset
    wants_cuda = args.device in (None, "auto") and cuda_available or (args.device or "").startswith("cuda")
    if args.config is not None:
        if preset is not None:
            raise ConfigError("--config and --preset together: the config file already holds every setting; drop one")
        config = load_config_file(args.config)
    elif preset is None:
        preset = "full" if wants_cuda else "cpu"
        if preset == "cpu":
            notice = ("No CUDA GPU: running the CPU preset (a scaled-down model, a few minutes); "
                      "the full experiment needs a GPU (force it with --preset full --device cpu).")
    if args.config is None:
        config = PRESETS[preset or "full"](ExperimentConfig())
    overrides = {
        "max_steps": args.steps, "batch_size": args.batch_size, "max_seq_len": args.seq_len,
        "eval_every": args.eval_every, "max_tokens": args.max_tokens, "num_documents": args.num_documents,
        "device": args.device, "attention_backend": args.attention_backend, "data_path": args.data,
        "output_dir": args.output_dir, "cache_dir": args.cache_dir, "seeds": tuple(args.seeds) if args.seeds else None,
        "offline": args.offline or None, "compile": args.compile or None,
        "save_checkpoints": False if args.no_save else None,
        "arms": tuple(args.arms) if args.arms else None, "gqa_kv_heads": args.gqa_kv_heads,
        "precision": args.precision, "moe_dispatch": args.moe_dispatch, "optimizer": args.optimizer,
        "muon_adjust_lr_fn": args.muon_adjust_lr_fn, "compile_optimizer": args.compile_optimizer or None,
        "cuda_graph": args.cuda_graph or None,
        "lr_sweep": True if args.lr_sweep is not None else None,
        "lr_sweep_multipliers": tuple(args.lr_sweep) if args.lr_sweep else None,
        "lr_sweep_steps": args.lr_sweep_steps, "lr_sweep_seed": args.lr_sweep_seed,
        "tuning_fraction": args.tuning_fraction,
        "parallel": args.parallel, "dist_timeout_minutes": args.dist_timeout,
    }
    config = config.replace(**{k: v for k, v in overrides.items() if v is not None})
    if args.eval_every is None and args.steps is not None:
        config = config.replace(eval_every=min(config.eval_every, config.max_steps))
    return config, notice


def load_config_file(path: str) -> ExperimentConfig:
    """The config in a JSON file: a results file (its experiment.config), a saved model's config.json (its
    "config" entry), or a plain object of ExperimentConfig settings; settings it lacks take their defaults."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"--config {path}: cannot read it as JSON ({error}); give a results JSON or a config.json") from None
    if isinstance(values, dict) and isinstance(values.get("experiment"), dict):  # a results file
        values = values["experiment"].get("config")
    elif isinstance(values, dict) and isinstance(values.get("config"), dict):  # a saved model's config.json
        values = values["config"]
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of settings")
    try:
        return ExperimentConfig.from_dict(values)
    except ConfigError as error:
        raise ConfigError(f"--config {path}: {error}") from None
    except TypeError as error:
        raise ConfigError(f"--config {path}: {error}") from None


def main(argv: list[str] | None = None, builders: dict[str, ModelBuilder] | None = None) -> int:
    """The command line: run the experiment, report errors in one line, return the exit status.
    `builders`: the arms' model classes, when not the registry's (tests inject faults through it)."""
    args = build_parser().parse_args(argv)
    from training.distributed import RankFailed, SharedConfigError, launch_from_env  # after argparse: --help is instant
    from training.experiment import run_experiment
    from training.results import RESULTS_FILE
    from training.run_guard import RunTerminated

    saved = ""
    rank = 0
    try:
        rank = launch_from_env().rank  # under torchrun, rank 0 speaks for the job
        config, notice = config_from_args(args, torch.cuda.is_available())
        check_gpu_usable(config.device)  # a GPU that PyTorch cannot use is named before the CPU preset's notice
        saved = f"; any runs that finished are in {Path(config.output_dir) / RESULTS_FILE}"
        if notice and rank == 0:
            print(notice)
        run_experiment(config, builders)
    except ConfigError as error:  # every rank stops; one that alone hit its error says so itself
        if rank == 0 or not isinstance(error, SharedConfigError):
            print(f"error: {f'rank {rank}: ' if rank else ''}{error}", file=sys.stderr)
        return 2
    except RankFailed as failure:  # the failing rank prints its own traceback; rank 0 says what happened
        if rank == 0:
            print(f"error: {failure}", file=sys.stderr)
        return 1
    except RunTerminated:  # SIGTERM, turned into an exception by run_experiment: 128 + 15, as the shell reports it
        if rank == 0:
            print(f"Stopped by SIGTERM{saved}.", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        if rank == 0:
            print(f"Stopped by Ctrl-C{saved}.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
