"""Text from a saved model: `python -m inference.generate --checkpoint DIR --prompt TEXT`.

DIR is one saved model (a folder with config.json and model.safetensors) or a results folder, in
which case each arm's model generates from the same prompt with the same seed, one after the other.
The text streams as it is generated. `--cache none` recomputes the whole prefix at every step (the
reference); `kv`/`expanded` cache every K/V head's keys and values (GQA and MQA hold fewer heads), `latent`
only MLA's latent and rotary key (DeepSeek's absorbed decoding); `auto` takes each arm's own compact cache
(MHA, GQA, MQA: kv; MLA: latent).
Greedy decoding gives the same tokens with every cache.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from arms.registry import ARM_NAMES, arm_builders
from common.errors import ConfigError, one_line
from common.hardware import autocast, resolve_device
from config.settings import MAX_SEED, ExperimentConfig
from config.values import check_parsed_values
from data.tokenizer import TextTokenizer, TokenizerError, load_tokenizer
from models.checkpoint import CHECKPOINTS_DIR, CONFIG_FILE, CheckpointError, load_checkpoint, run_checkpoint_dir
from models.costs import parameter_count
from models.memory import MemoryNeed, check_fits, decode_cache_bytes, inference_activation_bytes
from models.transformer import MoELanguageModel

CACHE_CHOICES = ("auto", "none", "kv", "expanded", "latent")


@dataclass(frozen=True)
class Sampling:
    """Greedy (argmax) when temperature is 0; else softmax(logits / temperature) over the top_k tokens."""

    temperature: float = 0.0
    top_k: int | None = None

    def pick(self, logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """logits (batch, vocab) -> next token ids (batch,)."""
        if self.temperature <= 0:
            return logits.argmax(dim=-1)
        scaled = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < scaled.shape[-1]:
            kth = scaled.topk(self.top_k, dim=-1).values[..., -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = scaled.softmax(dim=-1)
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def cache_mode_for(model: MoELanguageModel, requested: str) -> str:
    """The cache this model uses for `requested`: none, its own default (auto), or the nearest it has.

    MHA has one cache (per-head K/V), which is what kv, expanded and latent all come to for it;
    for MLA, kv means the per-head (expanded) cache. An attention with no cached decode path always
    decodes with none (no_cache_line says so).
    """
    modes = model.cache_modes()
    if not modes:
        return "none"
    if requested in ("none", *modes):
        return requested
    if requested == "auto":
        return modes[0]
    return "expanded" if "expanded" in modes else modes[0]


@torch.no_grad()
def generate_ids(model: MoELanguageModel, prompt_ids: list[int], max_new_tokens: int, cache_mode: str = "auto",
                 sampling: Sampling = Sampling(), seed: int = 0, precision: str = "fp32") -> Iterator[int]:
    """Yield up to max_new_tokens new token ids after prompt_ids, one at a time."""
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token")
    model.eval()
    device = model.embed.weight.device
    generator = torch.Generator().manual_seed(seed)
    mode = cache_mode_for(model, cache_mode)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    caches = None if mode == "none" else model.new_caches(mode, capacity=len(prompt_ids) + max_new_tokens)
    with autocast(device, precision):
        logits, _ = model(ids, caches, last_only=True)
        for _ in range(max_new_tokens):
            next_id = sampling.pick(logits[:, -1], generator)
            yield int(next_id.item())
            if caches is None:
                ids = torch.cat([ids, next_id[:, None]], dim=1)
                logits, _ = model(ids, last_only=True)
            else:
                logits, _ = model(next_id[:, None], caches)


def generate_text(model: MoELanguageModel, tokenizer: TextTokenizer, prompt: str, max_new_tokens: int,
                  cache_mode: str = "auto", sampling: Sampling = Sampling(), seed: int = 0, precision: str = "fp32",
                  on_text: Callable[[str], None] | None = None) -> tuple[str, list[int]]:
    """The generated text (prompt excluded) and its token ids; on_text receives each new piece as it comes."""
    prompt_ids = tokenizer.encode(prompt)
    new_ids: list[int] = []
    shown = ""
    for token in generate_ids(model, prompt_ids, max_new_tokens, cache_mode, sampling, seed, precision):
        new_ids.append(token)
        text = tokenizer.decode(new_ids)
        if on_text is not None and text.startswith(shown) and len(text) > len(shown):
            on_text(text[len(shown):])  # byte-level tokens can end mid-character: show only complete text
            shown = text
        if tokenizer.eos_token_id is not None and token == tokenizer.eos_token_id:
            break
    text = tokenizer.decode(new_ids)
    if on_text is not None and text.startswith(shown) and len(text) > len(shown):
        on_text(text[len(shown):])
    return text, new_ids


def no_cache_line(arm: str, model: MoELanguageModel, requested: str) -> str | None:
    """The one line that says an arm has no cached decode path when a cache was asked for; None otherwise."""
    if model.cache_modes() or requested == "none":
        return None
    return f"{arm}: no cached decode path; every token recomputes the whole prefix (--cache {requested} ignored)"


def find_checkpoints(path: Path, run_seed: int | None = None) -> list[Path]:
    """The model folders under `path`: itself if it is one, else one per arm of a results folder
    (its checkpoints/<arm>-seed<seed>/; the lowest seed unless run_seed is given)."""
    if (path / CONFIG_FILE).is_file():
        return [path]
    root = path / CHECKPOINTS_DIR
    if not root.is_dir():
        raise ConfigError(f"--checkpoint {path}: neither a saved model (no {CONFIG_FILE}) nor a results folder "
                          f"(no {CHECKPOINTS_DIR}/); give the folder a training run wrote (default exp6_results)")
    found: list[Path] = []
    for arm in ARM_NAMES:
        names = (re.fullmatch(rf"{arm}-seed(-?\d+)", d.name) for d in root.iterdir() if (d / CONFIG_FILE).is_file())
        seeds = sorted(int(m.group(1)) for m in names if m and (run_seed is None or int(m.group(1)) == run_seed))
        if seeds:
            found.append(run_checkpoint_dir(path, arm, seeds[0]))
    if not found:
        which = f" for seed {run_seed}" if run_seed is not None else ""
        raise ConfigError(f"--checkpoint {path}: no saved model{which} in {root}; train without --no-save first")
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m inference.generate",
        description="Generate text from saved models: one model folder, or every arm's model of a results folder.")
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a saved model folder, or a results folder (e.g. exp6_results) for every arm's model")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="always take the most likely token (the default)")
    mode.add_argument("--temperature", type=float, help="sample from softmax(logits / T) instead of greedy")
    parser.add_argument("--top-k", type=int, help="with --temperature: sample among the k most likely tokens only")
    parser.add_argument("--cache", choices=CACHE_CHOICES, default="auto",
                        help="auto (default): MHA caches K/V, MLA its latent; none: recompute the prefix each step; "
                             "kv/expanded: per-head K and V; latent: MLA's latent and rotary key")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every model (default 0)")
    parser.add_argument("--run-seed", type=int, help="in a results folder, the training seed whose models to use "
                                                     "(default: the lowest saved)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Every flag's value makes sense (ConfigError naming the flag otherwise), before any file is read."""
    check_parsed_values(args)  # integers in int64, floats finite, text non-empty: every flag
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature > 0):
        raise ConfigError(f"--temperature {args.temperature}: must be a positive finite number (or use --greedy)")
    if args.top_k is not None and (args.top_k < 1 or args.temperature is None):
        raise ConfigError("--top-k needs --temperature and must be at least 1")
    for flag, seed in (("--seed", args.seed), ("--run-seed", args.run_seed)):
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"{flag} {seed}: must be between 0 and 2**63 - 1")


def generation_memory(models: list[MoELanguageModel], prompt_tokens: list[int], max_new_tokens: int,
                      cache: str) -> MemoryNeed:
    """Every loaded model's weights, and the largest one's decode: its KV cache for prompt + new tokens and
    the prefill's activations, or (--cache none) the activations of recomputing the whole prefix."""
    weights = sum(parameter_count(model) * next(model.parameters()).element_size() for model in models)
    caches, activations = [], []
    for model, prompt in zip(models, prompt_tokens, strict=True):
        mode = cache_mode_for(model, cache)
        tokens = prompt + max_new_tokens
        caches.append(0 if mode == "none" else decode_cache_bytes(model, mode, tokens))
        activations.append(inference_activation_bytes(model, 1, tokens if mode == "none" else prompt))
    return MemoryNeed(device={"weights": weights, "KV cache": max(caches), "activations": max(activations)})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
        device = resolve_device(ExperimentConfig(device=args.device).validate().device)
        sampling = Sampling(args.temperature or 0.0, args.top_k)
        folders = find_checkpoints(Path(args.checkpoint), args.run_seed)
        loaded = [load_checkpoint(folder, arm_builders(), device) for folder in folders]
        tokenizers = [load_tokenizer(ckpt.tokenizer_spec(), ckpt.directory) for ckpt in loaded]
        prompt_tokens = [len(tokenizer.encode(args.prompt)) for tokenizer in tokenizers]
        if min(prompt_tokens) < 1:
            raise ConfigError(f"--prompt {args.prompt!r:.40}: the tokenizer makes no token of it; give some text")
        check_fits(generation_memory([ckpt.model for ckpt in loaded], prompt_tokens, args.max_new_tokens, args.cache),
                   device, "lower --max-new-tokens, or use a cache (--cache auto) instead of --cache none")
    except (ConfigError, CheckpointError, TokenizerError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    how = "greedy" if sampling.temperature <= 0 else f"temperature {sampling.temperature}, top-k {sampling.top_k}"
    for ckpt, tokenizer in zip(loaded, tokenizers, strict=True):
        mode = cache_mode_for(ckpt.model, args.cache)
        if (note := no_cache_line(ckpt.arm, ckpt.model, args.cache)) is not None:
            print(note)
        print(f"== {ckpt.arm} ({ckpt.directory}; {how}, cache {mode}, seed {args.seed}) ==")
        print(args.prompt, end="", flush=True)
        generate_text(ckpt.model, tokenizer, args.prompt, args.max_new_tokens, mode, sampling, args.seed,
                      on_text=lambda piece: print(piece, end="", flush=True))
        print("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
