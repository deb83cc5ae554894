"""Compare DeepSeek-V3 MLA (via FlashAttention-2) with standard multi-head attention in one MoE LM.

    python exp6_trainer.py            # the full experiment on a CUDA GPU; the CPU preset without one

Results: exp6_results/exp6_attention_comparison.json and two loss plots beside it.
"""

from __future__ import annotations

import argparse
import sys

import torch

from experiment_config import ATTENTION_BACKENDS, MOE_DISPATCHES, PRECISIONS, PRESETS, ConfigError, ExperimentConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train the same small MoE language model twice, once with standard multi-head attention and "
                    "once with DeepSeek-V3 Multi-head Latent Attention, and compare validation loss, speed and cost.",
        epilog="With no arguments: the full experiment on a CUDA GPU, or the labelled CPU preset when there is none.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="full: the experiment as published (default on CUDA); "
                        "cpu: a scaled-down run that finishes in minutes on 2 cores (default without CUDA)")
    parser.add_argument("--steps", type=int, help="optimizer steps per model (max_steps)")
    parser.add_argument("--batch-size", type=int, help="sequences per optimizer step")
    parser.add_argument("--seq-len", type=int, help="tokens per training window (max_seq_len)")
    parser.add_argument("--eval-every", type=int, help="steps between validation passes")
    parser.add_argument("--max-tokens", type=int, help="tokens in the corpus (train + validation)")
    parser.add_argument("--num-documents", type=int, help="documents read from the corpus before tokenizing")
    parser.add_argument("--seeds", type=int, nargs="+", help="train both models once per seed, e.g. --seeds 42 43 44")
    parser.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--attention-backend", choices=ATTENTION_BACKENDS,
                        help="kernel for the MLA model: auto (flash-attn if installed, else SDPA), flash-attn, sdpa, eager")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="auto (default): bf16 autocast on CUDA, fp32 on CPU; bf16 on CPU rehearses the GPU's mixed precision")
    parser.add_argument("--moe-dispatch", choices=MOE_DISPATCHES,
                        help="how tokens reach their experts: auto (default) picks grouped_mm where it runs as one fused "
                             "kernel (sm90+ in bf16, or CPU) and the one-sync sorted split elsewhere (e.g. RTX 4090, A100); "
                             "loop is the public version's per-expert mask loop")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (CUDA, or CPU with --precision bf16; "
                        "off by default because its speed-up has not been measured on a GPU yet)")
    parser.add_argument("--data", metavar="PATH", help="your own .txt, .jsonl or .parquet file instead of the Hub corpus")
    parser.add_argument("--offline", action="store_true", help="do not contact the Hub: use the built-in offline corpus (or your --data file) "
                        "with a tokenizer trained on it")
    parser.add_argument("--output-dir", help="where the JSON and plots go (default exp6_results)")
    parser.add_argument("--cache-dir", help="where tokenized data is cached (default data_cache)")
    return parser


def config_from_args(args: argparse.Namespace, cuda_available: bool) -> tuple[ExperimentConfig, str | None]:
    """The config the arguments ask for, and a one-line notice when the CPU preset was chosen for the user."""
    notice = None
    preset = args.preset
    wants_cuda = args.device in (None, "auto") and cuda_available or (args.device or "").startswith("cuda")
    if preset is None:
        preset = "full" if wants_cuda else "cpu"
        if preset == "cpu":
            notice = ("No CUDA GPU: running the CPU preset (a scaled-down model, a few minutes); "
                      "the full experiment needs a GPU (force it with --preset full --device cpu).")
    config = PRESETS[preset](ExperimentConfig())
    overrides = {
        "max_steps": args.steps, "batch_size": args.batch_size, "max_seq_len": args.seq_len,
        "eval_every": args.eval_every, "max_tokens": args.max_tokens, "num_documents": args.num_documents,
        "device": args.device, "attention_backend": args.attention_backend, "data_path": args.data,
        "output_dir": args.output_dir, "cache_dir": args.cache_dir, "seeds": tuple(args.seeds) if args.seeds else None,
        "offline": args.offline or None, "compile": args.compile or None,
        "precision": args.precision, "moe_dispatch": args.moe_dispatch,
    }
    config = config.replace(**{k: v for k, v in overrides.items() if v is not None})
    if args.eval_every is None and args.steps is not None:
        config = config.replace(eval_every=min(config.eval_every, config.max_steps))
    return config, notice


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from training.experiment import run_experiment  # after argparse, so --help is instant

    try:
        config, notice = config_from_args(args, torch.cuda.is_available())
        if notice:
            print(notice)
        run_experiment(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Stopped by Ctrl-C.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
