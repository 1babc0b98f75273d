"""workers/schema.py: the one registry of error kinds, and the README's failure table that documents it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from workers import decode, schema

README = Path(__file__).parents[1] / "README.md"


def _failure_table() -> dict[str, str]:
    """``error_kind`` -> the "a rerun" cell, from the README table headed ``| what went wrong |``."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| what went wrong | `error_kind`"))
    table: dict[str, str] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        for kind in re.findall(r"`([a-z_]+)`", cells[1]):
            assert kind not in table, f"{kind} is listed twice"
            table[kind] = cells[3]
    return table


def test_readme_failure_table_lists_exactly_the_registry():
    table = _failure_table()
    assert sorted(table) == sorted(schema.ERROR_KINDS)
    for kind, rerun in table.items():
        says_retried = rerun.startswith("retries")
        assert says_retried == (kind in schema.TRANSIENT_ERROR_KINDS), f"{kind}: README says {rerun!r}"
    for kind in schema.SHARD_READ_ERRORS:
        assert table[kind] == "retries it on every resume"


def test_every_stage_draws_its_kinds_from_the_registry():
    assert set(decode.ERROR_KINDS) <= set(schema.ERROR_KINDS)
    # No stage spells a kind as a string literal of its own: each tag is a schema constant.
    for module in ("readers", "decode", "replica", "pipeline", "writer", "ledger", "listing"):
        tree = ast.parse((Path(__file__).parents[1] / "workers" / f"{module}.py").read_text())
        literals = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)}
        assert not literals & set(schema.ERROR_KINDS), f"workers/{module}.py spells kinds instead of using the registry"
