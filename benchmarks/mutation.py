"""Mutation testing of the core modules with mutmut: small wrong edits of the code (an
operator flipped, a constant changed, a call dropped), each run against the tests that
execute it. A mutant that no test fails on ("survived") is a change the suite cannot see;
docs/testing.md lists the survivors of the last run and why each is harmless.

    .venv/bin/pip install mutmut==3.8.1
    .venv/bin/python benchmarks/mutation.py                 # every group, about an hour on 2 cores
    .venv/bin/python benchmarks/mutation.py --only format,tree

Each group mutates some modules and runs a chosen set of fast tests (the tiny-model loss
tests are left out: the symbolic pair checks decide the same exactness, in a fraction of
the time). mutmut itself runs, per mutant, only the chosen tests that execute the mutated
function. Every group works in a scratch copy of the tracked files, so the checkout is
never touched. Not run in CI: it is slow. Writes benchmarks/mutation-results.json and
prints each survivor's diff.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTMUT = Path(sys.executable).with_name("mutmut")
# group -> (modules to mutate, tests to run against them); the tiny-model loss checks are
# left out everywhere ("not losses").
GROUPS: dict[str, tuple[list[str], list[str]]] = {
    "format": (
        ["onepass_prep/format/*"],
        ["tests/format", "tests/torch/test_torch_masks.py", "tests/torch/test_torch_dataset.py"],
    ),
    "masks": (["onepass_prep/torch/masks.py"], ["tests/torch/test_torch_masks.py"]),
    "records": (
        ["onepass_prep/convert/records.py"],
        ["tests/convert/test_records.py", "tests/convert/test_hostile.py", "tests/convert/test_templates.py",
         "-k", "test_records or hostile_records or strict or (exactly and (qwen3 or gpt-oss or smollm3))"],
    ),
    "render": (
        ["onepass_prep/convert/render.py"],
        ["tests/convert/test_templates.py", "tests/convert/test_equivalence.py",
         "-k", "exactly or probe or generated"],
    ),
    "tree": (
        ["onepass_prep/convert/tree.py", "onepass_prep/convert/pack.py"],
        ["tests/convert/test_tree.py", "tests/convert/test_equivalence.py", "tests/convert/test_templates.py",
         "-k", "test_tree or generated or (exactly and (qwen3 or strip_history or prompt_not_prefix))"],
    ),
    "checkpoint": (
        ["onepass_prep/convert/checkpoint.py"],
        ["tests/convert/test_reliability.py", "tests/convert/test_hostile.py",
         "-k", "interrupted or finished or resume or lock"],
    ),
}


# Survivors that cannot change what is converted, trained or accepted, by the kind of edit
# (docs/testing.md says why each kind is harmless). Anything else is listed on its own.
HARMLESS = {
    "message": re.compile(r"(raise \w+|BadRecord|FormatError|RunError|ValueError)\(.*(XX|None\)|[A-Z]{4,}|f\")"
                          r"|^\s*f?[\"'].*(XX|[A-Z]{5,}).*[\"'],?\)?$|warn\(|notes\.append"),
    "dtype or encoding spelled differently": re.compile(
        r"np\.zeros\(n, (None)?\)|np\.zeros\(n, None\)|zero_copy_only=None|encoding=(None|\"UTF-8\")|"
        r"strict=(None|False)|strict=\w*\)?\s*\)|, \)\}|\(spec\.type, spec\.flatten\(\), \)"),
}


def kind_of(diff: str) -> str:
    added = [line[1:] for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    for kind, pattern in HARMLESS.items():
        if added and all(pattern.search(line) for line in added):
            return kind
    return "other"


def scratch_copy(target: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)


def run_group(name: str, modules: list[str], tests: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"mutation-{name}-") as folder:
        work = Path(folder)
        scratch_copy(work)
        with open(work / "pyproject.toml", "a", encoding="utf-8") as config:
            config.write(
                "\n[tool.mutmut]\n"
                'source_paths = ["onepass_prep"]\n'
                'also_copy = ["benchmarks/", "sample_data/", "examples/"]\n'
                f"only_mutate = {json.dumps(modules)}\n"
                f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
                'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]\n'
                # mutmut's default (30x the tests' time) let a few slow mutants of
                # pack.join hold both cores for over ten minutes each; 4x is plenty.
                "timeout_multiplier = 2.0\n"
            )
        log = ROOT / "benchmarks" / f"mutation-{name}.log"
        with open(log, "w", encoding="utf-8") as out:
            subprocess.run([str(MUTMUT), "run"], cwd=work, stdout=out, stderr=subprocess.STDOUT, check=False)
        listed = subprocess.run([str(MUTMUT), "results", "--all", "true"], cwd=work, capture_output=True, text=True)
        statuses: dict[str, list[str]] = {}
        for line in listed.stdout.splitlines():
            mutant, _, status = line.strip().rpartition(": ")
            if mutant:
                statuses.setdefault(status, []).append(mutant)
        survivors = {}
        for mutant in statuses.get("survived", []):
            shown = subprocess.run([str(MUTMUT), "show", mutant], cwd=work, capture_output=True, text=True)
            survivors[mutant] = shown.stdout
        return {
            "modules": modules,
            "tests": tests,
            "counts": {status: len(mutants) for status, mutants in sorted(statuses.items())},
            "survivors": survivors,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated subset of {','.join(GROUPS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "mutation-results.json")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name in args.only.split(","):
        print(f"{name} ...", flush=True)
        results[name] = run_group(name, *GROUPS[name])
        print(f"  {results[name]['counts']}", flush=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    for name, result in results.items():
        kinds: dict[str, int] = {}
        for mutant, diff in result["survivors"].items():
            kind = kind_of(diff)
            kinds[kind] = kinds.get(kind, 0) + 1
            if kind == "other":
                print(f"--- {name}: {mutant}\n{diff}")
        print(f"{name}: {result['counts']}; survivors by kind: {kinds}")


if __name__ == "__main__":
    main()
