"""The configuration reference page is generated from the settings model and must be committed current."""

from __future__ import annotations

import re
from pathlib import Path

from kici.orchestrator import config_docs
from kici.orchestrator.config import Settings, env_name

PAGE = Path(__file__).resolve().parents[3] / "docs" / "operator" / "configuration.md"


def test_committed_page_matches_the_generator() -> None:
    current = PAGE.read_text(encoding="utf-8") if PAGE.is_file() else "(missing)"
    assert current == config_docs.render(), (
        f"{PAGE.relative_to(PAGE.parents[2])} is stale: regenerate it with "
        "`.venv/bin/python -m kici.orchestrator.config_docs` and commit the result"
    )


def test_page_lists_every_setting_with_its_description() -> None:
    page = config_docs.render()
    for name, info in Settings.model_fields.items():
        row = next(line for line in page.splitlines() if line.startswith(f"| `{env_name(name)}` |"))
        assert " ".join((info.description or "").split())[:40] in row


def test_check_mode_reports_staleness(tmp_path: Path) -> None:
    page = tmp_path / "configuration.md"
    assert config_docs.main(["--output", str(page), "--check"]) == 1
    assert config_docs.main(["--output", str(page)]) == 0
    assert config_docs.main(["--output", str(page), "--check"]) == 0
    page.write_text(page.read_text() + "edited by hand\n")
    assert config_docs.main(["--output", str(page), "--check"]) == 1


def test_operator_pages_link_to_existing_pages() -> None:
    docs = PAGE.parent
    broken = []
    for page in sorted(docs.glob("*.md")):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if not (page.parent / target).resolve().is_file():
                broken.append(f"{page.name} -> {target}")
    assert not broken, broken
