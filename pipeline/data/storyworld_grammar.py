"""The story world's words and templates, its knobs, the records of a story, the parse table.

    StoryWorldSpec(num_characters=12, num_objects=16, num_places=10, min_sentences=3,
                   max_sentences=10, stop_prob=0.2, max_cast=3)

The word lists and sentence templates are the grammar's terminals; `pipeline.data.storyworld`
runs the probabilistic program over them (its module docstring gives the grammar), and
`sentence_table` inverts the templates so a text parses back into the program's choices. A
spec takes the first N entries of each list; params.yaml's `storyworld:` section owns its
values (`pipeline.data.ingest.storyworld_spec`). `Story`, `StoryFacts`, `Event` and `QA` are
what sampling and parsing return; `EntropyEstimate` is the Monte Carlo entropy rate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

NAMES: tuple[tuple[str, str], ...] = tuple(
    (name, "she" if gender == "f" else "he")
    for name, gender in (
        ("Mia", "f"), ("Tom", "m"), ("Lily", "f"), ("Ben", "m"), ("Anna", "f"), ("Max", "m"),
        ("Emma", "f"), ("Sam", "m"), ("Lucy", "f"), ("Jack", "m"), ("Zoe", "f"), ("Leo", "m"),
        ("Ella", "f"), ("Noah", "m"), ("Ruby", "f"), ("Finn", "m"), ("Grace", "f"),
        ("Owen", "m"), ("Ivy", "f"), ("Jake", "m"), ("Rosa", "f"), ("Dan", "m"),
        ("Nina", "f"), ("Hugo", "m"),
    )
)  # fmt: skip
OBJECTS: tuple[str, ...] = (
    "red ball", "old book", "blue kite", "small box", "toy car", "green hat", "shiny coin",
    "yellow cup", "wooden boat", "soft teddy", "big apple", "little drum", "paper plane",
    "silver key", "pink doll", "long rope", "orange kite", "purple crayon", "warm scarf",
    "glass jar", "brown basket", "tiny bell", "striped sock", "picture book",
)  # fmt: skip
PLACES: tuple[str, ...] = (
    "park", "garden", "kitchen", "forest", "school", "library", "market", "barn",
    "playground", "zoo", "bakery", "attic", "yard", "bedroom", "classroom", "shop",
)  # fmt: skip
OPENERS: tuple[str, ...] = ("", "One day, ", "Once upon a time, ")
CONNECTIVES: tuple[str, ...] = ("", "Then ", "Later, ", "After that, ")
PLAY_VERBS: tuple[str, ...] = ("played with", "looked at", "carried", "cleaned")
REACTIONS: dict[str, tuple[str, ...]] = {
    "happy": ("sang a song", "danced", "laughed", "smiled", "clapped", "jumped up and down"),
    "sad": ("cried", "sighed", "sat down", "frowned"),
    "surprised": ("gasped", "waved", "said hello"),
}
REACT_TEMPLATES: tuple[str, ...] = (
    "Because {who} was {feeling}, {pron} {action}",
    "{who} was {feeling}, so {pron} {action}",
    "{who} felt {feeling} and {action}",
)
CORES: dict[str, str] = {
    "open": "{who} was in the {place}",
    "go": "{who} went to the {place}",
    "arrive": "{who} came to the {place}",
    "find": "{who} found {art} {obj}",
    "lose": "{who} lost the {obj}",
    "give": "{who} gave the {obj} to {to}",
    "play": "{who} {verb} the {obj}",
}
EVENT_KINDS: tuple[str, ...] = ("go", "arrive", "find", "lose", "give", "play", "react")
DEFAULT_EVENT_WEIGHTS: tuple[tuple[str, float], ...] = (
    ("go", 3.0), ("arrive", 2.0), ("find", 3.0), ("lose", 1.0),
    ("give", 2.0), ("play", 1.0), ("react", 4.0),
)  # fmt: skip
PREFIXES = tuple(p for p in OPENERS + CONNECTIVES if p)  # what a sentence may start with


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"StoryWorldSpec.{name} must be an integer in [{lo}, {hi}], got {value!r}")


@dataclass(frozen=True)
class StoryWorldSpec:
    """Knobs of the story world; word lists are the first N entries of the built-in lists.

    ``min_sentences``/``max_sentences`` count sentences including the opening one.
    ``event_weights`` may be given as a mapping; it is normalised to ``(kind, weight)`` pairs.
    The first seven fields have no default on purpose: ``storyworld:`` in params.yaml owns
    them (``pipeline.data.ingest.storyworld_spec`` builds the pipeline's spec from it), and a
    second default here would silently disagree with it.
    """

    num_characters: int
    num_objects: int
    num_places: int
    min_sentences: int
    max_sentences: int
    stop_prob: float
    max_cast: int
    event_weights: tuple[tuple[str, float], ...] = DEFAULT_EVENT_WEIGHTS

    def __post_init__(self) -> None:
        _check_int("num_characters", self.num_characters, 1, len(NAMES))
        _check_int("num_objects", self.num_objects, 1, len(OBJECTS))
        _check_int("num_places", self.num_places, 1, len(PLACES))
        _check_int("min_sentences", self.min_sentences, 1, 64)
        _check_int("max_sentences", self.max_sentences, self.min_sentences, 64)
        _check_int("max_cast", self.max_cast, 1, len(NAMES))
        if not (_is_number(self.stop_prob) and 0.0 < self.stop_prob <= 1.0):
            raise ValueError(f"StoryWorldSpec.stop_prob must be in (0, 1], got {self.stop_prob!r}")
        given = self.event_weights
        try:
            weights = dict(given.items() if isinstance(given, Mapping) else given)
        except (TypeError, ValueError):
            weights = {}
        if set(weights) != set(EVENT_KINDS) or not all(
            _is_number(w) and math.isfinite(w) and w >= 0 for w in weights.values()
        ):
            raise ValueError(
                f"StoryWorldSpec.event_weights must give a finite weight >= 0 to each of "
                f"{list(EVENT_KINDS)}, got {given!r}"
            )
        normalised = tuple((k, float(weights[k])) for k in EVENT_KINDS)
        object.__setattr__(self, "event_weights", normalised)


@dataclass(frozen=True)
class Event:
    """One sentence of a story as structured data (fields unused by a kind are None)."""

    kind: str
    who: str
    place: str | None = None
    obj: str | None = None
    other: str | None = None  # receiver of a gift
    feeling: str | None = None
    reason: str | None = None  # react: the sentence (no connective) that caused the feeling
    action: str | None = None  # play verb or reaction


@dataclass(frozen=True)
class StoryFacts:
    """Ground truth about a story: its events and the final state of the world."""

    events: tuple[Event, ...]
    cast: tuple[str, ...]
    locations: tuple[tuple[str, str], ...]  # (character, place at the end)
    holders: tuple[tuple[str, str], ...]  # (object, character holding it at the end)


@dataclass(frozen=True)
class Story:
    text: str
    log_prob: float  # natural log of the exact probability of ``text``
    facts: StoryFacts


@dataclass(frozen=True)
class QA:
    question: str
    answer: str


@dataclass(frozen=True)
class EntropyEstimate:
    """Entropy rate in bits per UTF-8 byte (ratio of means) with its delta-method stderr."""

    bits_per_byte: float
    stderr: float
    num_docs: int
    bits_per_doc: float
    bytes_per_doc: float


def article(obj: str) -> str:
    return "an" if obj[0] in "aeiou" else "a"


def sentence_table(
    names: Sequence[str], pron: Mapping[str, str], objects: Sequence[str], places: Sequence[str]
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Sentence core -> (kind, choices) for every sentence a world over these words can say.

    The inverse of the templates, used to parse a text back into the program's choices.
    Checked to be unambiguous: no two choice sets give one core, and no core starts with a
    connective (`PREFIXES`), so a sentence has at most one derivation.
    """
    table: dict[str, tuple[str, dict[str, Any]]] = {}

    def add(core: str, kind: str, **values: Any) -> None:
        if core in table or core.startswith(PREFIXES):
            raise RuntimeError(f"story world grammar is ambiguous at {core!r}")
        table[core] = (kind, values)

    for who in names:
        for place in places:
            for kind in ("open", "go", "arrive"):
                add(CORES[kind].format(who=who, place=place), kind, who=who, place=place)
        for obj in objects:
            for art in (article(obj), "the"):
                add(CORES["find"].format(who=who, art=art, obj=obj), "find", who=who, obj=obj)
            add(CORES["lose"].format(who=who, obj=obj), "lose", who=who, obj=obj)
            for verb in PLAY_VERBS:
                core = CORES["play"].format(who=who, verb=verb, obj=obj)
                add(core, "play", who=who, obj=obj, verb=verb)
            for to in names:
                if to != who:
                    core = CORES["give"].format(who=who, obj=obj, to=to)
                    add(core, "give", who=who, obj=obj, to=to)
        for feeling, actions in REACTIONS.items():
            for t, template in enumerate(REACT_TEMPLATES):
                for action in actions:
                    core = template.format(who=who, feeling=feeling, pron=pron[who], action=action)
                    add(core, "react", who=who, template=t, action=action)
    return table
