"""lm-evaluation-harness on a saved model: the exported task holds exactly the run's validation text, and lm-eval's
log-likelihood through the saved folder equals our own evaluation of the same tokens.

The relation checked (docs/evaluation.md): for each document of N tokens (the model's tokenizer, no special
tokens) and the windows L = max_seq_len, lm-eval's loglikelihood_rolling is minus the sum of the per-token
cross-entropy our model gives those N tokens, where tokens 1..floor(N/L)*L are predicted in exactly the experiment's
validation windows (data/dataset.py: validation_windows) over [prefix] + document, and the last N mod L tokens
from the L tokens before them. Summed over documents, LL = -(our mean cross-entropy) x (token count).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from arms.registry import arm_builders
from common.hardware import FP32
from config.settings import ExperimentConfig
from data.dataset import prepare_data, validation_windows
from data.tokenizer import EOS_TOKEN
from models.checkpoint import load_checkpoint, run_checkpoint_dir
from tests.conftest import tiny_config
from training.experiment import run_experiment
from training.trainer import evaluate
from training.lm_eval_task import (
    RunRecord,
    export_task,
    main,
    run_data,
    run_record,
    split_documents,
    stream_tokens,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExperimentConfig, dict[str, Any]]:
    """A tiny two-arm experiment that saved its models (seconds): its config and results. Its validation part holds
    documents of 10, 111, 130 and 46 tokens (Python 3.11's docstrings), so windows of 64 cover a document in one window, several windows with
    a remainder, and whole windows only."""
    config = tiny_config(tmp_path_factory.mktemp("lm_eval"), max_steps=3, eval_every=3, sample_tokens=0,
                         max_chars_per_doc=300, offline_vocab_size=1024, max_seq_len=64)
    return config, run_experiment(config, log=lambda _: None)


def test_documents_are_the_tokens_between_eos():
    assert split_documents([5, 6, 0, 7, 0, 0, 8, 9], eos_token_id=0) == [[5, 6], [7], [8, 9]]
    assert split_documents([0, 5, 0], eos_token_id=0) == [[5]]
    assert split_documents([5, 6], eos_token_id=None) == [[5, 6]]
    assert stream_tokens(torch.arange(10), seq_len=4) == (0, [1, 2, 3, 4, 5, 6, 7, 8])  # two whole windows


def test_the_exported_documents_are_exactly_the_validation_split(run, tmp_path, capsys):
    config, results = run
    assert main([config.output_dir, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    data = prepare_data(config, log=lambda _: None)
    assert data.tokenizer is not None
    texts = [json.loads(line)["text"] for line in (tmp_path / "exp6_validation.jsonl").read_text().splitlines()]
    whole = data.tokenizer.decode(data.val.tolist())  # the validation part as text, EOS written out
    assert texts == [piece for piece in whole.split(EOS_TOKEN) if piece]
    assert [data.tokenizer.encode(text) for text in texts] == split_documents(data.val.tolist(),
                                                                              data.tokenizer.eos_token_id)

    task = yaml.safe_load((tmp_path / "exp6_validation.yaml").read_text())
    assert task["output_type"] == "loglikelihood_rolling" and task["dataset_path"] == "json"
    assert Path(task["dataset_kwargs"]["data_files"]["validation"]) == (tmp_path / "exp6_validation.jsonl").resolve()
    manifest = json.loads((tmp_path / "exp6_validation.json").read_text())
    assert manifest["documents"] == len(texts) and manifest["documents_not_retokenized_exactly"] == 0
    assert manifest["tokens"] == len(data.val) - data.val.tolist().count(data.tokenizer.eos_token_id)
    assert manifest["run_val_losses"]["deepseek-seed42"] == results["deepseek"]["runs"][0]["val_loss"]
    assert manifest["max_length"] == config.max_seq_len
    assert manifest["command"] in printed and f"max_length={config.max_seq_len}" in manifest["command"]


def test_the_stream_is_what_the_runs_validation_windows_predict(run, tmp_path):
    config, _ = run
    folder = run_checkpoint_dir(Path(config.output_dir), "deepseek", config.seed)
    manifest = export_task(folder, tmp_path, task="stream", stream=True, log=lambda _: None)
    data = prepare_data(config, log=lambda _: None)
    assert data.tokenizer is not None
    inputs, targets = validation_windows(data.val, config.max_seq_len)
    (line,) = (tmp_path / "stream.jsonl").read_text().splitlines()
    assert data.tokenizer.encode(json.loads(line)["text"]) == targets.flatten().tolist()
    assert manifest["prefix_token_id"] == int(inputs[0, 0])
    assert manifest["tokens"] == targets.numel()
    assert f"pretrained={folder},trust_remote_code=True" in manifest["command"]
    assert f"prefix_token_id={int(inputs[0, 0])}" in manifest["command"]


def test_a_model_folder_records_the_same_run_and_other_tokens_are_refused(run):
    config, _ = run
    folder = run_checkpoint_dir(Path(config.output_dir), "baseline", config.seed)
    from_folder, from_results = run_record(folder), run_record(Path(config.output_dir))
    assert from_folder.offline is True and from_folder.fingerprint == from_results.fingerprint is not None
    assert from_folder.corpus_description == from_results.corpus_description

    other = RunRecord(config.replace(max_tokens=2900), from_results.where, offline=True,
                      fingerprint=from_results.fingerprint)
    with pytest.raises(Exception, match="differ from the run's"):
        run_data(other, log=lambda _: None)
    with pytest.raises(Exception, match="the run trained on"):
        run_data(RunRecord(config, from_results.where, corpus_description="another corpus"), log=lambda _: None)


# --- lm-eval itself, on the saved folder (AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)) ---

def our_rolling_nll(model: torch.nn.Module, tokens: list[int], prefix: int, seq_len: int) -> float:
    """The summed cross-entropy (nats) of `tokens` in lm-eval's rolling windows, by the experiment's own evaluation
    (training.trainer.evaluate): the whole windows are validation_windows over [prefix] + tokens, and the last
    len(tokens) % seq_len tokens are predicted from the seq_len tokens before them (their context is marked -100,
    which cross_entropy ignores; evaluate's mean is over every target, so mean x count is the sum)."""
    sequence = torch.tensor([prefix, *tokens])
    inputs, targets = validation_windows(sequence, seq_len)
    cpu = torch.device("cpu")
    total = evaluate(model, inputs, targets, 64, cpu, FP32)["val_loss"] * targets.numel() if len(inputs) else 0.0
    rest = len(tokens) - targets.numel()
    if rest:
        start = max(0, len(sequence) - 1 - seq_len)
        last_targets = sequence[start + 1:].clone()
        last_targets[:-rest] = -100
        total += evaluate(model, sequence[start:-1][None], last_targets[None], 1, cpu, FP32)["val_loss"] * len(last_targets)
    return total


@pytest.fixture(scope="module")
def tasks(run, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, Any]], Any]:
    """Both tasks exported into one folder: its path, their manifests by task, and lm-eval's TaskManager over it
    (without lm-eval's own thousands of tasks, which take seconds to index)."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    config, _ = run
    folder = tmp_path_factory.mktemp("tasks")
    manifests = {"exp6_validation": export_task(Path(config.output_dir), folder, log=lambda _: None),
                 "stream": export_task(Path(config.output_dir), folder, task="stream", stream=True, log=lambda _: None)}
    return folder, manifests, TaskManager(include_path=str(folder), include_defaults=False)


def lm_eval_run(folder: Path, task_manager: Any, task: str, model_args: str = "") -> dict[str, Any]:
    """lm-eval's Python API, as `lm_eval --model hf --model_args pretrained=FOLDER,trust_remote_code=True
    --include_path DIR --tasks TASK --log_samples` runs it."""
    import lm_eval

    return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},trust_remote_code=True{model_args}",
                                   tasks=[task], task_manager=task_manager, device="cpu", batch_size=8,
                                   log_samples=True)


def test_lm_eval_on_the_saved_folder_gives_our_loss_on_every_document(run, tasks):
    config, _ = run
    _, manifests, task_manager = tasks
    manifest = manifests["exp6_validation"]
    folder = run_checkpoint_dir(Path(config.output_dir), "deepseek", config.seed)
    out = lm_eval_run(folder, task_manager, manifest["task"])

    data = prepare_data(config, log=lambda _: None)
    assert data.tokenizer is not None and data.tokenizer.eos_token_id is not None
    model = load_checkpoint(folder, arm_builders()).model
    samples = sorted(out["samples"][manifest["task"]], key=lambda sample: sample["doc_id"])
    ours = [our_rolling_nll(model, data.tokenizer.encode(sample["target"]), data.tokenizer.eos_token_id,
                            config.max_seq_len) for sample in samples]
    theirs = [-sample["resps"][0][0] for sample in samples]  # lm-eval's loglikelihood of each document
    lengths = [len(data.tokenizer.encode(sample["target"])) for sample in samples]
    assert len(samples) == manifest["documents"] and sum(lengths) == manifest["tokens"]
    assert min(lengths) < config.max_seq_len < max(lengths) and any(n % config.max_seq_len for n in lengths)
    assert theirs == pytest.approx(ours, rel=1e-5)

    nll, tokens = sum(ours), manifest["tokens"]
    result = out["results"][manifest["task"]]
    assert result["bits_per_byte,none"] == pytest.approx(nll / manifest["bytes"] / math.log(2), rel=1e-5)
    assert result["byte_perplexity,none"] == pytest.approx(math.exp(nll / manifest["bytes"]), rel=1e-5)
    assert result["word_perplexity,none"] == pytest.approx(math.exp(nll / manifest["words"]), rel=1e-4)
    # our mean cross-entropy per token over the same tokens, from lm-eval's numbers alone
    assert result["bits_per_byte,none"] * math.log(2) * manifest["bytes"] / tokens == pytest.approx(nll / tokens,
                                                                                                    rel=1e-5)


def test_lm_eval_on_the_stream_gives_the_runs_recorded_val_loss(run, tasks):
    config, results = run
    _, manifests, task_manager = tasks
    manifest = manifests["stream"]
    folder = run_checkpoint_dir(Path(config.output_dir), "deepseek", config.seed)
    out = lm_eval_run(folder, task_manager, "stream", f",prefix_token_id={manifest['prefix_token_id']}")
    (sample,) = out["samples"]["stream"]
    loglikelihood = sample["resps"][0][0]
    assert -loglikelihood / manifest["tokens"] == pytest.approx(results["deepseek"]["runs"][0]["val_loss"], rel=1e-6)
