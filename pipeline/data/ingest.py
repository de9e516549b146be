"""Read the configured sources into one normalized stream of tables: `text`, `source`, `doc_id`.

Local files (txt, jsonl, parquet, csv) and Hugging Face Hub datasets are read with
`datasets.load_dataset(..., streaming=True)`, which reads lazily, so memory stays flat
however large the corpus is; the built-in story world is generated on the fly. Each chunk is
a `pyarrow.Table` of at most `chunk_rows` rows.

`doc_id` is stable across runs: `<source>:<file>:<row>` for files, `<source>:<row>` otherwise.
"""

from __future__ import annotations

import glob
import random
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from pipeline.config import Config, SourceConfig
from pipeline.core.errors import LmforgeError
from pipeline.core.seeding import derive_seed

SCHEMA = pa.schema([("text", pa.string()), ("source", pa.string()), ("doc_id", pa.string())])
_SUFFIXES = {"txt": (".txt",), "jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}
_SUFFIXES["csv"] = (".csv",)
_BUILDERS = {"txt": "text", "jsonl": "json", "parquet": "parquet", "csv": "csv"}
_TXT_SAMPLE_BY = {"file": "document", "paragraph": "paragraph", "line": "line"}


class SourceError(LmforgeError, ValueError):
    """A source cannot be read; the message names the source key and the file."""


def source_label(src: SourceConfig) -> str:
    return src.name or (src.dataset if src.kind == "hub" else src.kind)


def resolve_files(src: SourceConfig, root: Path, key: str) -> list[Path]:
    """The files a local source names: a file, every matching file in a folder, or a glob."""
    pattern = Path(src.path) if Path(src.path).is_absolute() else root / src.path
    if pattern.is_dir():
        files = sorted(p for p in pattern.rglob("*") if p.suffix in _SUFFIXES[src.kind])
    elif any(ch in src.path for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(pattern), recursive=True))
    else:
        files = [pattern] if pattern.is_file() else []
    if not files:
        raise SourceError(
            f"{key}.path: no {src.kind} files at {pattern} "
            f"(expected a file, a folder with {'/'.join(_SUFFIXES[src.kind])} files, or a glob)"
        )
    return files


def _table(texts: list, label: str, ids: list[str]) -> pa.Table:
    return pa.table(
        [pa.array(texts, pa.string()), pa.array([label] * len(texts), pa.string()), ids],
        schema=SCHEMA,
    )


def _iter_dataset(ds, src: SourceConfig, label: str, id_prefix: str, key: str, chunk_rows: int):
    """Batches of a (streaming) `datasets` dataset as normalized tables."""
    row = 0
    for batch in ds.iter(batch_size=chunk_rows):
        if src.text_field not in batch:
            raise SourceError(
                f"{key}.text_field: column {src.text_field!r} not found in {id_prefix}; "
                f"columns are {sorted(batch)}"
            )
        texts = [t if t is None or isinstance(t, str) else str(t) for t in batch[src.text_field]]
        ids = [f"{id_prefix}:{row + i}" for i in range(len(texts))]
        row += len(texts)
        yield _table(texts, label, ids)


def _iter_files(src: SourceConfig, root: Path, key: str, chunk_rows: int) -> Iterator[pa.Table]:
    from datasets import load_dataset

    label = source_label(src)
    for path in resolve_files(src, root, key):
        kwargs = {"sample_by": _TXT_SAMPLE_BY[src.txt_mode]} if src.kind == "txt" else {}
        rel = path.relative_to(root) if path.is_relative_to(root) else path
        try:
            ds = load_dataset(
                _BUILDERS[src.kind], data_files=[str(path)], streaming=True, split="train", **kwargs
            )
            if src.kind == "txt":
                # `datasets`' text builder names its column "text", whatever text_field says.
                ds = ds.rename_column("text", src.text_field) if src.text_field != "text" else ds
                if src.txt_mode != "file":  # blank lines/blocks are layout, not documents
                    ds = ds.filter(lambda r: bool(r[src.text_field].strip()))
            yield from _iter_dataset(ds, src, label, f"{label}:{rel}", key, chunk_rows)
        except SourceError:
            raise
        except Exception as e:  # pyarrow/json/csv parse errors of all kinds
            raise SourceError(f"{key}: cannot read {src.kind} file {path}: {e}") from e


def _iter_hub(src: SourceConfig, key: str, chunk_rows: int) -> Iterator[pa.Table]:
    from datasets import load_dataset

    try:
        ds = load_dataset(src.dataset, src.subset or None, split=src.split, streaming=True)
    except (ConnectionError, OSError) as e:
        raise SourceError(
            f"{key}.dataset: cannot reach Hugging Face Hub dataset {src.dataset!r} "
            f"(offline, or HF_HUB_OFFLINE=1?). Download it while online, or use a local "
            f"parquet/jsonl source instead. Cause: {e}"
        ) from e
    except Exception as e:
        raise SourceError(f"{key}.dataset: cannot load {src.dataset!r}: {e}") from e
    yield from _iter_dataset(ds, src, source_label(src), source_label(src), key, chunk_rows)


def _iter_storyworld(src: SourceConfig, cfg: Config, index: int, chunk_rows: int):
    from pipeline.data.storyworld import StoryWorld

    world = StoryWorld(storyworld_spec(cfg))
    rng = random.Random(derive_seed(cfg.seed, "validate", "source", str(index)))
    label = source_label(src)
    for start in range(0, src.num_docs, chunk_rows):
        n = min(chunk_rows, src.num_docs - start)
        texts = [world.sample(rng).text for _ in range(n)]
        yield _table(texts, label, [f"{label}:{start + i}" for i in range(n)])


def storyworld_spec(cfg: Config):
    """The grammar spec that `storyworld:` in params.yaml describes."""
    import dataclasses

    from pipeline.data.storyworld import StoryWorldSpec

    return StoryWorldSpec(**dataclasses.asdict(cfg.storyworld))


def _limit(tables: Iterator[pa.Table], max_docs: int) -> Iterator[pa.Table]:
    if max_docs <= 0:
        yield from tables
        return
    left = max_docs
    for t in tables:
        yield t.slice(0, left)
        left -= min(left, t.num_rows)
        if left == 0:
            return


def iter_source(cfg: Config, index: int) -> Iterator[pa.Table]:
    """Stream source `validate.sources[index]` as normalized tables."""
    src = cfg.validate.sources[index]
    key, rows = f"validate.sources[{index}]", cfg.validate.chunk_rows
    if src.kind == "storyworld":
        tables = _iter_storyworld(src, cfg, index, rows)
    elif src.kind == "hub":
        tables = _iter_hub(src, key, rows)
    else:
        tables = _iter_files(src, cfg.root, key, rows)
    return _limit(tables, src.max_docs)


def iter_corpus(cfg: Config) -> Iterator[pa.Table]:
    """All sources in order, as one stream of normalized tables."""
    for i in range(len(cfg.validate.sources)):
        yield from iter_source(cfg, i)
