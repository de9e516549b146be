"""What evaluation draws from the data: exact sources, the grammar's check, prompts, references.

The evaluate stage scores models with the torch-only `pipeline/eval` package, which does not
import `pipeline.data` (parts of it need pyarrow or Great Expectations). This module is the
data side: it builds the documents, code lengths and texts that `pipeline/eval` functions
take as plain lists and callables. The register stage uses `prompts_and_references` too, so
the model card shows the prompts the evaluation decoded.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pyarrow.parquet as pq

from pipeline.config import Config
from pipeline.core.names import MIMIC, split_parquet
from pipeline.core.seeding import derive_seed
from pipeline.data.ingest import storyworld_spec
from pipeline.data.ngram import NGramModel
from pipeline.data.storyworld import StoryWorld

LN2 = math.log(2.0)
# The seed streams below are the evaluate stage's (register reuses its prompts).
_SEED_SCOPE = "evaluate"


def _has_storyworld(cfg: Config) -> bool:
    return any(s.kind == "storyworld" for s in cfg.validate.sources)


def exact_sources(cfg: Config, n: int, seed: int) -> dict[str, tuple[list[str], list[float]]]:
    """`n` fresh documents of each source whose probabilities are known exactly.

    Maps a source's name to (documents, -log2 P(document) in bits, end of document
    included): `storyworld` when the corpus is drawn from the story world, `mimic` when
    synthesize fitted an n-gram mimic (`<synthetic>/mimic.json`). Both draw with `seed`.
    """
    sources: dict[str, tuple[list[str], list[float]]] = {}
    if _has_storyworld(cfg):
        world, rng = StoryWorld(storyworld_spec(cfg)), random.Random(seed)
        stories = [world.sample(rng) for _ in range(n)]
        sources["storyworld"] = ([s.text for s in stories], [-s.log_prob / LN2 for s in stories])
    mimic_path = cfg.path("synthetic") / MIMIC
    if mimic_path.is_file():
        mimic = NGramModel.load(mimic_path)
        docs = mimic.generate(n, seed, cfg.synthesize.mimic.max_chars)
        sources["mimic"] = (docs, [-mimic.log_prob(d) / LN2 for d in docs])
    return sources


def story_validator(cfg: Config) -> Callable[[str], bool] | None:
    """The story world's grammar check when the corpus is drawn from it, else None."""
    return StoryWorld(storyworld_spec(cfg)).is_valid if _has_storyworld(cfg) else None


def prompts_and_references(cfg: Config) -> tuple[list[str], list[str]]:
    """Prompts (first sentences of fresh stories, or starts of test docs) and held-out texts."""
    e = cfg.evaluate
    refs = pq.read_table(cfg.path("validated") / split_parquet("test"), columns=["text"])
    references = refs.column("text").to_pylist()[: max(e.prompts, 50)]
    if _has_storyworld(cfg):
        world = StoryWorld(storyworld_spec(cfg))
        rng = random.Random(derive_seed(cfg.seed, _SEED_SCOPE, "prompts"))
        prompts = [world.sample(rng).text.split(". ")[0] + "." for _ in range(e.prompts)]
    else:
        prompts = [d[: cfg.synthesize.continuation_chars] for d in references[: e.prompts]]
    return prompts, references
