"""Tests for the synthetic story-world source: exact probabilities, parsing, QA, entropy."""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import load_config
from pipeline.config.schema import StoryWorldConfig
from pipeline.data.ingest import storyworld_spec
from pipeline.data.storyworld import StoryWorld, generate
from pipeline.data.storyworld_grammar import DEFAULT_EVENT_WEIGHTS, QA, StoryWorldSpec

# The wide spec most tests use (the old library defaults: 24 names, 24 objects, 16 places).
# StoryWorldSpec has no defaults, since params.yaml owns them, so tests say what they use.
WIDE_FIELDS: dict = {
    "num_characters": 24,
    "num_objects": 24,
    "num_places": 16,
    "min_sentences": 3,
    "max_sentences": 12,
    "stop_prob": 0.2,
    "max_cast": 3,
}
WIDE = StoryWorldSpec(**WIDE_FIELDS)


def spec_with(**overrides) -> StoryWorldSpec:
    """WIDE with some fields replaced."""
    return StoryWorldSpec(**{**WIDE_FIELDS, **overrides})


# Small enough to enumerate every story (5,340 of them), big enough for go/arrive/find/react.
TINY = spec_with(
    num_characters=2, num_objects=1, num_places=2, min_sentences=1, max_sentences=3, max_cast=2
)
# One place, so everyone meets: enumerates gifts, losses, re-finds and reactions (15,624).
MEETING = spec_with(
    num_characters=2,
    num_objects=1,
    num_places=1,
    min_sentences=3,
    max_sentences=4,
    max_cast=2,
    event_weights={**dict(DEFAULT_EVENT_WEIGHTS), "play": 0.0},
)
# Hand-built story over the WIDE spec; its probability is worked out in
# test_hand_built_story_probability.
HAND_BUILT = (
    "Mia was in the park. Tom came to the park. Because Mia was surprised, she waved. "
    "Then Mia found a red ball. Mia gave the red ball to Tom. Tom felt happy and laughed."
)


@pytest.fixture(scope="module")
def world() -> StoryWorld:
    return StoryWorld(WIDE)


@pytest.fixture(scope="module")
def tiny_docs() -> list[tuple[str, float]]:
    return list(StoryWorld(TINY).enumerate())


@pytest.fixture(scope="module")
def meeting_docs() -> list[tuple[str, float]]:
    return list(StoryWorld(MEETING).enumerate())


def exact_rate(docs: list[tuple[str, float]]) -> float:
    """Exact entropy rate (bits per byte) of an enumerated source: H / E[bytes]."""
    bits = math.fsum(-p * math.log2(p) for _, p in docs)
    return bits / math.fsum(p * len(text.encode("utf-8")) for text, p in docs)


# ---- exact probabilities -----------------------------------------------------------------
@pytest.mark.parametrize("docs_fixture", ["tiny_docs", "meeting_docs"])
def test_enumerated_probabilities_sum_to_one_and_texts_are_distinct(
    docs_fixture: str, request: pytest.FixtureRequest
) -> None:
    docs = request.getfixturevalue(docs_fixture)
    assert math.fsum(p for _, p in docs) == pytest.approx(1.0, abs=1e-9)
    assert len({text for text, _ in docs}) == len(docs)  # unambiguous: one derivation per text
    assert all(p > 0 for _, p in docs)


def test_meeting_spec_covers_every_event_kind(meeting_docs: list[tuple[str, float]]) -> None:
    texts = " ".join(text for text, _ in meeting_docs)
    markers = (" came to ", " found a ", " found the ", " lost ", " gave ", "Because ", " felt ")
    for marker in markers:
        assert marker in texts, marker


def test_log_prob_parses_enumerated_meeting_texts(meeting_docs: list[tuple[str, float]]) -> None:
    world = StoryWorld(MEETING)
    for text, p in meeting_docs[::7]:
        assert world.log_prob(text) == pytest.approx(math.log(p), abs=1e-9)


def test_sample_frequencies_match_enumerated_probabilities(
    tiny_docs: list[tuple[str, float]],
) -> None:
    world, rng, n = StoryWorld(TINY), random.Random(4), 20_000
    counts = Counter(world.sample(rng).text for _ in range(n))
    for text, p in sorted(tiny_docs, key=lambda d: -d[1])[:20]:
        assert abs(counts[text] - n * p) < 5 * math.sqrt(n * p * (1 - p)), text


def test_log_prob_parses_every_enumerated_text(tiny_docs: list[tuple[str, float]]) -> None:
    world = StoryWorld(TINY)
    for text, p in tiny_docs:
        assert world.log_prob(text) == pytest.approx(math.log(p), abs=1e-9)


def test_enumerate_respects_max_docs() -> None:
    assert len(list(StoryWorld(TINY).enumerate(max_docs=10))) == 10


def test_log_prob_matches_sampled_stories(world: StoryWorld) -> None:
    rng = random.Random(123)
    for _ in range(200):
        story = world.sample(rng)
        assert world.log_prob(story.text) == pytest.approx(story.log_prob, abs=1e-9)
        assert world.is_valid(story.text)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chars=st.integers(1, 24),
    objects=st.integers(1, 24),
    places=st.integers(1, 16),
    lo=st.integers(1, 6),
    extra=st.integers(0, 8),
    stop=st.floats(0.05, 1.0),
    cast=st.integers(1, 5),
    seed=st.integers(0, 2**32),
)
def test_log_prob_matches_samples_for_any_spec(
    chars: int, objects: int, places: int, lo: int, extra: int, stop: float, cast: int, seed: int
) -> None:
    spec = StoryWorldSpec(chars, objects, places, lo, lo + extra, stop, cast)
    world, rng = StoryWorld(spec), random.Random(seed)
    for _ in range(10):
        story = world.sample(rng)
        assert world.log_prob(story.text) == pytest.approx(story.log_prob, abs=1e-9)


def test_hand_built_story_probability(world: StoryWorld) -> None:
    # Choice by choice under the default spec (weights go 3, arrive 2, find 3, lose 1,
    # give 2, play 1, react 4; 24 names, 24 objects, 16 places; min 3 sentences, stop 0.2).
    p = (1 / 3) * (1 / 24) * (1 / 16)  # no opener, Mia, park
    p *= (2 / 8) * (1 / 4) * (1 / 23) * 1  # arrive of go/arrive/find, no conn, Tom, Mia's park
    p *= (4 / 12) * 1 * (1 / 3) * (1 / 3)  # react (Mia surprised), template, "waved"
    p *= 0.8 * (3 / 8) * (1 / 4) * (1 / 2) * (1 / 24)  # go on, find, "Then", Mia, red ball
    p *= 0.8 * (2 / 16) * (1 / 4)  # go on, give (all 7 kinds allowed), no conn; only choice
    p *= 0.8 * (4 / 16) * (1 / 2) * (1 / 3) * (1 / 6)  # react: Tom of Mia/Tom, "laughed"
    p *= 0.2  # stop
    assert world.log_prob(HAND_BUILT) == pytest.approx(math.log(p), abs=1e-12)


# ---- invalid texts ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        HAND_BUILT.replace("park", "prak", 1),  # typo
        HAND_BUILT.replace("Mia was in the park", "Mia in was the park"),  # swapped words
        HAND_BUILT[:-9],  # truncated mid-sentence
        "Mia was in the park. Tom came to the park.",  # truncated below min_sentences
        HAND_BUILT + " Tom felt happy and laughed.",  # Tom's feeling was already expressed
        HAND_BUILT + " Mia gave the red ball to Tom.",  # Mia no longer holds the ball
        HAND_BUILT.replace("found a red ball", "found the red ball"),  # never mentioned before
        HAND_BUILT.replace("Tom felt", "Tom was"),  # broken template
        HAND_BUILT + " ",  # trailing whitespace
        HAND_BUILT.replace(". ", ".  ", 1),  # double space
        HAND_BUILT.replace(". ", ".\n", 1),  # newline
        HAND_BUILT[:-1],  # missing final period
        HAND_BUILT.lower(),
        "Then Mia was in the park. Tom came to the park. Tom went to the zoo.",  # bad opener
        "Mia was in the park. Tom came to the zoo. Tom went to the park.",  # Tom joins nobody
        "Mia was in the park. Tom came to the park. Mia went to the zoo. "
        "Because Mia was surprised, she waved.",  # surprise ends when Mia leaves
        "",
    ],
)
def test_texts_outside_the_grammar_are_invalid(world: StoryWorld, text: str) -> None:
    assert world.log_prob(text) == -math.inf
    assert not world.is_valid(text)


def test_truncation_at_a_sentence_boundary_is_a_shorter_valid_story(world: StoryWorld) -> None:
    # Stopping is a choice of the grammar, so a prefix with >= min_sentences is a story too.
    assert world.is_valid(HAND_BUILT.rsplit(". ", 3)[0] + ".")


def test_extra_sentence_beyond_max_is_invalid() -> None:
    spec = spec_with(min_sentences=3, max_sentences=3)
    world = StoryWorld(spec)
    text = "Mia was in the park. Mia went to the zoo. Mia went to the park."
    assert world.is_valid(text)
    assert not world.is_valid(text + " Mia went to the zoo.")
    assert not world.is_valid("Mia was in the park. Mia went to the zoo.")  # truncated


def test_words_outside_the_spec_are_invalid() -> None:
    world = StoryWorld(spec_with(num_characters=2, num_places=2, min_sentences=1))
    assert world.is_valid("Mia was in the garden.")
    assert not world.is_valid("Lily was in the garden.")  # third name
    assert not world.is_valid("Mia was in the kitchen.")  # third place


# ---- text format and determinism ---------------------------------------------------------
def test_texts_are_plain_single_line_sentences(world: StoryWorld) -> None:
    for story in generate(WIDE, 300, seed=5):
        text = story.text
        assert text.isascii() and "\n" not in text and text == text.strip()
        assert "  " not in text and text.endswith(".")
        for sentence in text[:-1].split(". "):
            assert sentence[0].isupper() and "." not in sentence


def test_generate_is_deterministic_and_leaves_global_rng_alone() -> None:
    spec = WIDE
    random.seed(99)
    expected_global = random.random()
    random.seed(99)
    first = generate(spec, 50, seed=7)
    assert random.random() == expected_global
    assert generate(spec, 50, seed=7) == first
    assert [s.text for s in generate(spec, 50, seed=8)] != [s.text for s in first]


# ---- entropy -----------------------------------------------------------------------------
def test_entropy_estimates_agree_across_seeds(world: StoryWorld) -> None:
    a, b = world.entropy_rate(10_000, seed=1), world.entropy_rate(10_000, seed=2)
    assert a.num_docs == b.num_docs == 10_000
    assert abs(a.bits_per_byte - b.bits_per_byte) < 3 * math.hypot(a.stderr, b.stderr)
    assert a.bits_per_byte == pytest.approx(a.bits_per_doc / a.bytes_per_doc)
    assert 0 < a.stderr < 0.01 * a.bits_per_byte


def test_entropy_estimate_matches_exact_entropy(tiny_docs: list[tuple[str, float]]) -> None:
    estimate = StoryWorld(TINY).entropy_rate(20_000, seed=3)
    assert abs(estimate.bits_per_byte - exact_rate(tiny_docs)) < 4 * estimate.stderr


def test_entropy_rate_rejects_too_few_docs(world: StoryWorld) -> None:
    with pytest.raises(ValueError, match="num_docs"):
        world.entropy_rate(1, seed=0)


# ---- questions -----------------------------------------------------------------------------
def test_hand_built_questions(world: StoryWorld) -> None:
    story = world.parse(HAND_BUILT)
    assert story is not None
    answers = {qa.question: qa.answer for qa in world.questions(story, random.Random(0))}
    assert answers["Where was Mia at the start?"] == "the park"
    assert answers["What did Mia find?"] == "the red ball"
    assert answers["Who gave the red ball to Tom?"] == "Mia"
    assert answers["Why was Mia surprised?"] == "Tom came to the park"
    assert answers["Why was Tom happy?"] == "Mia gave the red ball to Tom"
    assert answers["What did Tom do when he was happy?"] == "laughed"
    holder = {"Who had the red ball at the end?", "Who ended up with the red ball?"}
    assert [a for q, a in answers.items() if q in holder] == ["Tom"]
    assert "Why was Mia happy?" not in answers  # Mia's happiness was never stated


def test_answers_appear_in_the_story(world: StoryWorld) -> None:
    rng = random.Random(11)
    for _ in range(200):
        story = world.sample(rng)
        qas = world.questions(story, rng)
        assert qas and all(isinstance(qa, QA) for qa in qas)
        for qa in qas:
            assert re.search(rf"\b{re.escape(qa.answer.removeprefix('the '))}\b", story.text), qa


def test_repeated_feelings_are_not_asked_about(world: StoryWorld) -> None:
    text = (
        "Mia was in the park. Mia found a red ball. Mia felt happy and danced. "
        "Mia found an old book. Mia felt happy and smiled."
    )
    story = world.parse(text)
    assert story is not None
    questions = [qa.question for qa in world.questions(story, random.Random(0))]
    assert not any(q.startswith("Why was Mia happy") for q in questions)


# ---- spec validation -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_characters": 0}, "num_characters"),
        ({"num_characters": 25}, "num_characters"),
        ({"num_objects": 0}, "num_objects"),
        ({"num_places": 17}, "num_places"),
        ({"min_sentences": 0}, "min_sentences"),
        ({"min_sentences": 5, "max_sentences": 4}, "max_sentences"),
        ({"max_cast": 0}, "max_cast"),
        ({"stop_prob": 0.0}, "stop_prob"),
        ({"stop_prob": 1.5}, "stop_prob"),
        ({"num_places": 2.5}, "num_places"),
        ({"stop_prob": "0.5"}, "stop_prob"),
        ({"event_weights": {"go": 1.0}}, "event_weights"),
        ({"event_weights": (("go",),)}, "event_weights"),
        ({"event_weights": {**dict(DEFAULT_EVENT_WEIGHTS), "go": "3"}}, "event_weights"),
        ({"event_weights": {**dict(DEFAULT_EVENT_WEIGHTS), "fly": 1.0}}, "event_weights"),
        ({"event_weights": {**dict(DEFAULT_EVENT_WEIGHTS), "go": -1.0}}, "event_weights"),
    ],
)
def test_spec_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"StoryWorldSpec\.{field} must"):
        spec_with(**kwargs)


def test_event_weights_mapping_is_normalised() -> None:
    spec = spec_with(event_weights=dict(DEFAULT_EVENT_WEIGHTS))
    assert spec == WIDE
    assert hash(spec) == hash(WIDE)


def test_spec_has_no_defaults_that_params_yaml_owns(project) -> None:
    """Every `storyworld:` key is a required StoryWorldSpec field, filled from the config."""
    owned = [f.name for f in dataclasses.fields(StoryWorldConfig)]
    fields = {f.name: f for f in dataclasses.fields(StoryWorldSpec)}
    for name in owned:
        assert fields[name].default is dataclasses.MISSING, f"StoryWorldSpec.{name} has a default"
    with pytest.raises(TypeError):
        StoryWorldSpec()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        StoryWorld()  # type: ignore[call-arg]
    cfg = load_config(project, overrides=["storyworld.num_places=7", "storyworld.stop_prob=0.3"])
    spec = storyworld_spec(cfg)
    assert (spec.num_places, spec.stop_prob) == (7, 0.3)
    assert {n: getattr(spec, n) for n in owned} == dataclasses.asdict(cfg.storyworld)
