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

Modules: the words, templates, spec, story records and parse table are
`pipeline/data/storyworld_grammar.py`; the choice makers (sample, replay a parse, enumerate)
are `pipeline/data/storyworld_choosers.py`; this module is the program and its public API.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from pipeline.data.storyworld_choosers import (
    Chooser,
    NoDerivation,
    PathChooser,
    Replayer,
    Sampler,
)
from pipeline.data.storyworld_grammar import (
    CONNECTIVES,
    CORES,
    EVENT_KINDS,
    NAMES,
    OBJECTS,
    OPENERS,
    PLACES,
    PLAY_VERBS,
    PREFIXES,
    QA,
    REACT_TEMPLATES,
    REACTIONS,
    EntropyEstimate,
    Event,
    Story,
    StoryFacts,
    StoryWorldSpec,
    article,
    sentence_table,
)

_EVENT_FIELD = {"to": "other", "verb": "action"}  # template slot -> Event field
_LN2 = math.log(2.0)


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
        self._actions: dict[str, Callable[[_State, Chooser], str]] = {
            k: getattr(self, f"_do_{k}") for k in EVENT_KINDS
        }

    # ---- the probabilistic program -------------------------------------------------------
    def _run(self, ch: Chooser) -> _State:
        st = _State()
        while (sentence := self._step(st, ch)) is not None:
            st.sentences.append(sentence)
        return st

    def _step(self, st: _State, ch: Chooser) -> str | None:
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

    def _stops(self, ch: Chooser) -> bool:
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

    def _do_go(self, st: _State, ch: Chooser) -> str:
        who = ch.pick("who", st.cast)
        place = ch.pick("place", [p for p in self.places if p != st.loc[who]])
        st.loc[who] = place
        if st.mood.get(who, ("",))[0] == "surprised":  # surprise stays where it happened
            del st.mood[who]
        return self._event(st, "go", who=who, place=place)

    def _do_arrive(self, st: _State, ch: Chooser) -> str:
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

    def _do_find(self, st: _State, ch: Chooser) -> str:
        who = ch.pick("who", self._finders(st))
        obj = ch.pick("obj", self._findable(st, who))
        art = "the" if obj in st.seen else article(obj)  # a lost object was mentioned before
        st.seen.add(obj)
        st.lost.pop(obj, None)
        st.holder[obj] = who
        core = self._event(st, "find", who=who, art=art, obj=obj)
        st.mood[who] = ("happy", core)
        return core

    def _do_lose(self, st: _State, ch: Chooser) -> str:
        who = ch.pick("who", self._holders(st))
        obj = ch.pick("obj", self._held_by(st, who))
        del st.holder[obj]
        st.lost[obj] = st.loc[who]
        core = self._event(st, "lose", who=who, obj=obj, place=st.loc[who])
        st.mood[who] = ("sad", core)
        return core

    def _do_give(self, st: _State, ch: Chooser) -> str:
        who = ch.pick("who", self._givers(st))
        obj = ch.pick("obj", self._held_by(st, who))
        to = ch.pick("to", self._companions(st, who))
        st.holder[obj] = to
        core = self._event(st, "give", who=who, obj=obj, to=to, place=st.loc[who])
        st.mood[to] = ("happy", core)
        return core

    def _do_play(self, st: _State, ch: Chooser) -> str:
        who = ch.pick("who", self._holders(st))
        obj = ch.pick("obj", self._held_by(st, who))
        verb = ch.pick("verb", PLAY_VERBS)
        return self._event(st, "play", who=who, verb=verb, obj=obj)

    def _do_react(self, st: _State, ch: Chooser) -> str:
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
        ch = Sampler(rng)
        st = self._run(ch)
        return Story(_join(st.sentences), ch.logp, self._facts(st))

    def parse(self, text: str) -> Story | None:
        """The story (log-prob and facts) behind ``text``, or None if the grammar cannot
        produce it. Used to score and to ask questions about generated stories."""
        sentences = _split(text)
        if sentences is None:
            return None
        ch, st = Replayer(), _State()
        try:
            for sentence in sentences:
                ch.fields = self._parse(sentence)
                if self._step(st, ch) != sentence:  # catches state-dependent wording too
                    return None
                st.sentences.append(sentence)
            ch.fields = {"stop": True}
            if self._step(st, ch) is not None:
                return None
        except NoDerivation:
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
            ch = PathChooser(path)
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
            ch = Sampler(rng)
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
        conn = next((p for p in PREFIXES if sentence.startswith(p)), "")
        entry = self._table.get(sentence[len(conn) :])
        if entry is None:
            raise NoDerivation(sentence)
        kind, values = entry
        return {"stop": False, "kind": kind, "conn": conn, **values}

    @cached_property
    def _table(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """Sentence core -> (kind, choices) of this world; built lazily (see `sentence_table`)."""
        return sentence_table(self.names, self.pron, self.objects, self.places)

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
