"""The fine-tuning task set for the SWA/SAM stage, with a held-out split.

- Story world: question answering. Each fresh story is followed by one question whose answer
  the grammar knows exactly (who went where, who holds what), so exact-match accuracy is a
  real measure of reading the context:  `<story>\\nQ: Where did Mia go?\\nA:` -> ` the park`.
- Real text: continuation pairs. A passage's first `prompt_chars` characters are the prompt
  and the next ones the target, taken from the training split only (never val/test).

Examples go to train or test by a hash of the prompt, so the split never depends on order.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from pipeline.data.clean import split_of, text_digest


@dataclass(frozen=True)
class Example:
    """One supervised example: the model reads `prompt` and must produce `answer`."""

    prompt: str
    answer: str
    kind: str  # "qa" or "continuation"
    context: str  # the story or passage the example was built from (for contamination checks)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def qa_examples(world, num_stories: int, seed: int) -> list[Example]:
    """One question per fresh story (`world` is a storyworld.StoryWorld)."""
    rng = random.Random(seed)
    out = []
    for _ in range(num_stories):
        story = world.sample(rng)
        qas = world.questions(story, rng)
        if not qas:
            continue
        qa = qas[rng.randrange(len(qas))]
        prompt = f"{story.text}\nQ: {qa.question}\nA:"
        out.append(Example(prompt, f" {qa.answer}", "qa", story.text))
    return out


def continuation_examples(
    docs: Iterable[str], num_examples: int, prompt_chars: int, seed: int
) -> list[Example]:
    """Prompt/target pairs cut at word boundaries from documents long enough to hold both."""
    rng = random.Random(seed)
    pool = [d for d in docs if len(d) >= 2 * prompt_chars]
    rng.shuffle(pool)
    out = []
    for doc in pool[:num_examples]:
        cut = doc.rfind(" ", 0, prompt_chars)
        cut = cut if cut > 0 else prompt_chars
        end = doc.find(" ", cut + prompt_chars // 2)
        target = doc[cut : end if end > 0 else cut + prompt_chars]
        out.append(Example(doc[:cut], target, "continuation", doc))
    return out


def split_examples(examples: list[Example], test_fraction: float) -> tuple[list, list]:
    """(train, test) by a hash of each prompt."""
    train, test = [], []
    for ex in examples:
        bucket = split_of(text_digest(ex.prompt), 0.0, test_fraction)
        (test if bucket == "test" else train).append(ex)
    return train, test
