"""Answer queries from a search index (``workers/search_index.py``): full text, semantic, or both.

* ``text``: tantivy's BM25 (``workers/text_index.py``).  The user's words are
  always quoted, so ``"``, ``*``, ``AND`` or ``NEAR(`` in a query are words,
  never syntax.  Rows holding the whole query as a phrase rank above rows
  holding all its words, and those above rows holding some; BM25 orders each group.
* ``semantic``: cosine similarity of the query's embedding with every row's,
  by brute force over the memory-mapped vector files (a matrix-vector product:
  see BENCHMARKS.md "Search" for how far that holds).
* ``hybrid`` (default): reciprocal-rank fusion of the two lists (score
  ``sum 1/(60 + rank)``, Cormack et al. 2009), with exact-phrase rows first,
  as in ``text``: someone who types a caption's exact words wants that caption.

``where`` is an SQL expression over the ``docs`` table's columns (SQLite); both
lists are restricted to the rows it keeps.  It runs on a read-only connection of
its own whose authorizer lets it read ``docs`` and call the functions in
``WHERE_FUNCTIONS``, nothing else (no other table, no recursive ``WITH``, no
``randomblob``), whose values are at most ``_WHERE_MAX_BYTES``, and whose progress
handler stops it after ``where_seconds`` (default ``WHERE_SECONDS``).
"""

from __future__ import annotations

import functools
import json
import math
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from workers import schema
from workers.search_index import HIT_COLUMNS, open_text_index
from workers.search_store import IndexLocation, SearchError, clean_row, read_meta
from workers.text_index import all_words, any_word, phrase, query_words

MODES = ("hybrid", "text", "semantic")
MAX_TOP_K = 1000
MAX_QUERY_WORDS = 64
RRF_K = 60  # the constant of Cormack et al.; damps the weight of the very first ranks
# Candidates taken from each list before fusion: a row ranked below this in
# both lists cannot reach a top-k of at most MAX_TOP_K.
_CANDIDATES = 100
# A filter runs at most this long by default: a typo must not hang a query (seconds, wall clock).
WHERE_SECONDS = 5.0
MAX_WHERE_SECONDS = 3600.0
# What a filter may call: comparisons and text, numbers, aggregates over docs, and JSON (answers is JSON).
# Left out on purpose: randomblob, zeroblob, replace, printf, group_concat (they build large values), and
# load_extension, sqlite_* and the like (they reach outside the rows).
WHERE_FUNCTIONS = frozenset(
    "like glob lower upper length substr substring instr trim ltrim rtrim coalesce ifnull nullif iif typeof "
    "abs round min max count sum total avg json_extract json_array_length json_type json_valid -> ->>".split()
)
# No value a filter builds may exceed this (SQLite's own limit is 1 GB): with a time limit alone,
# a chain of WITH clauses each doubling a string could still take gigabytes in a few instructions.
_WHERE_MAX_BYTES = 16_000_000
_TICK_INSTRUCTIONS = 10_000  # how often (in SQLite VM instructions) the progress handler looks at the clock


@dataclass(frozen=True)
class QuerySpec:
    """One query; :class:`SearchError` from ``__post_init__`` names the bad field."""

    text: str
    top_k: int = 10
    mode: str = "hybrid"
    where: str | None = None
    where_seconds: float = WHERE_SECONDS

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SearchError(f"mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 1 <= self.top_k <= MAX_TOP_K:
            raise SearchError(
                f"top_k: must be between 1 and {MAX_TOP_K}, got {self.top_k} "
                "(page through a larger result with --where instead)"
            )
        words = query_words(self.text)
        if not words:
            raise SearchError("query: it has no words to search for")
        if len(words) > MAX_QUERY_WORDS:
            raise SearchError(f"query: {len(words)} words; at most {MAX_QUERY_WORDS}")
        if not 0 < self.where_seconds <= MAX_WHERE_SECONDS:
            raise SearchError(f"where_seconds: must be in (0, {MAX_WHERE_SECONDS:g}], got {self.where_seconds}")


@dataclass
class Hit:
    id: str
    source: str | None
    key: str | None
    frame_time: float | None
    caption: str | None
    answers: list[dict[str, str]] = field(default_factory=list)
    score: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _read_only_uri(path: Path) -> str:
    # Escaped: a "#", "?" or "%" in the path would otherwise end it or start a parameter.
    return f"file:{quote(str(path))}?mode=ro"


class _Filter:
    """The ``--where`` connection: read-only, reads of ``docs`` only, bounded in size and time."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.columns = columns
        self.conn = sqlite3.connect(_read_only_uri(path), uri=True)
        self.conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, _WHERE_MAX_BYTES)
        self.conn.set_authorizer(self._authorize)
        self.conn.set_progress_handler(self._past_deadline, _TICK_INSTRUCTIONS)
        self.refused: str | None = None
        self.deadline = math.inf
        self.stopped = False

    def _authorize(self, action: int, arg1: str | None, arg2: str | None, db: str | None, _inner: str | None) -> int:
        if action == sqlite3.SQLITE_SELECT:
            return sqlite3.SQLITE_OK
        # A table read for no column (count(*)) comes with no database name.
        if action == sqlite3.SQLITE_READ and (arg1 or "").lower() == "docs" and db in ("main", None):
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in WHERE_FUNCTIONS:
            return sqlite3.SQLITE_OK
        if self.refused is None:
            self.refused = (
                f"it reads {arg1}" if action == sqlite3.SQLITE_READ
                else f"it calls {arg2}()" if action == sqlite3.SQLITE_FUNCTION
                else "it has a recursive WITH" if action == sqlite3.SQLITE_RECURSIVE
                # json_each(), pragma_*(): SQLite first asks to set up the function's table in the schema.
                else "it calls a table-valued function" if action == sqlite3.SQLITE_UPDATE and arg1 == "sqlite_master"
                else f"it does more than read (SQLite action {action})"
            )  # fmt: skip
        return sqlite3.SQLITE_DENY

    def _past_deadline(self) -> int:
        self.stopped = time.monotonic() > self.deadline
        return int(self.stopped)  # non-zero: SQLite abandons the statement ("interrupted")

    def rows(self, where: str, seconds: float) -> set[int]:
        """The rowids ``where`` keeps; :class:`SearchError` when it is not valid SQL, reaches past
        ``docs`` or the allowed functions, or runs longer than ``seconds``."""
        self.refused, self.stopped = None, False
        self.deadline = time.monotonic() + seconds
        try:
            return {r for (r,) in self.conn.execute(f"SELECT rowid FROM docs WHERE ({where})")}
        except (sqlite3.DatabaseError, sqlite3.Warning) as exc:
            if self.stopped:
                raise SearchError(
                    f"--where ran for more than {seconds:g} s and was stopped; simplify it, "
                    "or allow it longer with --where-seconds"
                ) from exc
            if self.refused:
                raise SearchError(
                    f"--where may only read the indexed rows' columns ({', '.join(self.columns)}) and call "
                    f"{', '.join(sorted(WHERE_FUNCTIONS))}; {self.refused}"
                ) from exc
            raise SearchError(
                f"--where is not a valid SQL filter here: {exc}. Columns: {', '.join(self.columns)}"
            ) from exc
        finally:
            self.deadline = math.inf

    def close(self) -> None:
        self.conn.close()


class Searcher:
    """An open index.  ``embed`` turns a query into a unit vector (``TextEmbedder.encode``).

    Raises :class:`SearchError` when the index is missing or corrupt.
    """

    def __init__(self, location: IndexLocation, embed: Callable[[list[str]], np.ndarray] | None = None) -> None:
        self.location = location
        if not location.exists():
            raise SearchError(f"no search index at {location.url}; build one with: python -m jobs.search index URL")
        location.pull()
        try:
            self.conn = sqlite3.connect(_read_only_uri(location.db), uri=True)
            self.meta = read_meta(self.conn)
            self.conn.execute("SELECT count(*) FROM docs").fetchone()
        except sqlite3.DatabaseError as exc:
            raise SearchError(
                f"the search index at {location.url} is corrupt ({exc}); "
                "rebuild it with: python -m jobs.search index URL --overwrite"
            ) from exc
        self.columns = [row[1] for row in self.conn.execute("PRAGMA table_info(docs)")]
        self._filter: _Filter | None = None  # opened by the first --where
        self.text = open_text_index(location, len(self.meta.get("text_columns") or [1]))
        self._embed = embed
        self._vectors: list[tuple[int, np.ndarray]] | None = None

    def close(self) -> None:
        self.conn.close()
        if self._filter is not None:
            self._filter.close()

    @property
    def embedding_model(self) -> str | None:
        return self.meta.get("embedding_model")

    # ------------------------------------------------------------------ filters

    def _allowed(self, where: str | None, seconds: float = WHERE_SECONDS) -> set[int] | None:
        """The rows ``where`` keeps (None: all); :class:`SearchError` from :meth:`_Filter.rows`."""
        if not where:
            return None
        if self._filter is None:
            self._filter = _Filter(self.location.db, self.columns)
        return self._filter.rows(where, seconds)

    # ------------------------------------------------------------------ the two lists

    def _text_ranks(self, words: list[str], allowed: set[int] | None, limit: int) -> tuple[list[int], set[int]]:
        """Row ids, best first, and those that hold the whole query as a phrase.

        Tiers, each ordered by BM25: the phrase, then all the words anywhere,
        then any of them, each only while the list is short of ``limit``.
        """
        tiers = [phrase(words)] + ([all_words(words), any_word(words)] if len(words) > 1 else [])
        ranked: list[int] = []
        seen: set[int] = set()
        exact: set[int] = set()
        for i, match in enumerate(tiers):
            if len(ranked) >= limit:
                break
            for r in self.text.search(match, limit, allowed):
                if r not in seen:
                    ranked.append(r)
                    seen.add(r)
            if i == 0 and len(words) > 1:
                exact = set(ranked)
        return ranked[:limit], exact

    def _load_vectors(self) -> list[tuple[int, np.ndarray]]:
        if self._vectors is None:
            files = self.conn.execute("SELECT first_rowid, rows, vectors FROM files ORDER BY first_rowid").fetchall()
            missing = sum(1 for _, rows, v in files if v is None and rows)
            if missing or not self.embedding_model:
                raise SearchError(
                    f"{missing or len(files)} indexed file(s) have no embeddings; semantic search "
                    "needs them: rerun python -m jobs.search index URL (without --no-embeddings), "
                    "or query with --mode text"
                )
            self._vectors = [
                (first, np.load(self.location.local_vectors(v), mmap_mode="r")) for first, rows, v in files if rows
            ]
        return self._vectors

    def _semantic_ranks(self, text: str, allowed: set[int] | None, limit: int) -> list[tuple[int, float]]:
        vectors = self._load_vectors()
        if self._embed is None:
            raise SearchError("semantic search needs the embedding model, and none was given")
        q = np.asarray(self._embed([text])[0], dtype=np.float32)
        rowids = np.concatenate([np.arange(first, first + len(m)) for first, m in vectors]) if vectors else np.zeros(0)
        scores = np.concatenate([m @ q for _, m in vectors]) if vectors else np.zeros(0, dtype=np.float32)
        if allowed is not None:
            keep = np.fromiter(allowed, np.int64, len(allowed))
            scores = np.where(np.isin(rowids, keep), scores, -np.inf)
        limit = min(limit, len(scores))
        best = np.argpartition(-scores, limit - 1)[:limit] if limit else np.zeros(0, dtype=np.int64)
        best = best[np.argsort(-scores[best], kind="stable")]
        return [(int(rowids[i]), float(scores[i])) for i in best if np.isfinite(scores[i])]

    # ------------------------------------------------------------------ the query

    def search(self, spec: QuerySpec) -> list[Hit]:
        """The top ``spec.top_k`` hits; :class:`SearchError` for a bad filter or missing embeddings."""
        words = query_words(spec.text)
        allowed = self._allowed(spec.where, spec.where_seconds)
        limit = max(spec.top_k, _CANDIDATES)
        if spec.mode == "text":
            ranked, _ = self._text_ranks(words, allowed, spec.top_k)
            scored = [(r, 1.0 / (RRF_K + i + 1)) for i, r in enumerate(ranked)]
        elif spec.mode == "semantic":
            scored = self._semantic_ranks(spec.text, allowed, spec.top_k)
        else:
            ranked, exact = self._text_ranks(words, allowed, limit)
            semantic = [r for r, _ in self._semantic_ranks(spec.text, allowed, limit)]
            fused: dict[int, float] = {}
            for ranking in (ranked, semantic):
                for i, r in enumerate(ranking):
                    fused[r] = fused.get(r, 0.0) + 1.0 / (RRF_K + i + 1)
            order = sorted(fused, key=lambda r: (r not in exact, -fused[r], r))
            scored = [(r, fused[r]) for r in order[: spec.top_k]]
        return self._hits(scored, {w.lower() for w in words})

    def _hits(self, scored: list[tuple[int, float]], words: set[str]) -> list[Hit]:
        if not scored:
            return []
        cols = ", ".join(f'"{c}"' for c in HIT_COLUMNS)
        marks = ", ".join("?" * len(scored))
        rows = {
            r[0]: r[1:]
            for r in self.conn.execute(
                f"SELECT rowid, {cols} FROM docs WHERE rowid IN ({marks})", [r for r, _ in scored]
            )
        }
        hits = []
        for rowid, score in scored:
            if rowid not in rows:  # left in the text index by a crashed build; its file is not indexed
                continue
            doc = dict(zip(HIT_COLUMNS, rows[rowid], strict=True))
            try:
                doc[schema.ANSWERS] = json.loads(doc[schema.ANSWERS]) if isinstance(doc[schema.ANSWERS], str) else None
            except (ValueError, RecursionError):  # not JSON, or nested past reason: an index someone else wrote
                doc[schema.ANSWERS] = None
            doc = clean_row(doc)
            answers = doc[schema.ANSWERS] or []
            # Lowercase each answer once and stop at its first shared word: this loop is most of a warm query.
            matching = [a for a in answers
                        if not words.isdisjoint(query_words(f"{a['question']} {a['answer']}".lower()))]  # fmt: skip
            hits.append(
                Hit(
                    id=doc[schema.ID],
                    source=doc[schema.SOURCE],
                    key=doc[schema.KEY],
                    frame_time=doc[schema.FRAME_TIME],
                    caption=doc[schema.CAPTION],
                    answers=matching or answers,
                    score=round(score, 6),
                )
            )
        return hits


def open_searcher(location: IndexLocation, embedder_factory: Callable[[str], Any] | None) -> Searcher:
    """A :class:`Searcher` whose query embedder (built lazily by ``embedder_factory(model)``) matches the index."""

    @functools.cache  # loaded on the first semantic query, once; text queries never load it
    def embedder() -> Any:
        if embedder_factory is None or not searcher.embedding_model:
            raise SearchError("this index has no embeddings; query with --mode text")
        return embedder_factory(searcher.embedding_model)

    searcher = Searcher(location, lambda texts: embedder().encode(texts))
    return searcher
