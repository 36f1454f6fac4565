"""Options shared by several commands, and small output helpers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import click

model_option = click.option("--model", "-m", "model_ref", default="demo", show_default=True,
                            help="Artifact: 'demo', a directory, or a Hugging Face repo id.")
force_option = click.option("--force", is_flag=True, help="Load even if the sidecar's hashes do not match (loudly).")


def sampling_options(f: Callable) -> Callable:
    for opt in reversed([
        click.option("--temperature", "-t", type=float, default=None, help="Target temperature (contract default 0.6; 0 = greedy)."),
        click.option("--top-p", type=float, default=None, help="Nucleus filter (default 0.95)."),
        click.option("--top-k", type=int, default=None, help="Top-k filter (default 20; 0 disables)."),
        click.option("--min-p", type=float, default=None, help="Min-p filter (default off)."),
        click.option("--draft-temperature", type=float, default=None, help="Temperature the head drafts at (exactness holds for any)."),
        click.option("--seed", type=int, default=None, help="Seed for every random draw."),
    ]):
        f = opt(f)
    return f


def confirm_download(yes: bool) -> Callable[[str], bool]:
    """For ensure_artifact: show what a first use will download, then ask (unless --yes)."""

    def confirm(plan: str) -> bool:
        click.echo(plan, err=True)
        return yes or click.confirm("Download and graft it now?", default=True, err=True)

    return confirm


def write_json(data: Any, target: str | None) -> None:
    """--json: '-' prints to stdout, a path writes the file."""
    if target is None:
        return
    text = json.dumps(data, indent=2)
    if target == "-":
        click.echo(text)
    else:
        Path(target).write_text(text + "\n", encoding="utf-8")


json_option = click.option("--json", "json_out", default=None, metavar="PATH|-",
                           help="Write the report as JSON to PATH ('-' for stdout).")
