"""Paths of the test data committed with the suite, so a fresh clone runs anywhere."""

from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
GITHUB_FIXTURES = TESTS_DIR / "fixtures" / "github-webhooks"
"""Real GitHub webhook payloads, byte for byte (see the README there for origin and licence)."""
