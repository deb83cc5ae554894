"""Live curves: each run's logged steps and evaluations, written as they happen where researchers look.

- OUTPUT_DIR/metrics.jsonl, always: one JSON line per logged step (every log_every steps) and per
  evaluation, with arm, seed, kind ("step" or "eval"), step, tokens, training seconds, train loss (the
  last step's at a logged step, the mean since the previous evaluation at an evaluation), val loss and
  val accuracy (null at a logged step). `tail -f` it, or read it with pandas.read_json(lines=True).
- --tensorboard: TensorBoard event files, one run per arm and seed in OUTPUT_DIR/tensorboard/<arm>-seed<seed>/:
  loss/train, loss/val and accuracy/val against the step, loss_vs_training_ms/train and /val against the
  training time in milliseconds (evaluation and logging excluded), and the whole config as text.
- --wandb PROJECT: one Weights & Biases run per arm and seed (group: the output folder), with the same
  values and the config.

Only rank 0 logs (the experiment gives the other ranks no log); under seed-parallel, the runs another
rank trained are logged from their records when they arrive (evaluations only). A resumed run starts
logging again after its saved state: its lines and events from that step on, written before the stop,
are dropped first (TensorBoard's purge_step), so every curve has each step once.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from common.atomic_files import write_atomic
from common.errors import ConfigError
from common.reporting import json_safe
from config.settings import ExperimentConfig
from training.trainer import CURVE_KEYS

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def check_loggers(config: ExperimentConfig) -> None:
    """Fail before training when a logger the config asks for is not installed."""
    if config.wandb_project is not None and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"--wandb {config.wandb_project}: wandb is not installed; run `pip install wandb` "
                          "(and `wandb login`, or WANDB_MODE=offline), or drop --wandb")
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard: the tensorboard package is not installed; run `pip install -r requirements.txt`")


class MetricsLog:
    """The experiment's live log: hands out one RunLog per (arm, seed)."""

    def __init__(self, config: ExperimentConfig, output_dir: Path) -> None:
        self.config = config
        self.output_dir = output_dir
        self.jsonl = output_dir / METRICS_FILE

    def run(self, arm: str, seed: int) -> RunLog:
        return RunLog(self, arm, seed)

    def replay(self, arm: str, seed: int, curve: dict[str, list[Any]]) -> None:
        """Log the evaluations of a run trained elsewhere (another rank) from its record's curve."""
        run = self.run(arm, seed)
        try:
            for index in range(len(curve["step"])):
                run({point_key: curve[curve_key][index] for curve_key, point_key in CURVE_KEYS.items()})
        finally:
            run.close()

    def drop_lines(self, arm: str, seed: int, from_step: int) -> None:
        """Remove the run's lines at or after `from_step` (logged before a stop, and about to be logged again)."""
        if not self.jsonl.exists():
            return
        kept, dropped = [], 0
        for line in self.jsonl.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                entry = json.loads(line)
            except ValueError:  # a line cut short by a kill: it goes
                dropped += 1
                continue
            if entry.get("arm") == arm and entry.get("seed") == seed and entry.get("step", -1) >= from_step:
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            write_atomic(self.jsonl, lambda file: file.write("".join(kept)), binary=False)


class RunLog:
    """One run's sinks, opened at its first point (whose step tells where a resumed run starts again)."""

    def __init__(self, log: MetricsLog, arm: str, seed: int) -> None:
        self.log, self.arm, self.seed = log, arm, seed
        self.opened = False
        self.tensorboard: Any = None
        self.wandb_run: Any = None

    def _open(self, first_step: int) -> None:
        config = self.log.config
        self.log.drop_lines(self.arm, self.seed, first_step)
        name = f"{self.arm}-seed{self.seed}"
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.tensorboard = SummaryWriter(str(self.log.output_dir / TENSORBOARD_DIR / name), purge_step=first_step)
            if first_step == 0:
                self.tensorboard.add_text("config", "```\n" + json.dumps(config.to_dict(), indent=2) + "\n```")
        if config.wandb_project is not None:
            wandb = importlib.import_module("wandb")
            self.wandb_run = wandb.init(project=config.wandb_project, name=name, group=str(self.log.output_dir),
                                        config=config.to_dict(), dir=str(self.log.output_dir), reinit="create_new")
        self.opened = True

    def __call__(self, point: dict[str, Any]) -> None:
        """Log one point (the trainer's on_metrics): a logged step, or an evaluation when it has val_loss."""
        if not self.opened:
            self._open(point["step"])
        evaluation = "val_loss" in point
        entry = {"arm": self.arm, "seed": self.seed, "kind": "eval" if evaluation else "step", "step": point["step"],
                 "tokens": point["tokens"], "seconds": point["seconds"], "train_loss": point["train_loss"],
                 "val_loss": point.get("val_loss"), "val_accuracy": point.get("val_accuracy")}
        with open(self.log.jsonl, "a", encoding="utf-8") as file:  # one write per line, flushed: `tail -f` sees it
            file.write(json.dumps(json_safe(entry), allow_nan=False) + "\n")
        step, milliseconds = point["step"], round(point["seconds"] * 1000)
        scalars = {"loss/train": point["train_loss"], "loss/val": point.get("val_loss"),
                   "accuracy/val": point.get("val_accuracy")}
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                if _number(value):
                    self.tensorboard.add_scalar(tag, value, step)
            for tag, value in (("loss_vs_training_ms/train", point["train_loss"]), ("loss_vs_training_ms/val", point.get("val_loss"))):
                if _number(value):
                    self.tensorboard.add_scalar(tag, value, milliseconds)
            self.tensorboard.flush()  # on disk now (not within flush_secs): a run killed later keeps its curve to here
        if self.wandb_run is not None:
            self.wandb_run.log({**{tag: value for tag, value in scalars.items() if _number(value)},
                                "tokens": point["tokens"], "training_seconds": point["seconds"]}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        self.tensorboard = self.wandb_run = None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
