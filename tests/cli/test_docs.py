"""The committed docs match the code, and their links lead somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from wrenn_engine import docs_gen

DOCS = docs_gen.DOCS_DIR
HAND_WRITTEN = ("architecture.md", "operations.md", "troubleshooting.md")


@pytest.mark.parametrize("name", sorted(docs_gen.GENERATED))
def test_generated_docs_match_the_code(name: str) -> None:
    path = DOCS / name
    assert path.exists(), f"docs/{name} is missing; run `{docs_gen.REGENERATE}`"
    committed = path.read_text(encoding="utf-8")
    assert committed == docs_gen.generate(name), (
        f"docs/{name} no longer matches the code; run `{docs_gen.REGENERATE}` and "
        "commit the result"
    )


def test_the_check_mode_reports_a_stale_doc(tmp_path: Path) -> None:
    assert docs_gen.main(["--docs-dir", str(tmp_path)]) == 0
    assert docs_gen.main(["--check", "--docs-dir", str(tmp_path)]) == 0
    (tmp_path / "events.md").write_text("stale\n")
    assert docs_gen.stale(tmp_path) == ["events.md"]
    assert docs_gen.main(["--check", "--docs-dir", str(tmp_path)]) == 1


def test_the_generated_docs_cover_the_code() -> None:
    from wrenn_engine.domain.events import EVENT_TYPES
    from wrenn_engine.lifecycle.machine import COMMANDS
    from wrenn_engine.lifecycle.pipelines import default_pipelines

    events = docs_gen.generate("events.md")
    for name in EVENT_TYPES:
        assert f"### {name}\n" in events
    machine = docs_gen.generate("state-machine.md")
    assert "```mermaid\nstateDiagram-v2\n" in machine
    for command in COMMANDS:
        assert f"| `{command}` |" in machine
    for step in default_pipelines().step_names():
        assert f"`{step}`" in machine
    cli = docs_gen.generate("cli.md")
    for command in (
        "db upgrade",
        "db current",
        "create",
        "events",
        "replay",
        "export",
        "diff",
        "verify",
        "reconcile",
        "debug failpoints",
        "demo",
    ):
        assert f"## wrenn-engine {command}\n" in cli


@pytest.mark.parametrize("name", [*HAND_WRITTEN, *sorted(docs_gen.GENERATED)])
def test_relative_links_in_the_docs_resolve(name: str) -> None:
    text = (DOCS / name).read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (DOCS / target).exists(), f"docs/{name} links to missing {target}"
