"""The model card (README.md) each saved model folder gets: what the model is, how it was trained, what it scored.

It follows the Hugging Face model-card format, so the Hub and every tool that reads cards understand it: YAML front
matter (`library_name`, `tags`, the dataset, a `model-index` with the validation metrics), then the text. The
numbers are the run record's, and the command it gives is the trainer's own command line, so a reader can rerun
the model from the card alone (tests/test_model_card.py checks both).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from arms.registry import ARMS, arm_label
from config.settings import BASELINE, ExperimentConfig

CARD_FILE = "README.md"
KEY_SETTINGS = (  # (setting, what it is), shown in the card's table; the whole config is in config.json
    ("d_model", "width"), ("n_layers", "blocks"), ("n_heads", "attention heads"), ("num_experts", "MoE experts"),
    ("expert_top_k", "experts per token"), ("d_ff", "expert hidden width"), ("max_seq_len", "context (training window)"),
    ("vocab_size", "vocabulary"), ("max_steps", "optimizer steps"), ("batch_size", "sequences per step"),
    ("optimizer", "optimizer"), ("precision", "precision setting"), ("preset", "preset"),
)


@dataclass(frozen=True)
class CardFacts:
    """What a card says about one saved run, gathered by training/run_outputs.py when it saves the model."""

    name: str  # the run's name in the results (the arm, or a study's point such as "deepseek-r32")
    arm: str  # its arm in the registry
    seed: int
    folder: str  # the saved folder as the experiment named it (relative to where it ran)
    config: ExperimentConfig  # the config the model was built and trained with
    record: Mapping[str, Any]  # the run's record: val_loss, val_accuracy, val_perplexity, tokens_seen, LRs, ...
    data: Mapping[str, Any]  # TokenData.info: corpus_description, total_tokens, tokenizer, offline, ...
    validation: str  # what the validation set is (training/provenance.py: validation_line)
    git_commit: str | None = None
    loads_with_transformers: bool = False  # the folder holds the config and code AutoModelForCausalLM needs


def model_card(facts: CardFacts) -> str:
    """The card's whole text: front matter, then the model, the data, the result and how to reproduce it."""
    return f"---\n{yaml.safe_dump(front_matter(facts), sort_keys=False, allow_unicode=True)}---\n\n{body(facts)}"


def dataset_id(facts: CardFacts) -> str | None:
    """The Hub dataset the model was trained on; None for the offline corpus or a local file."""
    if facts.data.get("offline") or facts.config.data_path:
        return None
    return facts.config.dataset_name


def front_matter(facts: CardFacts) -> dict[str, Any]:
    """The YAML header: library, tags, dataset and the validation metrics as a model-index."""
    arm = ARMS.get(facts.arm)  # None for a model built by builders the registry does not hold
    tags = ["exp6", facts.arm, *(arm.hub_tags if arm else ()), "mixture-of-experts", "custom_code"]
    hub_dataset = dataset_id(facts)
    dataset: dict[str, Any] = {"name": str(facts.data.get("corpus_description")), "type": hub_dataset or "offline",
                               "split": "validation"}
    if hub_dataset:
        dataset["config"] = facts.config.dataset_config
    metrics = [{"type": "loss", "value": facts.record.get("val_loss"), "name": f"Validation loss (seed {facts.seed})"},
               {"type": "perplexity", "value": facts.record.get("val_perplexity"),
                "name": f"Validation perplexity (seed {facts.seed})"},
               {"type": "accuracy", "value": facts.record.get("val_accuracy"),
                "name": f"Next-token accuracy (seed {facts.seed})"}]
    header: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation",
                              "tags": tags}
    if hub_dataset:
        header["datasets"] = [hub_dataset]
    header["model-index"] = [{"name": f"{facts.name}-seed{facts.seed}", "results": [{
        "task": {"type": "text-generation", "name": "Causal language modeling"},
        "dataset": dataset, "metrics": metrics}]}]
    return header


def reproduce_command(facts: CardFacts) -> str:
    """The command line that trains this model again from its folder's config.json: this arm, this seed, the
    data the run really used (--offline when it fell back to the offline corpus), into a fresh output folder.
    A study's point is reproduced by rerunning its study (the trainer would train the arm at the study's config)."""
    config_file = f"{facts.folder.rstrip('/')}/config.json"
    words = ["python", "-m", "training.study"] if facts.config.studies else ["python", "exp6_trainer.py"]
    words += ["--config", config_file]
    if not facts.config.studies:  # the baseline always trains: every comparison pairs with it
        words += ["--arms", *dict.fromkeys((BASELINE, facts.arm))]
    words += ["--seeds", str(facts.seed)]
    if facts.data.get("offline") and not facts.config.offline:
        words.append("--offline")
    words += ["--output-dir", f"{facts.config.output_dir.rstrip('/')}-reproduced"]
    return shlex.join(words)


def data_line(data: Mapping[str, Any]) -> str:
    """The data line the experiment prints (data/dataset.py), without the machine's cache path."""
    return (f"Data: {data.get('corpus_description')}, {data.get('total_tokens', 0):,} tokens, "
            f"tokenizer {data.get('tokenizer')}")


def _number(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "n/a"


def settings_table(config: ExperimentConfig, arm: str) -> list[str]:
    """The shared key settings, then those that size the arm's own attention (Arm.settings)."""
    spec = ARMS.get(arm)
    names = [*KEY_SETTINGS, *(spec.settings if spec else ())]
    rows = ["| setting | value | what it is |", "| --- | --- | --- |"]
    rows += [f"| `{name}` | {getattr(config, name)} | {what} |" for name, what in names]
    return rows


def body(facts: CardFacts) -> str:
    """The card's text below the front matter."""
    record, config = facts.record, facts.config
    label = arm_label(facts.arm, config)
    lines = [
        f"# {facts.name}-seed{facts.seed}: {label} in a small MoE language model",
        "",
        f"One model of the exp6 experiment (\"does DeepSeek-V3 MLA beat multi-head attention in a small MoE LM?\"): "
        f"the shared MoE language model with **{label}** attention (arm `{facts.arm}`), trained from scratch with "
        f"seed {facts.seed}. A research model for comparing attention mechanisms, small and briefly trained: not for "
        "use as a language model.",
        "",
        "## Result",
        "",
        f"- Validation loss: **{_number(record.get('val_loss'))}** (mean cross-entropy per token, nats; seed "
        f"{facts.seed}); perplexity {_number(record.get('val_perplexity'), 2)}, next-token accuracy "
        f"{_number(record.get('val_accuracy'))}.",
        f"- What was validated: {facts.validation}.",
        f"- Trained on {record.get('tokens_seen', 0):,} tokens in {config.max_steps:,} steps, precision "
        f"{record.get('precision', 'n/a')}, Muon LR {record.get('muon_lr', config.muon_lr)}, AdamW LR "
        f"{record.get('adamw_lr', config.adamw_lr)}.",
        "",
        "## Data",
        "",
        data_line(facts.data),
        "",
        f"Split: {facts.data.get('split', 'n/a')}.",
    ]
    if facts.data.get("offline"):
        lines += ["", "The run used the offline corpus (no Hugging Face Hub): its results test the pipeline, not "
                      "web-text quality."]
    lines += ["", "## Configuration", "", f"The whole `ExperimentConfig` is `config` in this folder's `config.json`; "
                                          "the key settings:", ""]
    lines += settings_table(config, facts.arm)
    lines += ["", "## Reproduce", "", "From the root of the exp6 project, with this folder at the path it was saved to:",
              "", "```bash", reproduce_command(facts), "```", ""]
    if not config.studies:
        lines += ["It trains the baseline too (every comparison pairs with it). On the same device and precision "
                  "the same seed gives the same batches and initial weights; on a GPU the last digits of the loss may "
                  "differ (bf16 and non-deterministic kernels).", ""]
    if facts.git_commit:
        lines += [f"Trained at commit `{facts.git_commit}`.", ""]
    lines += ["## Use", ""]
    if facts.loads_with_transformers:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)",
                  "tokenizer = AutoTokenizer.from_pretrained(FOLDER)", "```", ""]
    lines += ["In the exp6 project: `python -m inference.generate --checkpoint FOLDER --prompt \"The\"`, or "
              "`models.checkpoint.load_checkpoint(FOLDER, arm_builders())`. See docs/inference.md and "
              "docs/evaluation.md (lm-evaluation-harness)."]
    return "\n".join(lines) + "\n"
