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
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from config.settings import ExperimentConfig
from data.dataset import prepare_data, validation_windows
from data.tokenizer import EOS_TOKEN
from models.checkpoint import run_checkpoint_dir
from tests.conftest import tiny_config
from training.experiment import run_experiment
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
    """A tiny two-arm experiment that saved its models (seconds): its config and results."""
    config = tiny_config(tmp_path_factory.mktemp("lm_eval"), max_steps=3, eval_every=3)
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
