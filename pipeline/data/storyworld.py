"""Synthetic "story world": a seeded probabilistic grammar of simple English stories.

The story world is the pipeline's default data source and the ground truth that trained
models are measured against. Every story is drawn from an explicit probabilistic program,
so ``log p(text)`` is known *exactly*. That gives the evaluation stage three things a real
corpus cannot: the entropy floor (no model can beat the source's entropy rate in bits per
byte on its own samples), the exact KL divergence ``E_p[log p(x) - log q(x)]`` from the
source to a model, and a hallucination check (a generated story with ``p = 0`` is invalid).

Grammar. A story is a sequence of sentences ("events") generated from a small world state:
who is in the story, who is where, who holds which object, which objects are lost where,
and who has a pending feeling together with its cause.

1. Opening: ``[One day, |Once upon a time, ]<Name> was in the <place>.``
2. Events, each one chosen among those the state allows, weighted by
   ``StoryWorldSpec.event_weights``: ``go``, ``arrive``, ``find``, ``lose``, ``give`` and
   ``play`` (optionally prefixed by ``Then ``, ``Later, `` or ``After that, ``), and
   ``react``, a cause/effect sentence that expresses a pending feeling, e.g.
   ``Because Mia was happy, she sang a song.`` Causes are coherent with the state: finding
   or receiving an object makes you happy, losing one sad, someone arriving where you are
   surprised (until you leave); newcomers join someone already in the story; only a holder
   can give, lose or play with an object, and gives only to someone in the same place.
3. Stopping rule: before ``min_sentences`` the story continues, at ``max_sentences`` it
   stops, in between it stops with probability ``stop_prob`` after each sentence (and it
   stops early if no event is possible). The end is part of the probability, exactly like
   an end-of-text token when a language model scores a document.

Every draw is categorical with options and weights computed from the state, and the same
code runs for sampling, scoring (replaying the choices parsed from a text) and
enumeration, so the three cannot disagree. The grammar is **unambiguous**: sentences are
separated by ``". "`` which no sentence contains, the connective prefix of a sentence is
unique, each sentence core maps to one set of choices (checked when the parse table is
built) and the state update is a function of those choices. Each text therefore has at
most one derivation and ``log_prob`` is the log-probability of that single derivation.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

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
_PREFIXES = tuple(p for p in OPENERS + CONNECTIVES if p)
_EVENT_FIELD = {"to": "other", "verb": "action"}  # template slot -> Event field
_LN2 = math.log(2.0)


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


@dataclass
class _State:
    cast: list[str] = field(default_factory=list)
    loc: dict[str, str] = field(default_factory=dict)
    holder: dict[str, str] = field(default_factory=dict)  # object -> character
    lost: dict[str, str] = field(default_factory=dict)  # object -> place it was lost in
    seen: set[str] = field(default_factory=set)  # objects already mentioned
    mood: dict[str, tuple[str, str]] = field(default_factory=dict)  # who -> (feeling, why)
    events: list[Event] = field(default_factory=list)
    sentences: list[str] = field(default_factory=list)


class _NoDerivation(Exception):
    """The text being scored leaves the grammar."""


class _Chooser:
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

    def _index(self, key: str, options: Sequence[Any], weights: Sequence[float] | None) -> int:
        raise NotImplementedError


class _Sampler(_Chooser):
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


class _Replayer(_Chooser):
    """Returns the choices parsed from the current sentence (``fields``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, Any] = {}

    def _index(self, key: str, options: Sequence[Any], weights: Sequence[float] | None) -> int:
        try:
            return list(options).index(self.fields[key])
        except (KeyError, ValueError):
            raise _NoDerivation(key) from None


class _PathChooser(_Chooser):
    """Follows a path of option indices (0 past its end) and records each choice's size."""

    def __init__(self, path: list[int]) -> None:
        super().__init__()
        self.path, self.sizes = path, []

    def _index(self, key: str, options: Sequence[Any], weights: Sequence[float] | None) -> int:
        if len(self.sizes) == len(self.path):
            self.path.append(0)
        self.sizes.append(len(options))
        return self.path[len(self.sizes) - 1]


def _article(obj: str) -> str:
    return "an" if obj[0] in "aeiou" else "a"


class StoryWorld:
    """Sampler, exact scorer, enumerator and QA generator for one ``StoryWorldSpec``."""

    def __init__(self, spec: StoryWorldSpec) -> None:
        self.spec = spec
        self.names = tuple(n for n, _ in NAMES[: self.spec.num_characters])
        self.pron = dict(NAMES[: self.spec.num_characters])
        self.objects = OBJECTS[: self.spec.num_objects]
        self.places = PLACES[: self.spec.num_places]
        self.max_cast = min(self.spec.max_cast, self.spec.num_characters)
        self.weights = [(k, w) for k, w in self.spec.event_weights if w > 0]
        self._actions: dict[str, Callable[[_State, _Chooser], str]] = {
            k: getattr(self, f"_do_{k}") for k in EVENT_KINDS
        }

    # ---- the probabilistic program -------------------------------------------------------
    def _run(self, ch: _Chooser) -> _State:
        st = _State()
        while (sentence := self._step(st, ch)) is not None:
            st.sentences.append(sentence)
        return st

    def _step(self, st: _State, ch: _Chooser) -> str | None:
        """Appends one event to ``st`` and returns its sentence (no period), or None to stop."""
        n, spec = len(st.sentences), self.spec
        if n == 0:
            conn = ch.pick("conn", OPENERS)
            who, place = ch.pick("who", self.names), ch.pick("place", self.places)
            st.cast.append(who)
            st.loc[who] = place
            return conn + self._event(st, "open", who=who, place=place)
        if n >= spec.max_sentences:
            return None
        kinds = [(k, w) for k, w in self.weights if self._allowed(st, k)]
        if not kinds or (n >= spec.min_sentences and self._stops(ch)):
            return None
        kind = ch.pick("kind", [k for k, _ in kinds], [w for _, w in kinds])
        conn = "" if kind == "react" else ch.pick("conn", CONNECTIVES)
        return conn + self._actions[kind](st, ch)

    def _stops(self, ch: _Chooser) -> bool:
        p = self.spec.stop_prob
        return True if p >= 1.0 else ch.pick("stop", (False, True), (1.0 - p, p))

    def _allowed(self, st: _State, kind: str) -> bool:
        if kind == "go":
            return len(self.places) > 1
        if kind == "arrive":
            return len(st.cast) < self.max_cast
        if kind == "find":
            return bool(self._finders(st))
        if kind in ("lose", "play"):
            return bool(st.holder)
        if kind == "give":
            return bool(self._givers(st))
        return bool(st.mood)  # react

    def _event(self, st: _State, kind: str, **kw: str) -> str:
        """Records the event and returns its sentence core (no connective, no period)."""
        fields = {_EVENT_FIELD.get(k, k): v for k, v in kw.items() if k != "art"}
        st.events.append(Event(kind, **fields))
        return CORES[kind].format(**kw)

    def _findable(self, st: _State, who: str) -> list[str]:
        unseen = [o for o in self.objects if o not in st.seen]
        return unseen + [o for o, p in st.lost.items() if p == st.loc[who]]

    def _finders(self, st: _State) -> list[str]:
        return [c for c in st.cast if self._findable(st, c)]

    def _holders(self, st: _State) -> list[str]:
        held = set(st.holder.values())
        return [c for c in st.cast if c in held]

    def _companions(self, st: _State, who: str) -> list[str]:
        return [c for c in st.cast if c != who and st.loc[c] == st.loc[who]]

    def _givers(self, st: _State) -> list[str]:
        return [c for c in self._holders(st) if self._companions(st, c)]

    def _held_by(self, st: _State, who: str) -> list[str]:
        return [o for o, h in st.holder.items() if h == who]

    def _do_go(self, st: _State, ch: _Chooser) -> str:
        who = ch.pick("who", st.cast)
        place = ch.pick("place", [p for p in self.places if p != st.loc[who]])
        st.loc[who] = place
        if st.mood.get(who, ("",))[0] == "surprised":  # surprise stays where it happened
            del st.mood[who]
        return self._event(st, "go", who=who, place=place)

    def _do_arrive(self, st: _State, ch: _Chooser) -> str:
        who = ch.pick("who", [c for c in self.names if c not in st.cast])
        # Newcomers join someone already in the story, so characters meet and can interact.
        place = ch.pick("place", list(dict.fromkeys(st.loc[c] for c in st.cast)))
        core = self._event(st, "arrive", who=who, place=place)
        for other in st.cast:  # everyone already there is surprised by the newcomer
            if st.loc[other] == place:
                st.mood[other] = ("surprised", core)
        st.cast.append(who)
        st.loc[who] = place
        return core

    def _do_find(self, st: _State, ch: _Chooser) -> str:
        who = ch.pick("who", self._finders(st))
        obj = ch.pick("obj", self._findable(st, who))
        art = "the" if obj in st.seen else _article(obj)  # a lost object was mentioned before
        st.seen.add(obj)
        st.lost.pop(obj, None)
        st.holder[obj] = who
        core = self._event(st, "find", who=who, art=art, obj=obj)
        st.mood[who] = ("happy", core)
        return core

    def _do_lose(self, st: _State, ch: _Chooser) -> str:
        who = ch.pick("who", self._holders(st))
        obj = ch.pick("obj", self._held_by(st, who))
        del st.holder[obj]
        st.lost[obj] = st.loc[who]
        core = self._event(st, "lose", who=who, obj=obj, place=st.loc[who])
        st.mood[who] = ("sad", core)
        return core

    def _do_give(self, st: _State, ch: _Chooser) -> str:
        who = ch.pick("who", self._givers(st))
        obj = ch.pick("obj", self._held_by(st, who))
        to = ch.pick("to", self._companions(st, who))
        st.holder[obj] = to
        core = self._event(st, "give", who=who, obj=obj, to=to, place=st.loc[who])
        st.mood[to] = ("happy", core)
        return core

    def _do_play(self, st: _State, ch: _Chooser) -> str:
        who = ch.pick("who", self._holders(st))
        obj = ch.pick("obj", self._held_by(st, who))
        verb = ch.pick("verb", PLAY_VERBS)
        return self._event(st, "play", who=who, verb=verb, obj=obj)

    def _do_react(self, st: _State, ch: _Chooser) -> str:
        who = ch.pick("who", [c for c in st.cast if c in st.mood])
        feeling, reason = st.mood.pop(who)
        template = ch.pick("template", range(len(REACT_TEMPLATES)))
        action = ch.pick("action", REACTIONS[feeling])
        st.events.append(Event("react", who, feeling=feeling, reason=reason, action=action))
        pron = self.pron[who]
        return REACT_TEMPLATES[template].format(who=who, feeling=feeling, pron=pron, action=action)

    # ---- public API ------------------------------------------------------------------------
    def sample(self, rng: random.Random) -> Story:
        """Draws one story from ``rng`` (never the global RNG) with its exact log-prob."""
        ch = _Sampler(rng)
        st = self._run(ch)
        return Story(_join(st.sentences), ch.logp, self._facts(st))

    def parse(self, text: str) -> Story | None:
        """The story (log-prob and facts) behind ``text``, or None if the grammar cannot
        produce it. Used to score and to ask questions about generated stories."""
        sentences = _split(text)
        if sentences is None:
            return None
        ch, st = _Replayer(), _State()
        try:
            for sentence in sentences:
                ch.fields = self._parse(sentence)
                if self._step(st, ch) != sentence:  # catches state-dependent wording too
                    return None
                st.sentences.append(sentence)
            ch.fields = {"stop": True}
            if self._step(st, ch) is not None:
                return None
        except _NoDerivation:
            return None
        return Story(text, ch.logp, self._facts(st))

    def log_prob(self, text: str) -> float:
        """Exact natural-log probability of ``text`` (its only derivation), -inf if none."""
        story = self.parse(text)
        return -math.inf if story is None else story.log_prob

    def is_valid(self, text: str) -> bool:
        """True when the grammar can produce ``text`` (used to measure hallucinations)."""
        return self.log_prob(text) > -math.inf

    def enumerate(self, max_docs: int | None = None) -> Iterator[tuple[str, float]]:
        """Yields every (text, probability) pair, depth first; only feasible for tiny specs.

        The grammar is unambiguous, so each derivation is a distinct text.
        """
        path: list[int] = []
        for _ in range(max_docs) if max_docs is not None else itertools.count():
            ch = _PathChooser(path)
            yield _join(self._run(ch).sentences), math.exp(ch.logp)
            # Odometer step: bump the deepest choice that still has an untried option.
            while path and path[-1] + 1 >= ch.sizes[len(path) - 1]:
                path.pop()
            if not path:
                return
            path[-1] += 1

    def entropy_rate(self, num_docs: int, seed: int) -> EntropyEstimate:
        """Monte Carlo entropy rate in bits per UTF-8 byte of the story text.

        Ratio estimator ``sum(-log2 p(doc)) / sum(len(doc.encode("utf-8")))`` over
        ``num_docs`` samples, with the delta-method (ratio of means) standard error. The
        probability includes the stopping decision, as a language model scores a document
        followed by an end-of-text token; the byte count is the text's bytes only.
        """
        if num_docs < 2:
            raise ValueError(f"num_docs must be >= 2, got {num_docs}")
        rng = random.Random(seed)
        bits, nbytes = np.empty(num_docs), np.empty(num_docs)
        for i in range(num_docs):
            ch = _Sampler(rng)
            text = _join(self._run(ch).sentences)
            bits[i], nbytes[i] = -ch.logp / _LN2, len(text.encode("utf-8"))
        rate = float(bits.sum() / nbytes.sum())
        # Delta method: Var(sum X / sum Y) ~ Var(X - rate * Y) / (n * mean(Y)^2).
        stderr = float(np.sqrt((bits - rate * nbytes).var(ddof=1) / num_docs) / nbytes.mean())
        return EntropyEstimate(rate, stderr, num_docs, float(bits.mean()), float(nbytes.mean()))

    def questions(self, story: Story, rng: random.Random) -> list[QA]:
        """Question/answer pairs whose answers follow from the story text alone."""
        f, qa = story.facts, []
        opening = f.events[0]
        qa.append(QA(f"Where was {opening.who} at the start?", f"the {opening.place}"))
        for who, place in f.locations:
            ask = rng.choice(("Where was {} at the end?", "Where did {} end up?"))
            qa.append(QA(ask.format(who), f"the {place}"))
        for obj, who in f.holders:
            ask = rng.choice(("Who had the {} at the end?", "Who ended up with the {}?"))
            qa.append(QA(ask.format(obj), who))
        for e in _unique(f.events, "find", lambda e: (e.who,)):
            qa.append(QA(f"What did {e.who} find?", f"the {e.obj}"))
        for e in _unique(f.events, "give", lambda e: (e.obj, e.other)):
            qa.append(QA(f"Who gave the {e.obj} to {e.other}?", e.who))
        for e in _unique(f.events, "react", lambda e: (e.who, e.feeling)):
            qa.append(QA(f"Why was {e.who} {e.feeling}?", str(e.reason)))
            ask = f"What did {e.who} do when {self.pron[e.who]} was {e.feeling}?"
            qa.append(QA(ask, str(e.action)))
        rng.shuffle(qa)
        return qa

    # ---- parsing -------------------------------------------------------------------------------
    def _parse(self, sentence: str) -> dict[str, Any]:
        """The choices that would produce ``sentence``; its wording is checked on replay."""
        conn = next((p for p in _PREFIXES if sentence.startswith(p)), "")
        entry = self._table.get(sentence[len(conn) :])
        if entry is None:
            raise _NoDerivation(sentence)
        kind, values = entry
        return {"stop": False, "kind": kind, "conn": conn, **values}

    @cached_property
    def _table(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """Sentence core -> (kind, choices); built lazily and checked to be unambiguous."""
        table: dict[str, tuple[str, dict[str, Any]]] = {}

        def add(core: str, kind: str, **values: Any) -> None:
            if core in table or core.startswith(_PREFIXES):
                raise RuntimeError(f"story world grammar is ambiguous at {core!r}")
            table[core] = (kind, values)

        for who in self.names:
            for place in self.places:
                for kind in ("open", "go", "arrive"):
                    add(CORES[kind].format(who=who, place=place), kind, who=who, place=place)
            for obj in self.objects:
                for art in (_article(obj), "the"):
                    add(CORES["find"].format(who=who, art=art, obj=obj), "find", who=who, obj=obj)
                add(CORES["lose"].format(who=who, obj=obj), "lose", who=who, obj=obj)
                for verb in PLAY_VERBS:
                    core = CORES["play"].format(who=who, verb=verb, obj=obj)
                    add(core, "play", who=who, obj=obj, verb=verb)
                for to in self.names:
                    if to != who:
                        core = CORES["give"].format(who=who, obj=obj, to=to)
                        add(core, "give", who=who, obj=obj, to=to)
            for feeling, actions in REACTIONS.items():
                for t, template in enumerate(REACT_TEMPLATES):
                    for action in actions:
                        core = template.format(
                            who=who, feeling=feeling, pron=self.pron[who], action=action
                        )
                        add(core, "react", who=who, template=t, action=action)
        return table

    def _facts(self, st: _State) -> StoryFacts:
        locations = tuple((c, st.loc[c]) for c in st.cast)
        holders = tuple((o, st.holder[o]) for o in self.objects if o in st.holder)
        return StoryFacts(tuple(st.events), tuple(st.cast), locations, holders)


def _unique(events: Sequence[Event], kind: str, key: Callable[[Event], tuple]) -> list[Event]:
    """Events of ``kind`` whose key occurs exactly once among events of that kind."""
    matching = [e for e in events if e.kind == kind]
    keys = [key(e) for e in matching]
    return [e for e, k in zip(matching, keys, strict=True) if keys.count(k) == 1]


def _join(sentences: Sequence[str]) -> str:
    return ". ".join(sentences) + "."


def _split(text: str) -> list[str] | None:
    if not text.endswith(".") or "\n" in text:
        return None
    sentences = text[:-1].split(". ")
    return None if any(not s for s in sentences) else sentences


def generate(spec: StoryWorldSpec, num_docs: int, seed: int) -> list[Story]:
    """``num_docs`` stories, fully determined by ``seed`` (a private ``random.Random``)."""
    world, rng = StoryWorld(spec), random.Random(seed)
    return [world.sample(rng) for _ in range(num_docs)]
