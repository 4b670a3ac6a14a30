"""Where the tests find the repository, its sample chats and the test chat templates."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
SAMPLE = ROOT / "sample_data" / "chats.jsonl"
TEMPLATES = TESTS / "templates"
