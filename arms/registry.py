"""The arms of the experiment: each is the shared MoE language model with one attention module passed in.

An arm is one module in this folder that defines `ARM = Arm(...)`: the registry imports every module here
and lists their arms, the built-in ones first (BUILT_IN order), then any others by name. Training, results,
plots, saved models, generation, the decode benchmark and the tests all read the registry, so adding a file
here adds an arm everywhere (README: "Add your own attention"). `--arms` chooses which arms a run trains; the
baseline always runs, since every comparison pairs with it.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Iterable, Mapping
from typing import Any

from arms.arm import Arm
from common.errors import ConfigError
from config.settings import BASELINE, ExperimentConfig
from models.transformer import ModelBuilder

NOT_ARMS = ("arm", "registry")  # the modules of this folder that define no arm
BUILT_IN = ("baseline", "deepseek", "gqa", "mqa")  # registry order: the experiment's question first
PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red", "tab:brown", "tab:pink", "tab:olive",
           "tab:cyan", "tab:gray")  # colours for arms that name none, in registry order


def _discover() -> dict[str, Arm]:
    """Every arm defined in this folder, built-in ones first, colours filled in."""
    import arms

    found: dict[str, Arm] = {}
    for module in pkgutil.iter_modules(arms.__path__):
        if module.name in NOT_ARMS or module.name.startswith("_"):
            continue
        arm = getattr(importlib.import_module(f"arms.{module.name}"), "ARM", None)
        if not isinstance(arm, Arm):
            raise ImportError(f"arms/{module.name}.py defines no ARM = Arm(...); every module in arms/ is one arm")
        if arm.name in found:
            raise ImportError(f"arms/{module.name}.py registers the arm name {arm.name!r} a second time")
        found[arm.name] = arm
    order = [name for name in BUILT_IN if name in found] + sorted(set(found) - set(BUILT_IN))
    free = iter(color for color in PALETTE if color not in {arm.color for arm in found.values()})
    return {name: found[name] if found[name].color else dataclasses.replace(found[name], color=next(free, "black"))
            for name in order}


ARMS: dict[str, Arm] = _discover()
ARM_NAMES: tuple[str, ...] = tuple(ARMS)


def arm_builders() -> dict[str, ModelBuilder]:
    """name -> the function that builds its model, (config, seed=None) -> model, in registry order."""
    return {name: arm.build for name, arm in ARMS.items()}


def check_arm_names(names: Iterable[str], known: Iterable[str] | None = None, flag: str = "--arms") -> None:
    """ConfigError naming the first name in `names` that is not an arm of the registry (or of `known`)."""
    known = tuple(ARM_NAMES if known is None else known)
    listed = tuple(names)
    for name in listed:
        if name not in known:
            raise ConfigError(f"{flag} {' '.join(listed)}: unknown arm {name!r}; choose from {', '.join(known)}")


def arm_label(name: str, config: ExperimentConfig | Mapping[str, Any] | None = None) -> str:
    """An arm's label for a run's config; a name the registry does not know is returned as it is."""
    arm = ARMS.get(name)
    return arm.label_for(config) if arm is not None else name


def arm_color(name: str) -> str | None:
    arm = ARMS.get(name)
    return arm.color if arm is not None else None


def ordered_arms(names: Iterable[str]) -> list[str]:
    """The registry's arms among `names` (any iterable or mapping of names), in registry order."""
    present = set(names)
    return [name for name in ARM_NAMES if name in present]


def headline_arm(names: Iterable[str]) -> str | None:
    """The arm whose comparison with the baseline is the headline: the first other arm in registry order (MLA
    when it ran: the experiment's question); None when only the baseline ran."""
    return next((name for name in ordered_arms(names) if name != BASELINE), None)


def comparison_pairs(names: Iterable[str]) -> list[tuple[str, str]]:
    """(first, second) for every difference first - second to report: every arm against the baseline, the
    headline arm first, then each arm against the rivals it declares (GQA and MQA: MLA at a matched KV cache)."""
    present = ordered_arms(names)
    if BASELINE not in present:
        return []
    pairs = [(arm, BASELINE) for arm in present if arm != BASELINE]
    pairs += [(rival, arm) for arm in present for rival in ARMS[arm].rivals if rival in present]
    return pairs
