"""`onepass-prep`: a thin command line over the library."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from onepass_prep.convert import ConvertError, ConvertOptions, ConvertSummary, convert

app = typer.Typer(
    help="Exact one-pass training data for multi-turn reasoning chats.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)


@app.callback()
def main() -> None:
    """Exact one-pass training data for multi-turn reasoning chats."""


def _think_tags(value: str) -> tuple[str, str]:
    parts = value.split(",")
    if len(parts) != 2 or not all(parts):
        raise typer.BadParameter("expected OPEN,CLOSE, e.g. '<think>,</think>'")
    return parts[0], parts[1]


@app.command("convert")
def convert_command(
    inputs: list[Path] = typer.Argument(..., help="Chat JSONL files (OpenAI messages or ShareGPT)."),
    model: str = typer.Option(..., "--model", "-m", help="'qwen' (Qwen3, offline), a tokenizer folder or a hub id."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder for shards and manifest."),
    chat_template: Path | None = typer.Option(None, help="Jinja file that replaces the tokenizer's chat template."),
    think_tags: str = typer.Option("<think>,</think>", help="Tags around inline reasoning: OPEN,CLOSE."),
    max_seq_len: int = typer.Option(32768, min=2, help="Longest row; longer conversations are rejected."),
    pack: bool = typer.Option(True, "--pack/--no-pack", help="Pack several conversations into a row."),
    rows_per_shard: int = typer.Option(1000, min=1, help="Rows per Parquet shard."),
    num_proc: int = typer.Option(1, min=1, help="Worker processes; the output does not depend on it."),
    overwrite: bool = typer.Option(False, help="Replace an earlier run's output in OUT."),
) -> None:
    """Convert chats into Parquet shards that train every turn exactly in one pass."""
    options = ConvertOptions(
        model=model,
        chat_template=chat_template,
        think_tags=_think_tags(think_tags),
        max_seq_len=max_seq_len,
        pack=pack,
        rows_per_shard=rows_per_shard,
        num_proc=num_proc,
        overwrite=overwrite,
    )
    total = sum(path.stat().st_size for path in inputs if path.is_file())
    columns = (TextColumn("converting"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("convert", total=total)
            summary = convert(inputs, out_dir, options, lambda size: progress.advance(task, size))
    except ConvertError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(1) from None
    console.print(summary_table(summary, out_dir))


def summary_table(summary: ConvertSummary, out_dir: Path) -> Table:
    table = Table(title=f"onepass-prep → {out_dir}", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("conversations read", f"{summary.read:,}")
    table.add_row("written", f"{summary.written:,}")
    table.add_row("rejected", f"{summary.rejected:,}")
    for kind, count in sorted(summary.rejected_by_kind.items()):
        table.add_row(f"  {kind}", f"{count:,}")
    table.add_row("rows / shards", f"{summary.rows:,} / {summary.shards:,}")
    table.add_row("tokens one-pass", f"{summary.one_pass_tokens:,}")
    table.add_row("tokens N-pass", f"{summary.n_pass_tokens:,}")
    table.add_row("saving", f"{summary.token_saving:.1%}")
    table.add_row("trained tokens", f"{summary.trained_tokens:,}")
    table.add_row("fill rate", f"{summary.fill_rate:.1%}")
    if summary.rejected:
        table.caption = f"rejected records and reasons: {out_dir / 'rejected.jsonl'}"
    return table


if __name__ == "__main__":
    app()
