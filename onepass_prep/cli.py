"""`onepass-prep`: a thin command line over the library."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from onepass_prep.convert import ConvertError, ConvertOptions, ConvertSummary, StrictError, convert
from onepass_prep.convert.records import RESERVED_TEMPLATE_ARGUMENTS
from onepass_prep.format import NORMALIZATIONS, TRAIN_ON

app = typer.Typer(
    help="Exact one-pass training data for multi-turn reasoning chats.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain click help: no type column with <bool> after flags
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


def _template_kwargs(value: str | None) -> dict:
    if value is None:
        return {}
    try:
        kwargs = json.loads(value)
    except json.JSONDecodeError as error:
        raise typer.BadParameter(f"not JSON ({error.msg}), e.g. '{{\"enable_thinking\": true}}'") from None
    if not isinstance(kwargs, dict):
        raise typer.BadParameter("expected a JSON object, e.g. '{\"enable_thinking\": true}'")
    if reserved := sorted(RESERVED_TEMPLATE_ARGUMENTS & kwargs.keys()):
        raise typer.BadParameter(f"apply_chat_template sets {', '.join(reserved)} itself")
    return kwargs


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in choices:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}")
        return value

    return check


@app.command("convert")
def convert_command(
    inputs: list[str] = typer.Argument(..., metavar="INPUT", help="Chats (OpenAI messages or ShareGPT): JSONL (also .gz, .zst), a JSON array, Parquet files or folders, a datasets.save_to_disk folder, or - for standard input; local paths or URLs (s3://, gs://, ...)."),
    model: str = typer.Option(..., "--model", "-m", metavar="MODEL", help="'qwen' (Qwen3, offline), a tokenizer folder or a hub id."),
    out_dir: str = typer.Option(..., "--out", "-o", metavar="OUT", help="Output folder (or URL: s3://bucket/prefix, ...) for shards and manifest."),
    chat_template: Path | None = typer.Option(None, metavar="FILE", help="Jinja file that replaces the tokenizer's chat template."),
    think_tags: str = typer.Option("<think>,</think>", metavar="OPEN,CLOSE", help="Tags around inline reasoning: OPEN,CLOSE."),
    chat_template_kwargs: str | None = typer.Option(None, metavar="JSON", help="JSON object passed to every rendering, e.g. '{\"enable_thinking\": true}'; a record's own chat_template_kwargs go over it."),
    max_seq_len: int = typer.Option(32768, min=2, metavar="N", help="Longest row; longer conversations are rejected."),
    train_on: str = typer.Option("all", metavar="|".join(TRAIN_ON), callback=_one_of(TRAIN_ON), help="Train every assistant message ('all', each as given weights say) or only each conversation's last one."),
    loss_normalization: str = typer.Option("token", metavar="|".join(NORMALIZATIONS), callback=_one_of(NORMALIZATIONS), help="Average the loss over trained tokens, over turns (each N-pass sample's token mean) or over conversations."),
    pack: bool = typer.Option(True, "--pack/--no-pack", help="Pack several conversations into a row."),
    share_prefixes: bool = typer.Option(True, "--share-prefixes/--no-share-prefixes", help="Conversations of a shard that share a prefix (a system prompt and tools, a prompt with several responses, common first turns) share one tree, the prefix forwarded once."),
    records_per_shard: int = typer.Option(4096, min=1, metavar="N", help="Input records per shard: each shard packs the conversations of N consecutive records, so the output does not depend on how the work is spread."),
    num_proc: int = typer.Option(1, min=1, metavar="N", help="Worker processes (Ray workers with --engine ray); the output does not depend on it."),
    engine: str = typer.Option("local", metavar="local|ray", callback=_one_of(("local", "ray")), help="Where the work runs: this machine's processes, or a Ray cluster (pip install 'onepass-prep[ray]'); the output is the same."),
    ray_address: str | None = typer.Option(None, metavar="ADDRESS", help="With --engine ray: a running cluster to join (e.g. 'auto'); a local one is started otherwise."),
    overwrite: bool = typer.Option(False, help="Replace an earlier run's output in OUT."),
    resume: bool = typer.Option(False, help="Continue an interrupted run in OUT where it stopped."),
    strict: bool = typer.Option(False, help="Stop at the first record that cannot be converted."),
    debug: bool = typer.Option(False, help="On an error, show the traceback, not one line."),
) -> None:
    """Convert chats into Parquet shards that train every turn exactly in one pass.

    Exit status: 0 done (records that could not be converted are in OUT/rejected.jsonl),
    1 the run could not be done (input, output folder, tokenizer, disk) or every record
    was rejected, 2 bad usage, 3 --strict met a bad record, 130 interrupted (continue with
    --resume).
    """
    options = ConvertOptions(
        model=model,
        chat_template=chat_template,
        think_tags=_think_tags(think_tags),
        chat_template_kwargs=_template_kwargs(chat_template_kwargs),
        max_seq_len=max_seq_len,
        train_on=train_on,
        loss_normalization=loss_normalization,
        pack=pack,
        share_prefixes=share_prefixes,
        records_per_shard=records_per_shard,
        num_proc=num_proc,
        engine=engine,
        ray_address=ray_address,
        overwrite=overwrite,
        resume=resume,
        strict=strict,
    )
    columns = (TextColumn("converting"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("convert", total=None)

            def advance(size: int, total: int | None) -> None:
                progress.update(task, advance=size, total=total)

            summary = convert(inputs, out_dir, options, advance)
    except StrictError as error:
        _fail(error, 3, debug)
    except (ConvertError, OSError) as error:
        _fail(error, 1, debug)
    except KeyboardInterrupt:
        console.print(f"interrupted: continue with the same command and --resume (output: {out_dir})")
        raise typer.Exit(130) from None
    for note in summary.notes:
        console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)
    console.print(summary_table(summary, out_dir, packed=pack))
    if summary.reasoning_dropped:
        console.print(f"[yellow]warning:[/yellow] {dropped_reasoning_warning(summary.reasoning_dropped, summary.reasoning_turns)}", highlight=False, soft_wrap=True)
    if summary.tool_calls_dropped:
        console.print(f"[yellow]warning:[/yellow] {dropped_tool_calls_warning(summary.tool_calls_dropped, summary.tool_call_turns)}", highlight=False, soft_wrap=True)
    if summary.read and not summary.written:
        _fail(ConvertError(f"every record was rejected; the reasons are in {os.path.join(out_dir, 'rejected.jsonl')}"), 1, debug)


def _fail(error: Exception, status: int, debug: bool) -> NoReturn:
    """One line that names what failed and why (the path and the system's reason for an
    environment failure), or the traceback with --debug."""
    if debug:
        raise error
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        message = f"{where}{error.strerror or error}"
        if error.errno == errno.ENOSPC:
            message += " (disk full)"
        elif error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            message += " (cannot write there)"
    else:
        message = str(error)
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(status)


def dropped_reasoning_warning(dropped: int, turns: int) -> str:
    return (
        f"{dropped:,} of {turns:,} trained turns with reasoning are trained without it: the chat "
        "template drops the reasoning of the turn being trained. To train it, use a template "
        "(--chat-template) or --chat-template-kwargs that keeps the last turn's reasoning."
    )


def dropped_tool_calls_warning(dropped: int, turns: int) -> str:
    return (
        f"{dropped:,} of {turns:,} trained turns with tool calls are trained without one of "
        "them (its name or arguments are missing from the trained text): the chat template "
        "does not render them for these messages, so the model learns to answer without "
        "calling. Check the records' tool calls against the template (docs/input.md)."
    )


def summary_table(summary: ConvertSummary, out_dir: str, packed: bool) -> Table:
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
    table.add_row("  by the one-pass layout", f"{1 - summary.unshared_tokens / summary.n_pass_tokens:.1%}" if summary.n_pass_tokens else "0.0%")
    table.add_row("  by sharing prefixes", f"{summary.sharing_saving:.1%}")
    table.add_row("trained tokens", f"{summary.trained_tokens:,}")
    # Without packing a row is one conversation: its share of --max-seq-len says nothing.
    table.add_row("fill rate", f"{summary.fill_rate:.1%}" if packed else "n/a (--no-pack)")
    table.add_row("turns with reasoning / trained without it", f"{summary.reasoning_turns:,} / {summary.reasoning_dropped:,}")
    table.add_row("turns with tool calls / trained without one", f"{summary.tool_call_turns:,} / {summary.tool_calls_dropped:,}")
    table.add_row("chat template rendered by", summary.render_engine)
    if summary.rejected:
        table.caption = f"rejected records and reasons: {os.path.join(out_dir, 'rejected.jsonl')}"
    return table


def _run_tokenizer(run, model: str | None):
    """The run's tokenizer, with a warning line if it is not the recorded one."""
    from onepass_prep.inspection.runs import load_run_tokenizer

    loaded, same = load_run_tokenizer(run, model)
    if not same:
        console.print(f"[yellow]warning:[/yellow] tokenizer {loaded.name!r} differs from the one in the manifest")
    return loaded


def _token_range(value: str, length: int) -> tuple[int, int]:
    start, _, end = value.partition(":")
    try:
        bounds = int(start), int(end)
    except ValueError:
        raise typer.BadParameter("expected START:END, e.g. 100:140") from None
    if not 0 <= bounds[0] < bounds[1] <= length:
        raise typer.BadParameter(f"expected 0 <= START < END <= {length}")
    return bounds


@app.command("inspect")
def inspect_command(
    path: Path = typer.Argument(..., metavar="PATH", help="An output folder or one of its shards."),
    row: int | None = typer.Option(None, min=0, metavar="N", help="Row number within the run (or within the shard given); default 0, or with --conversation the row that holds it."),
    conversation: str | None = typer.Option(None, metavar="ID", help="One conversation in full (found in the run unless --row is given): its segment tree, and the mask over its own tokens."),
    tokens: str | None = typer.Option(None, metavar="START:END", help="START:END (e.g. 100:140): a table of these tokens instead of the conversations, tree and mask."),
    png: Path | None = typer.Option(None, metavar="FILE", help="Also write the whole row's mask as a PNG picture."),
    model: str | None = typer.Option(None, "--model", "-m", metavar="MODEL", help="Tokenizer to decode with, instead of the manifest's."),
) -> None:
    """Show one row: its conversations (or the segment tree of a row of one) and its
    attention mask, sized to fit the terminal; --conversation shows one in full."""
    from onepass_prep.format import FormatError, loss_settings
    from onepass_prep.inspection.runs import open_run, read_row, rows_holding
    from onepass_prep.inspection.view import (
        NoSuchConversation,
        RowView,
        conversation_row,
        header,
        layout,
        screen_height,
        shows_colour,
        token_table,
    )

    if tokens is not None and conversation is not None:
        raise typer.BadParameter("--tokens and --conversation do not combine (START:END are row tokens)")
    out = Console()
    found = None  # what the header says of a row found by --conversation
    try:
        run = open_run(path)
        if conversation is not None and row is None:  # found before the tokenizer loads
            number, others = conversation_row(run, conversation)
            found = f"the row that holds {conversation}"
            if others:
                found += f" (so do rows {', '.join(str(n - run.first_row) for n in others)})"
        else:
            number = run.first_row + (row or 0)
        shard_row = read_row(run, number)
        view = RowView.build(shard_row, _run_tokenizer(run, model).tokenizer, loss_settings(run.manifest))
        max_seq_len = run.manifest.get("options", {}).get("max_seq_len")
        if tokens is not None:
            out.print(header(view, max_seq_len))
            out.print(token_table(view, *_token_range(tokens, len(view.row))))
        else:
            try:
                parts = layout(view, out.width, screen_height(out), max_seq_len, conversation, shows_colour(out), found)
            except NoSuchConversation as error:
                holding = rows_holding(run, conversation or "")
                where = f"; it is in row {holding[0] - run.first_row}" if holding else ""
                raise NoSuchConversation(f"{error}{where}") from None
            for part in parts:
                out.print(part)
        if png is not None:
            from onepass_prep.inspection.picture import save_mask_picture

            width, height = save_mask_picture(view, png)
            out.print(f"wrote {png} ({width}x{height})")
    except (FormatError, NoSuchConversation) as error:
        _fail(error, 1, debug=False)



@app.command("stats")
def stats_command(
    path: Path = typer.Argument(..., metavar="PATH", help="An output folder or one of its shards."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Rows, conversations, turns, lengths, tokens and attention work one-pass vs N-pass,
    and the loss: its normalization, the trained turns by weight and the loss units."""
    from onepass_prep.format import FormatError
    from onepass_prep.inspection.runs import open_run
    from onepass_prep.inspection.stats import compute_stats, stats_json, stats_view

    try:
        stats = compute_stats(open_run(path))
    except FormatError as error:
        _fail(error, 1, debug=False)
    if as_json:
        typer.echo(json.dumps(stats_json(stats), indent=2))
    else:
        out = Console()
        out.print(stats_view(stats, out.width))



@app.command("verify")
def verify_command(
    path: Path = typer.Argument(..., metavar="PATH", help="An output folder or one of its shards."),
    inputs: list[Path] = typer.Option(..., "--input", "-i", metavar="INPUT", help="What the run was converted from, as given to convert (repeat for several)."),
    model: str | None = typer.Option(None, "--model", "-m", metavar="MODEL", help="Tokenizer to use instead of the manifest's name; its hash must match."),
    model_check: bool = typer.Option(False, help="Also compare per-token losses of a tiny random model of the tokenizer folder's architecture (its config.json; Qwen3 without one) through the runtime's masks (needs torch)."),
) -> None:
    """Re-render the N-pass samples and check every row against them: exit 0 only if exact."""
    from onepass_prep.format import FormatError
    from onepass_prep.inspection.runs import open_run
    from onepass_prep.inspection.verify import verify

    out = Console()
    try:
        report = verify(open_run(path), inputs, model, model_check)
    except FormatError as error:
        _fail(error, 1, debug=False)
    out.print(
        f"checked {report.conversations:,} conversations ({report.rejected_skipped:,} more that the run "
        f"rejected have no rows to check), {report.samples:,} N-pass samples, {report.pairs:,} "
        f"trained pairs; {report.rows:,} rows, {report.labelled:,} labelled tokens"
    )
    if report.partial:
        out.print("one shard of the run: only the conversations in its rows are checked")
    if report.model_check:
        out.print(f"model check: {report.model_check}")
    if report.ok:
        out.print("[green]OK[/green]: every trained pair appears with its total loss weight, nothing else is labelled")
        return
    out.print(f"[red]MISMATCH[/red]: {report.problem_count:,} problems; shown: {len(report.problems)}")
    for problem in report.problems:
        out.print(f"  {problem}", highlight=False, markup=False)
    raise typer.Exit(1)


@app.command("check-model")
def check_model_command(
    source: str = typer.Argument(..., metavar="PATH", help="A model folder with config.json (or the file itself), or a hub id."),
    debug: bool = typer.Option(False, help="On an error, show the traceback, not one line."),
) -> None:
    """Is one-pass training exact for this architecture? A tiny random-weight model of the
    config against N separate passes, per attention implementation: exit 0 if one is exact."""
    from onepass_prep.inspection.model_check import check_model, load_config

    try:
        report = check_model(load_config(source))
    except ValueError as error:
        _fail(error, 1, debug)
    out = Console(soft_wrap=True, highlight=False)
    shrunk = f" ({'; '.join(report.shrunk)})" if report.shrunk else ""
    out.print(f"layers of the tiny model: {escape(report.layers)}{escape(shrunk)}")
    colour = {"exact": "green", "differs": "red", "refused": "yellow", "not available": "dim"}
    reasons: list[str] = []  # refusals and failures are long and shared: printed once, below
    for verdict in report.verdicts:
        detail = verdict.detail
        if verdict.result in ("refused", "not available"):
            if detail not in reasons:
                reasons.append(detail)
            detail = f"[{reasons.index(detail) + 1}]"
        result = f"[{colour[verdict.result]}]{verdict.result:<13}[/{colour[verdict.result]}]"
        out.print(f"{verdict.implementation:<15} {result} {escape(detail)}")
    for number, reason in enumerate(reasons, 1):
        out.print(f"[{number}] {escape(reason)}")
    if not any(v.result == "exact" for v in report.verdicts):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
