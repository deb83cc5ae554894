"""What a completed run leaves besides its record: a short greedy sample for the JSON and its saved model, with
its model card (README.md, training/model_card.py).

Both come after the run's record is saved, and a failure in either is recorded in the run (`sample_error`,
`checkpoint_error`), never fatal: the run's results matter more than its sample or its weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from common.atomic_files import atomic_directory, write_atomic
from common.hardware import resolve_precision
from config.settings import ExperimentConfig
from data.dataset import TokenData, validation_windows
from data.tokenizer import save_tokenizer
from inference.generate import cache_mode_for, generate_text
from models.checkpoint import read_config, run_checkpoint_dir, save_checkpoint
from models.transformer import MoELanguageModel
from training.model_card import CARD_FILE, CardFacts, model_card
from training.provenance import git_commit, validation_line

SAVED_METRICS = ("val_loss", "val_accuracy", "val_perplexity", "tokens_seen", "precision")  # into config.json's extra


def add_extras(model: MoELanguageModel, name: str, arm: str, seed: int, record: dict[str, Any], data: TokenData,
               config: ExperimentConfig, device: torch.device) -> None:
    """The greedy sample and the saved model of a completed run (`name`: its name in the results, a study's
    point such as "deepseek-r32"; `arm`: its arm in the registry, which the saved model records so that it
    loads again), after its record is saved: a failure in either is recorded in the run (`sample_error`,
    `checkpoint_error`) and never drops the run or stops the experiment."""
    if config.sample_tokens > 0:
        try:
            record["sample"] = greedy_sample(model, data, config, device)
        except Exception as error:  # noqa: BLE001 - out of memory, a tokenizer problem, ...: the run stands
            record["sample_error"] = f"{type(error).__name__}: {error}"
    if config.save_checkpoints:
        save_run_checkpoint(model, name, arm, seed, record, data, config)


def greedy_sample(model: MoELanguageModel, data: TokenData, config: ExperimentConfig,
                  device: torch.device) -> dict[str, Any]:
    """A short greedy continuation of config.sample_prompt with the model's own KV cache, for the JSON."""
    if data.tokenizer is None:
        return {"prompt": config.sample_prompt, "text": None, "note": "no tokenizer loaded on this machine"}
    text, ids = generate_text(model, data.tokenizer, config.sample_prompt, config.sample_tokens,
                              precision=resolve_precision(config.precision, device))
    return {"prompt": config.sample_prompt, "text": text, "tokens": len(ids),
            "decoding": decoding_words(cache_mode_for(model, 'auto'))}


def save_run_checkpoint(model: MoELanguageModel, name: str, arm: str, seed: int, record: dict[str, Any],
                        data: TokenData, config: ExperimentConfig) -> None:
    """Save a completed run's model, config and tokenizer to OUTPUT_DIR/checkpoints/<name>-seed<seed>/ and
    note it in `record["checkpoint"]`. The folder appears whole or not at all (built beside it, then renamed).
    A failure is recorded (`checkpoint_error`, with `checkpoint_directory`), never raised."""
    directory = run_checkpoint_dir(Path(config.output_dir), name, seed)
    try:
        with atomic_directory(directory) as staging:  # a save cut short leaves no half folder
            # a Hub tokenizer that is not in the local cache is saved as its name alone
            tokenizer = save_tokenizer(data.tokenizer or config.tokenizer_name, staging)
            extra = {"seed": seed, "tokenizer": tokenizer, "data": data.info.get("corpus_description"),
                     "data_offline": data.info.get("offline"), **{key: record.get(key) for key in SAVED_METRICS}}
            save_checkpoint(model, arm, staging, extra)
            files = {path.name: path.stat().st_size for path in sorted(staging.iterdir())}  # model, code, tokenizer
            files[CARD_FILE] = write_card(model, name, arm, seed, record, data, directory, staging)
    except Exception as error:  # noqa: BLE001 - disk full, permissions, ...: keep the results, say so, go on
        record.update(checkpoint_error=f"{type(error).__name__}: {error}", checkpoint_directory=str(directory))
        return
    record["checkpoint"] = {"directory": str(directory), "bytes": sum(files.values()), "files": files}


def write_card(model: MoELanguageModel, name: str, arm: str, seed: int, record: dict[str, Any], data: TokenData,
               directory: Path, staging: Path) -> int:
    """Write the model card (training/model_card.py) beside the config.json just saved in `staging`, from the
    run's record and data; returns its size in bytes."""
    config, saved = model.config, read_config(staging)
    windows = len(validation_windows(data.val, config.max_seq_len)[0])
    facts = CardFacts(name=name, arm=arm, seed=seed, folder=str(directory), config=config,
                      record=record, data=data.info, validation=validation_line(config, data, windows),
                      git_commit=git_commit(), loads_with_transformers="auto_map" in saved)
    text = model_card(facts).encode("utf-8")
    write_atomic(staging / CARD_FILE, lambda file: file.write(text))
    return len(text)


def decoding_words(mode: str) -> str:
    """How the sample was decoded, for the JSON."""
    return f"greedy, {mode} cache" if mode != "none" else "greedy, no cache (the arm has no cached decode path)"
