"""`check-model` over the stock config of every causal LM transformers ships, as the Markdown
table in docs/models.md. Rerun after changing the runtime or upgrading transformers:

    python scripts/check_model_sweep.py                 # rewrites docs/models.md
    python scripts/check_model_sweep.py qwen3 lfm2 -o - # some types, to standard output

Each config is ``AutoConfig.for_model(TYPE)`` saved to a folder and read back, as a user's
would be; the check shrinks it to a tiny model (a few layers, small widths), so the sweep
runs on a CPU in a few minutes and a few hundred MB. One process: a config that takes longer
than --timeout seconds is recorded as such and the sweep goes on.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "models.md"
BEGIN, END = "<!-- sweep begins -->", "<!-- sweep ends -->"


class _Timeout(BaseException):  # not caught where check_model catches a model's errors
    pass


def _alarm(_signal: int, _frame: object) -> None:
    raise _Timeout


def sweep(types: list[str], timeout: int) -> tuple[list[list[str]], list[str], float]:
    """Table rows (type, layers, one cell per implementation), the numbered notes the cells
    point to, and the seconds it took."""
    from transformers import AutoConfig

    from onepass_prep.inspection.model_check import IMPLEMENTATIONS, check_model, load_config

    notes: list[str] = []

    def note(text: str) -> str:
        if text not in notes:
            notes.append(text)
        return f"[{notes.index(text) + 1}](#note-{notes.index(text) + 1})"

    rows = []
    started = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    for model_type in types:
        begun = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            signal.alarm(timeout)
            try:
                AutoConfig.for_model(model_type).save_pretrained(folder)
            except Exception as error:  # noqa: BLE001 -- transformers' own default does not hold
                rows.append([model_type, f"no default config: {note(str(error).splitlines()[0])}",
                             *["—"] * len(IMPLEMENTATIONS)])
                continue
            try:
                report = check_model(load_config(folder))
            except _Timeout:
                rows.append([model_type, f"took over {timeout} s", *[""] * len(IMPLEMENTATIONS)])
                continue
            except ValueError as error:  # the one line check-model prints
                rows.append([model_type, f"cannot be checked: {note(str(error))}", *["—"] * len(IMPLEMENTATIONS)])
                continue
            except Exception as error:  # noqa: BLE001 -- a traceback is a bug of check-model: shown as such
                rows.append([model_type, f"**traceback** {type(error).__name__}: {note(str(error)[:300])}",
                             *["—"] * len(IMPLEMENTATIONS)])
                continue
            finally:
                signal.alarm(0)
        layers = report.layers + "".join(f" ({s})" for s in report.shrunk)
        cells = [v.result if v.result in ("exact", "differs") else f"{v.result} {note(v.detail)}" for v in report.verdicts]
        rows.append([model_type, layers, *cells])
        print(f"{model_type:28s} {time.perf_counter() - begun:6.1f} s  {' | '.join(cells)}", file=sys.stderr, flush=True)
    return rows, notes, time.perf_counter() - started


def markdown(rows: list[list[str]], notes: list[str], seconds: float) -> str:
    import torch
    import transformers

    from onepass_prep.inspection.model_check import IMPLEMENTATIONS

    counts = {
        name: sum(1 for row in rows if row[2 + i] == "exact") for i, name in enumerate(IMPLEMENTATIONS)
    }
    lines = [
        BEGIN,
        f"{len(rows)} causal-LM configs of transformers {transformers.__version__}, torch "
        f"{torch.__version__}, CPU; {seconds / 60:.0f} minutes. Exact: "
        + ", ".join(f"{name} {n}" for name, n in counts.items()) + ".",
        "",
        "| config | layers of the tiny model | " + " | ".join(IMPLEMENTATIONS) + " |",
        "| --- | --- | " + " | ".join("---" for _ in IMPLEMENTATIONS) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    lines += ["", "Notes:", ""]
    for number, text in enumerate(notes, 1):
        escaped = text.replace("|", "\\|")
        lines.append(f'<a id="note-{number}"></a>{number}. {escaped}')
    lines.append(END)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*", help="config types (model_type); default: every causal LM")
    parser.add_argument("-o", "--out", default=str(DOCS), help="Markdown file whose sweep section is replaced, or -")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per config")
    args = parser.parse_args()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    rows, notes, seconds = sweep(args.types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), args.timeout)
    table = markdown(rows, notes, seconds)
    if args.out == "-":
        sys.stdout.write(table)
        return
    out = Path(args.out)
    text = out.read_text(encoding="utf-8")
    before, _, rest = text.partition(BEGIN)
    _, _, after = rest.partition(END)
    out.write_text(before + table.rstrip("\n") + after, encoding="utf-8")


if __name__ == "__main__":
    main()
