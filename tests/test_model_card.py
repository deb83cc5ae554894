"""The model card each saved folder gets: Hugging Face front matter that parses, the run record's numbers, the
data line the run printed, and a command the trainer accepts that trains the same model again."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from arms.registry import ARMS
from config.settings import DEFAULT_ARMS, ExperimentConfig
from exp6_trainer import build_parser, resolve_config
from models.checkpoint import run_checkpoint_dir
from tests.conftest import tiny_config
from training import command
from training.experiment import run_experiment
from training.model_card import CARD_FILE, CardFacts, data_line, model_card, reproduce_command
from training.results import RESULTS_FILE
from training.study import STUDY



@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExperimentConfig, dict[str, Any], list[str]]:
    """A tiny two-arm experiment that saved its models: its config, results and log."""
    config = tiny_config(tmp_path_factory.mktemp("card"), max_steps=3, eval_every=3, sample_tokens=0)
    lines: list[str] = []
    results = run_experiment(config, log=lines.append)
    return config, results, lines


def read_card(path: Path) -> tuple[dict[str, Any], str]:
    """(front matter, text): the card split where the Hub splits it, between the two `---` lines."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


@pytest.mark.parametrize("arm", DEFAULT_ARMS)  # the arms the tiny run trains
def test_the_card_front_matter_is_yaml_with_the_run_records_numbers(trained, arm):
    config, results, lines = trained
    record = results[arm]["runs"][0]
    folder = run_checkpoint_dir(Path(config.output_dir), arm, config.seed)
    assert CARD_FILE in record["checkpoint"]["files"]
    header, body = read_card(folder / CARD_FILE)

    assert header["library_name"] == "transformers"
    assert {"exp6", arm, "mixture-of-experts"} <= set(header["tags"])
    assert ARMS[arm].hub_tags and set(ARMS[arm].hub_tags) <= set(header["tags"])  # its attention, by name
    assert "datasets" not in header  # the offline corpus is no Hub dataset
    (result,) = header["model-index"][0]["results"]
    assert header["model-index"][0]["name"] == f"{arm}-seed{config.seed}"
    assert result["dataset"] == {"name": results["experiment"]["data"]["corpus_description"], "type": "offline",
                                 "split": "validation"}
    metrics = {metric["type"]: metric for metric in result["metrics"]}
    assert metrics["loss"]["value"] == record["val_loss"]  # exactly: YAML writes the float's repr
    assert metrics["perplexity"]["value"] == record["val_perplexity"]
    assert metrics["accuracy"]["value"] == record["val_accuracy"]
    assert metrics["loss"]["name"] == f"Validation loss (seed {config.seed})"

    assert f"Validation loss: **{record['val_loss']:.4f}**" in body and f"seed {config.seed}" in body
    printed = next(line for line in lines if line.startswith("Data: "))
    assert printed.startswith(data_line(results["experiment"]["data"]) + " (")  # the run's line, less the cache path
    assert data_line(results["experiment"]["data"]) in body
    assert results["experiment"]["validation"] in body
    for name, what in ARMS[arm].settings:  # what sizes its attention, and no other arm's sizes
        assert f"| `{name}` | {getattr(config, name)} | {what} |" in body
    others = {name for other in ARMS.values() for name, _ in other.settings} - {name for name, _ in ARMS[arm].settings}
    assert not any(f"`{name}`" in body for name in others)
    saved = json.loads((folder / "config.json").read_text())
    assert saved["extra"]["data_offline"] is True
    assert ("auto_map" in saved) == ("AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)" in body)


def test_the_cards_command_trains_the_same_model_again(trained, capsys):
    """The command parses with the trainer's own parser into the saved config (this arm and seed, a fresh output
    folder), and running it gives the recorded validation loss again, exactly (CPU, float32)."""
    config, results, _ = trained
    folder = run_checkpoint_dir(Path(config.output_dir), "deepseek", config.seed)
    _, body = read_card(folder / CARD_FILE)
    line = next(line for line in body.splitlines() if line.startswith("python exp6_trainer.py "))
    argv = shlex.split(line)[2:]

    resolved, _ = resolve_config(build_parser().parse_args(argv), cuda_available=False)
    assert resolved.arms == DEFAULT_ARMS and resolved.run_seeds == (config.seed,)
    assert resolved.output_dir == f"{config.output_dir}-reproduced"
    saved = json.loads((folder / "config.json").read_text())["config"]
    assert ExperimentConfig.from_dict(saved).replace(arms=DEFAULT_ARMS, seeds=(config.seed,),
                                                     output_dir=resolved.output_dir) == resolved

    assert command.main(argv) == 0
    again = json.loads((Path(resolved.output_dir) / RESULTS_FILE).read_text())
    assert again["deepseek"]["runs"][0]["val_loss"] == results["deepseek"]["runs"][0]["val_loss"]
    capsys.readouterr()


def facts(config: ExperimentConfig, folder: Path, **data: Any) -> CardFacts:
    """A card's facts for a model saved (config.json alone) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"config": config.to_dict()}))
    return CardFacts(name="deepseek", arm="deepseek", seed=7, folder=str(folder), config=config,
                     record={"val_loss": 5.5}, data={"corpus_description": "corpus", "offline": False, **data},
                     validation="fixed set")


def test_a_run_that_fell_back_to_the_offline_corpus_is_reproduced_with_offline_and_hub_data_is_named(tmp_path):
    config = ExperimentConfig(output_dir="runs")
    fell_back = reproduce_command(facts(config, tmp_path / "m", offline=True))
    assert fell_back == (f"python exp6_trainer.py --config {tmp_path}/m/config.json --arms baseline deepseek "
                         "--seeds 7 --offline --output-dir runs-reproduced")
    assert resolve_config(build_parser().parse_args(shlex.split(fell_back)[2:]), cuda_available=False)[0].offline

    header, _ = model_card(facts(config, tmp_path / "m")).removeprefix("---\n").split("\n---\n", 1)
    front = yaml.safe_load(header)
    assert front["datasets"] == [config.dataset_name]
    assert front["model-index"][0]["results"][0]["dataset"]["config"] == config.dataset_config


def test_a_study_point_is_reproduced_by_its_study(tmp_path):
    config = ExperimentConfig(output_dir="study", studies=("frontier",))
    words = shlex.split(reproduce_command(facts(config, tmp_path)))
    assert words[:3] == ["python", "-m", "training.study"] and "--arms" not in words
    args = command.build_parser(STUDY).parse_args(words[3:])
    resolved = command.resolve_config(args, False, STUDY)[0]
    assert resolved.run_seeds == (7,) and resolved.studies == ("frontier",)
