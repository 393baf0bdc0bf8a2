"""Reward functions for finetune_grpo.py: programs that score sampled answers, and --reward's list of them.

A reward function takes the sampled answers (completions, as text), the reference answer of each (the
last assistant turn of its sample) and the samples themselves (qwen_ft.data.samples.Sample: its messages,
file and index), and returns one float per completion:

    def short_and_right(completions: list[str], references: list[str], samples: list[Sample]) -> list[float]:
        return [float(c.strip() == r.strip()) - 0.01 * len(c) for c, r in zip(completions, references)]

The reference is the answer as the model is asked to write it: boxes and points in its family's convention
(grounding.py), as a decoded answer reads them.

`--reward exact,format:0.2` is a comma list of NAME[:WEIGHT]: a built-in name (BUILT_IN), a function in
a Python file (`path/to/rewards.py:short_and_right`) or in an importable module (`package.module:name`).
A completion's reward is the weighted sum of its functions' rewards.
"""

import importlib
import importlib.util
import math
import numbers
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qwen_ft import grounding
from qwen_ft.data.samples import Sample

RewardFunction = Callable[[list[str], list[str], list[Sample]], list[float]]

# A number as people write it: a sign, digits with optional thousands commas, a fraction, an exponent.
NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?")


class RewardError(Exception):
    """A reward spec that can't be loaded, or a reward function that failed; str() names it (and the sample)."""


def normalise(text: str) -> str:
    return text.strip().lower()


def exact(completions: list[str], references: list[str], samples: list[Sample]) -> list[float]:
    """1 when the answer equals the reference, ignoring surrounding whitespace and case; else 0."""
    return [float(normalise(c) == normalise(r)) for c, r in zip(completions, references)]


def contains(completions: list[str], references: list[str], samples: list[Sample]) -> list[float]:
    """1 when the reference appears in the answer, ignoring surrounding whitespace and case; else 0."""
    return [float(normalise(r) in normalise(c)) for c, r in zip(completions, references)]


def last_number(text: str) -> float | None:
    """The last number written in text (answers tend to end with it: "... so 12 apples"), or None."""
    found = NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def numeric_reward(relative_tolerance: float) -> RewardFunction:
    def numeric(completions: list[str], references: list[str], samples: list[Sample]) -> list[float]:
        """1 when the answer's last number is within the relative tolerance of the reference's; else 0."""
        rewards = []
        for completion, reference in zip(completions, references):
            got, want = last_number(completion), last_number(reference)
            close = got is not None and want is not None and math.isclose(got, want, rel_tol=relative_tolerance)
            rewards.append(float(close))
        return rewards

    return numeric


def format_reward(pattern: str) -> RewardFunction:
    regex = re.compile(pattern, re.DOTALL)

    def matches(completions: list[str], references: list[str], samples: list[Sample]) -> list[float]:
        """1 when the whole answer (without surrounding whitespace) matches --format-regex; else 0."""
        return [float(regex.fullmatch(c.strip()) is not None) for c in completions]

    return matches


def iou_reward(family, resize: grounding.Resize) -> RewardFunction:
    """The iou reward for a model of this family (families.py) whose processor resizes images by resize."""

    def iou(completions: list[str], references: list[str], samples: list[Sample]) -> list[float]:
        """The IoU of the answer's box with the reference answer's, both as pixels of the original image (with
        several boxes in the reference, the mean over them of the best IoU of a box of the answer: grounding.scores,
        as eval_iou). 0 when the answer has no box that reads, or the reference none."""
        rewards = []
        for completion, sample in zip(completions, samples):
            target = grounding.reference(sample.messages[-1], sample.image_sizes, family, resize)
            rewards.append(grounding.scores(completion, target).get("iou", 0.0) if target else 0.0)
        return rewards

    return iou


BUILT_IN = ("exact", "contains", "numeric", "format", "iou")


@dataclass(frozen=True)
class Reward:
    name: str  # as logged: reward_<name>
    weight: float
    function: RewardFunction
    spec: str  # as --reward gave it, for messages


def parse_rewards(
    spec: str, format_regex: str | None = None, numeric_tolerance: float = 0.01, collator=None
) -> list[Reward]:
    """The reward functions of a --reward spec; RewardError naming the item that can't be had. collator (its
    family and resize read boxes back as pixels) is needed by iou alone."""
    rewards = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            raise RewardError(f"--reward {spec!r}: an empty item; give NAME[:WEIGHT],... (built in: {BUILT_IN})")
        target, weight = item, 1.0
        head, _, tail = item.rpartition(":")
        if head:  # NAME:WEIGHT, or a function's module:name (whose name is no number)
            try:
                weight, target = float(tail), head
            except ValueError:
                pass
        if target == "format" and not format_regex:
            raise RewardError("--reward format needs --format-regex: the pattern a whole answer must match")
        if target == "format":
            try:
                function = format_reward(format_regex)
            except re.error as e:
                raise RewardError(f"--format-regex {format_regex!r}: {e}") from None
        elif target == "numeric":
            function = numeric_reward(numeric_tolerance)
        elif target == "iou":
            function = iou_reward(collator.family, collator.resized)
        elif target in BUILT_IN:
            function = globals()[target]
        elif ":" in target:
            function = load_function(target)
        else:
            raise RewardError(
                f"--reward: unknown reward {target!r}: built in are {', '.join(BUILT_IN)}; a function of your own "
                "is path/to/file.py:function or package.module:function"
            )
        name = target if target in BUILT_IN else target.rpartition(":")[2]
        if any(r.name == name for r in rewards):
            raise RewardError(f"--reward {spec!r}: two rewards are called {name!r}")
        rewards.append(Reward(name, weight, function, item))
    return rewards


def measures_boxes(rewards: list[Reward]) -> bool:
    """Whether the built-in iou is among the rewards (a function of the user's may be called iou too)."""
    return any(reward.name == "iou" and reward.function.__module__ == __name__ for reward in rewards)


def load_function(target: str) -> RewardFunction:
    """The function `path/to/file.py:name` or `package.module:name` names."""
    module_name, _, function_name = target.rpartition(":")
    if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise RewardError(f"--reward {target}: {path} not found")
        # Under a name of its own, so that a file called rewards.py doesn't replace this module.
        spec = importlib.util.spec_from_file_location(f"qwen_ft_user_rewards_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses and pickling look their module up here
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise RewardError(f"--reward {target}: loading {path} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise RewardError(f"--reward {target}: can't import {module_name}: {e}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise RewardError(f"--reward {target}: {module_name} has no function {function_name!r}")
    return function


def score(
    rewards: list[Reward], completions: list[str], references: list[str], samples: list[Sample]
) -> list[list[float]]:
    """Each reward function's rewards of the completions: one row per function, one float per completion.

    references[i] and samples[i] belong to completions[i]. A function that raises, returns another count
    or something that isn't a finite number stops the run with a RewardError naming it and the sample.
    """
    rows = []
    for reward in rewards:
        try:
            values = list(reward.function(completions, references, samples))
        except Exception as e:
            culprit = first_failing(reward.function, completions, references, samples)
            raise RewardError(f"reward function {reward.spec} raised {type(e).__name__}: {e} (on {culprit})") from None
        if len(values) != len(completions):
            raise RewardError(
                f"reward function {reward.spec} returned {len(values)} rewards for {len(completions)} completions "
                f"(of {describe_samples(samples)}): it must return one float per completion"
            )
        for value, sample in zip(values, samples):
            if not isinstance(value, numbers.Real) or not math.isfinite(value):  # numpy floats and bools are Real
                raise RewardError(
                    f"reward function {reward.spec} returned {value!r} for a completion of {sample.where}: "
                    "a reward must be a finite number"
                )
        rows.append([float(value) for value in values])
    return rows


def first_failing(function: RewardFunction, completions: list[str], references: list[str], samples: list[Sample]):
    """Where a function that failed on a batch fails alone: the first sample whose completion it can't score,
    or all of them if it fails only together."""
    for completion, reference, sample in zip(completions, references, samples):
        try:
            function([completion], [reference], [sample])
        except Exception:
            return sample.where
    return describe_samples(samples)


def describe_samples(samples: list[Sample]) -> str:
    distinct = list(dict.fromkeys(sample.where for sample in samples))
    return distinct[0] + (f" and {len(distinct) - 1} more samples" if len(distinct) > 1 else "")
