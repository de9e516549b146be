"""The choice makers of the story world's program: one scoring formula for every use.

The program (`pipeline.data.storyworld.StoryWorld._run`) asks a `Chooser` for each random
choice; the subclass decides which option is taken and the base class adds its log
probability, so sampling, parsing and enumeration agree bit for bit:
- `Sampler` draws each choice from a `random.Random` (sampling, Monte Carlo entropy);
- `Replayer` returns the choices parsed from a sentence (exact scoring of a text);
- `PathChooser` follows a path of option indices (depth-first enumeration).
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class NoDerivation(Exception):
    """The text being scored leaves the grammar."""


class Chooser(ABC):
    """Makes the program's choices; subclasses pick the option, this class scores it.

    One scoring formula for sampling, parsing and enumeration, so their log-probs agree
    bit for bit.
    """

    def __init__(self) -> None:
        self.logp = 0.0

    def pick(self, key: str, options: Sequence[T], weights: Sequence[float] | None = None) -> T:
        i = self._index(key, options, weights)
        n = len(options)
        self.logp += -math.log(n) if weights is None else math.log(weights[i] / sum(weights))
        return options[i]

    @abstractmethod
    def _index(self, key: str, options: Sequence[Any], weights: Sequence[float] | None) -> int:
        """The index of the option this chooser takes at `key`."""


class Sampler(Chooser):
    """Draws each choice from ``rng``."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.rng = rng

    def _index(self, key: str, options: Sequence[Any], weights: Sequence[float] | None) -> int:
        if weights is None:
            return self.rng.randrange(len(options))
        u, i, acc = self.rng.random() * sum(weights), 0, weights[0]
        while u >= acc and i < len(weights) - 1:
            i += 1
            acc += weights[i]
        return i


class Replayer(Chooser):
    """Returns the choices parsed from the current sentence (``fields``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, Any] = {}

    def _index(self, key: str, options: Sequence[Any], weights: Sequence[float] | None) -> int:
        try:
            return list(options).index(self.fields[key])
        except (KeyError, ValueError):
            raise NoDerivation(key) from None


class PathChooser(Chooser):
    """Follows a path of option indices (0 past its end) and records each choice's size."""

    def __init__(self, path: list[int]) -> None:
        super().__init__()
        self.path, self.sizes = path, []

    def _index(self, key: str, options: Sequence[Any], weights: Sequence[float] | None) -> int:
        if len(self.sizes) == len(self.path):
            self.path.append(0)
        self.sizes.append(len(options))
        return self.path[len(self.sizes) - 1]
