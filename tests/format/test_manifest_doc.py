"""docs/FORMAT.md and the manifest a real run writes name the same keys."""

import json
import re

from helpers.paths import ROOT
from helpers.runs import converted


def documented_keys() -> tuple[set[str], set[str]]:
    """(every key in FORMAT.md's manifest example, its top-level keys)."""
    text = (ROOT / "docs" / "FORMAT.md").read_text(encoding="utf-8")
    block = text.split("## `manifest.json`", 1)[1].split("\n\n", 2)[1]
    every = set(re.findall(r'"(\w+)":', block))
    top = set()
    for line in re.findall(r"^ {6}(\S.*)$", block, re.M):
        line = line.split("#")[0]
        while re.search(r"\{[^{}]*\}|\[[^\[\]]*\]", line):
            line = re.sub(r"\{[^{}]*\}|\[[^\[\]]*\]", "", line)
        top |= set(re.findall(r'"(\w+)":', re.sub(r"\{.*$", "", line)))  # a block left open
    return every, top


def keys(value, skip=("options",)) -> set[str]:
    found = set()
    if isinstance(value, dict):
        for key, item in value.items():
            found.add(key)
            if key not in skip:
                found |= keys(item)
    elif isinstance(value, list):
        for item in value:
            found |= keys(item)
    return found


def test_manifest_keys_are_the_documented_ones():
    manifest = json.loads((converted("packed") / "manifest.json").read_text())
    every, top = documented_keys()
    written = keys(manifest) - set(manifest["counts"]["rejected_by_kind"])
    assert written - every == set(), "keys written but not documented"
    assert set(manifest) == top
