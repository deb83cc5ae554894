"""A local lm-evaluation-harness task over a run's own validation text, so a saved model is evaluated offline:

    python -m training.lm_eval_task exp6_results --out lm_eval_tasks
    lm_eval --model hf --model_args pretrained=exp6_results/checkpoints/deepseek-seed42,trust_remote_code=True \\
        --include_path lm_eval_tasks --tasks exp6_validation

The source is a results folder, its results JSON or one saved model folder. The run's data is loaded again as the
run loaded it (data/dataset.py: the token cache, or the same corpus built again; the offline corpus when the run fell
back to it), checked against what the run recorded (its data fingerprint when the results JSON is at hand), and the
validation part (the last val_fraction of the tokens) is written out:

- by default as its documents: the validation tokens cut at the EOS tokens that separate documents (the first is
  the tail of a document that began in the training part, the last may be cut by --max-tokens), each decoded to
  text, empty ones dropped. lm-eval scores each document alone (`loglikelihood_rolling`), the first token predicted
  from its prefix token (EOS for our tokenizers, which is what precedes every document in training).
- with --stream as one document: exactly the tokens the run's validation windows predict, val[1 : n * L + 1], with
  `prefix_token_id=val[0]` for lm-eval, so that lm-eval's windows are the run's windows and its loss per token is
  the run's val_loss.

How lm-eval's numbers relate to ours is in docs/evaluation.md and in the `relation` of the manifest written beside
the task; tests/test_lm_eval.py checks it with lm-eval itself.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.atomic_files import write_atomic
from common.errors import ConfigError
from common.safe_json import JSONInputError, read_json_file
from config.settings import ExperimentConfig
from data.dataset import TokenData, prepare_data
from data.tokenizer import TextTokenizer
from models.checkpoint import CHECKPOINTS_DIR, CONFIG_FILE, CheckpointError, read_config
from training.experiment import data_fingerprint
from training.results import RESULTS_FILE

DEFAULT_TASK = "exp6_validation"
TEXT_FIELD = "text"
METRICS = {"word_perplexity": "weighted_perplexity", "byte_perplexity": "weighted_perplexity",
           "bits_per_byte": "bits_per_byte"}  # lm-eval's metrics of a rolling loglikelihood, with their aggregations
RELATION = (
    "lm-eval's loglikelihood of a document is the sum of log p(token | context) over its `tokens` tokens (natural "
    "log), in windows of max_length = the model's max_seq_len: the first window predicts the first token from the "
    "prefix token, each later window predicts the next max_length tokens from the max_length tokens before them, and "
    "the last one predicts the remaining tokens from the max_length tokens before them. With LL the sum over the "
    "documents: mean cross-entropy per token = -LL / tokens = bits_per_byte * ln(2) * bytes / tokens = "
    "ln(byte_perplexity) * bytes / tokens = ln(word_perplexity) * words / tokens.")


@dataclass
class RunRecord:
    """What the run recorded about its data and its models, from its results JSON or a saved model's config.json."""

    config: ExperimentConfig
    where: Path  # the file it was read from
    offline: bool | None = None  # the run used the offline corpus (None: not recorded, e.g. an older saved model)
    corpus_description: str | None = None
    fingerprint: str | None = None  # the experiment's data_sha256 (training/experiment.py: data_fingerprint)
    val_losses: dict[str, float] = field(default_factory=dict)  # "<name>-seed<seed>" -> its recorded val_loss


@dataclass
class Document:
    text: str
    tokens: int  # as the run's tokenizer encodes `text` (what lm-eval scores, with the same tokenizer)
    retokenizes_exactly: bool  # encoding `text` gives back the run's own tokens

    @property
    def bytes(self) -> int:
        return len(self.text.encode("utf-8"))

    @property
    def words(self) -> int:
        """Words as lm-eval counts them for word_perplexity (its default count_words)."""
        return len(re.split(r"\s+", self.text))


def results_record(path: Path) -> RunRecord:
    """The run as its results JSON records it."""
    try:
        results = read_json_file(path)
        experiment = results["experiment"]
        config = ExperimentConfig.from_dict(experiment["config"])
    except (JSONInputError, KeyError, TypeError, ConfigError) as error:
        raise ConfigError(f"{path} is not a readable exp6 results JSON ({error})") from None
    data = experiment.get("data") or {}
    losses = {f"{name}-seed{run.get('seed')}": run["val_loss"] for name, entry in results.items()
              if isinstance(entry, dict) and isinstance(entry.get("runs"), list)
              for run in entry["runs"] if isinstance(run, dict) and run.get("val_loss") is not None}
    return RunRecord(config, path, offline=data.get("offline"), corpus_description=data.get("corpus_description"),
                     fingerprint=experiment.get("data_sha256"), val_losses=losses)


def model_record(folder: Path) -> RunRecord:
    """The run as a saved model's config.json records it, with its results JSON's fingerprint when the folder is
    still in its results folder (OUTPUT_DIR/checkpoints/<name>-seed<seed>/)."""
    try:
        meta = read_config(folder)
        config = ExperimentConfig.from_dict(meta["config"])
    except (CheckpointError, KeyError, TypeError, ConfigError) as error:
        raise ConfigError(f"{folder}: not a saved exp6 model ({error})") from None
    extra = meta.get("extra") or {}
    results = folder.parent.parent / RESULTS_FILE
    record = results_record(results) if folder.parent.name == CHECKPOINTS_DIR and results.is_file() else None
    offline = extra.get("data_offline")
    return RunRecord(config, folder / CONFIG_FILE,
                     offline=offline if offline is not None else record.offline if record else None,
                     corpus_description=extra.get("data") or (record.corpus_description if record else None),
                     fingerprint=record.fingerprint if record else None,
                     val_losses={folder.name: extra["val_loss"]} if extra.get("val_loss") is not None else {})


def run_record(source: Path) -> RunRecord:
    """A results folder, its results JSON or a saved model folder: what its run recorded."""
    if source.is_dir() and (source / RESULTS_FILE).is_file():
        return results_record(source / RESULTS_FILE)
    if source.is_dir() and (source / CONFIG_FILE).is_file():
        return model_record(source)
    if source.is_file() and source.suffix == ".json":
        return results_record(source)
    raise ConfigError(f"{source} is neither a results folder (with {RESULTS_FILE}) nor a saved model folder (with "
                      f"{CONFIG_FILE}); give the --output-dir of a run or one of its checkpoints/ folders")


def run_data(record: RunRecord, log: Callable[[str], None] = print) -> TokenData:
    """The run's tokens, loaded as the run loaded them, and refused in one line when they are not the run's."""
    config = record.config.replace(offline=True) if record.offline else record.config
    data = prepare_data(config, log)
    described = data.info.get("corpus_description")
    if record.corpus_description is not None and described != record.corpus_description:
        raise ConfigError(f"this machine loads {described}, but the run trained on {record.corpus_description}; "
                          "export where the run's data (or its token cache in --cache-dir) is")
    if record.fingerprint is not None and data_fingerprint(data) != record.fingerprint:
        raise ConfigError(f"the tokens loaded here differ from the run's (data_sha256 of {record.where}); export "
                          "where the run's data (or its token cache) is")
    if data.tokenizer is None:
        raise ConfigError(f"the tokenizer {config.tokenizer_name} is not in the local Hugging Face cache; connect "
                          "once so that it can be downloaded, then export again")
    return data


def split_documents(tokens: list[int], eos_token_id: int | None) -> list[list[int]]:
    """The tokens cut at every EOS (dropped), empty pieces left out: the documents a stretch of the corpus holds."""
    if eos_token_id is None:
        return [tokens] if tokens else []
    pieces: list[list[int]] = [[]]
    for token in tokens:
        if token == eos_token_id:
            pieces.append([])
        else:
            pieces[-1].append(token)
    return [piece for piece in pieces if piece]


def stream_tokens(val: torch.Tensor, seq_len: int) -> tuple[int, list[int]]:
    """(the first input, the predicted tokens) of the run's validation windows (data/dataset.py validation_windows):
    val[0] and val[1 : n * seq_len + 1], n the number of whole windows."""
    windows = (len(val) - 1) // seq_len
    return int(val[0]), val[1: windows * seq_len + 1].tolist()


def as_document(tokens: list[int], tokenizer: TextTokenizer) -> Document:
    text = tokenizer.decode(tokens)
    again = tokenizer.encode(text)
    return Document(text, len(again), again == tokens)


def task_yaml(task: str, data_file: Path) -> str:
    """lm-eval's task config: a rolling loglikelihood over the documents' text, read from the local JSON lines file
    (an absolute path: lm-eval reads it relative to where it runs)."""
    metrics = "\n".join(f"  - metric: {metric}\n    aggregation: {aggregation}\n    higher_is_better: false"
                        for metric, aggregation in METRICS.items())
    return (f"# Written by python -m training.lm_eval_task: the run's validation text, scored as wikitext is.\n"
            f"task: {task}\n"
            f"dataset_path: json\n"
            f"dataset_kwargs:\n"
            f"  data_files:\n"
            f"    validation: {json.dumps(str(data_file.resolve()))}\n"
            f"output_type: loglikelihood_rolling\n"
            f"validation_split: validation\n"
            f"doc_to_text: \"\"\n"
            f"doc_to_target: {TEXT_FIELD}\n"
            f"metric_list:\n{metrics}\n"
            f"metadata:\n"
            f"  version: 1.0\n")


def lm_eval_command(task: str, out: Path, seq_len: int, prefix_token_id: int | None = None,
                    model: str = "FOLDER") -> str:
    """The lm_eval command line for the task; max_length pins lm-eval's window to the training window."""
    model_args = f"pretrained={model},trust_remote_code=True,max_length={seq_len}"
    if prefix_token_id is not None:
        model_args += f",prefix_token_id={prefix_token_id}"
    return shlex.join(["lm_eval", "--model", "hf", "--model_args", model_args, "--include_path", str(out),
                       "--tasks", task])


def export_task(source: Path, out: Path, task: str = DEFAULT_TASK, stream: bool = False,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write OUT/<task>.jsonl (the documents), OUT/<task>.yaml (the task) and OUT/<task>.json (the manifest: what
    was exported, its token, byte and word counts, the command and how lm-eval's numbers relate to ours).
    Returns the manifest."""
    record = run_record(source)
    data = run_data(record, log)
    tokenizer = data.tokenizer
    assert tokenizer is not None  # run_data refuses data without one
    seq_len = record.config.max_seq_len
    prefix: int | None = None
    if stream:
        prefix, tokens = stream_tokens(data.val, seq_len)
        pieces = [tokens]
    else:
        pieces = split_documents(data.val.tolist(), tokenizer.eos_token_id)
    documents = [as_document(piece, tokenizer) for piece in pieces]
    if stream and not documents[0].retokenizes_exactly:
        raise ConfigError("the validation text does not tokenize back into the run's tokens, so lm-eval would not "
                          "score the run's windows; export documents instead (without --stream)")

    model_folder = str(record.where.parent) if record.where.name == CONFIG_FILE else "FOLDER"  # a model's own folder
    out.mkdir(parents=True, exist_ok=True)
    data_file, task_file, manifest_file = out / f"{task}.jsonl", out / f"{task}.yaml", out / f"{task}.json"
    lines = "".join(json.dumps({TEXT_FIELD: document.text}, ensure_ascii=False) + "\n" for document in documents)
    write_atomic(data_file, lambda file: file.write(lines.encode("utf-8")))
    write_atomic(task_file, lambda file: file.write(task_yaml(task, data_file).encode("utf-8")))
    manifest = {
        "task": task,
        "source": str(record.where),
        "mode": "stream: the run's validation windows as one document" if stream else
                "documents: the validation part cut at EOS",
        "data": data.info.get("corpus_description"),
        "validation_tokens": len(data.val),
        "max_length": seq_len,
        "prefix_token_id": prefix,
        "documents": len(documents),
        "tokens": sum(document.tokens for document in documents),
        "bytes": sum(document.bytes for document in documents),
        "words": sum(document.words for document in documents),
        "documents_not_retokenized_exactly": sum(not document.retokenizes_exactly for document in documents),
        "per_document": [{"tokens": d.tokens, "bytes": d.bytes, "words": d.words} for d in documents],
        "run_val_losses": record.val_losses,
        "command": lm_eval_command(task, out, seq_len, prefix, model=model_folder),
        "relation": RELATION,
    }
    text = json.dumps(manifest, indent=2) + "\n"
    write_atomic(manifest_file, lambda file: file.write(text.encode("utf-8")))
    return manifest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.lm_eval_task", description=(
        "Export a run's validation text as a local lm-evaluation-harness task (rolling loglikelihood: word and byte "
        "perplexity, bits per byte), so that lm_eval evaluates a saved model offline."))
    parser.add_argument("source", type=Path, help="a results folder (--output-dir of a run), its results JSON, or a "
                        "saved model folder")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write the task into (lm_eval's "
                        "--include_path)")
    parser.add_argument("--task", default=DEFAULT_TASK, help=f"the task's name (default {DEFAULT_TASK})")
    parser.add_argument("--stream", action="store_true", help="one document: exactly the tokens the run's "
                        "validation windows predict; lm_eval then needs the printed prefix_token_id and gives the "
                        "run's val_loss per token")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Export the task, print what was written and the lm_eval command; errors in one `error:` line (exit 2)."""
    args = build_parser().parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", args.task):
        print(f"error: --task {args.task!r}: use letters, digits, - and _", file=sys.stderr)
        return 2
    try:
        manifest = export_task(args.source, args.out, args.task, args.stream)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Task {manifest['task']}: {manifest['documents']} document(s), {manifest['tokens']:,} tokens, "
          f"{manifest['bytes']:,} bytes, in {args.out} ({manifest['mode']}).")
    if manifest["documents_not_retokenized_exactly"]:
        print(f"Note: {manifest['documents_not_retokenized_exactly']} document(s) tokenize a little differently from "
              "the run's tokens once decoded to text (the manifest's per_document counts are lm-eval's).")
    print(f"Evaluate a saved model with:\n  {manifest['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
