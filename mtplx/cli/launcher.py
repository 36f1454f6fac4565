"""The questions `mtplx start` asks, and the check it makes before any weights load.

Every question is a numbered menu answered with click's prompt (Enter takes the default), so
it works in any terminal, over ssh and under tmux, with no dependency beyond click. Each
question has a flag that skips it; ``--yes`` takes every default.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import click

from mtplx.core import knobs
from mtplx.errors import MtplxError

# Sentinels for the two menu entries that ask a follow-up question instead of naming a model.
LOCAL_PATH = "\0local-path"
CUSTOM_REPO = "\0custom-repo"

# Weights plus KV cache, activations and the head: the same margin `mtplx inspect` warns with.
MEMORY_MARGIN = 1.2


@dataclass
class Choice:
    label: str
    value: str


@dataclass
class Plan:
    """What the answers add up to: the model, how to decode, where."""

    ref: str
    depth: int | str | None  # None: what `mtplx tune` saved, else "auto" (resolved at load)
    thinking: bool
    surface: str  # "chat" | "serve"
    load_mtp: bool  # load the head (so /depth can switch to MTP later), not only when starting in MTP


def _size(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def choose(title: str, choices: Sequence[Choice], default: int = 1) -> str:
    """A numbered menu; returns the chosen value. ``default`` is 1-based."""
    click.echo(click.style(title, bold=True))
    for i, c in enumerate(choices, 1):
        click.echo(f"  {i}) {c.label}")
    n = click.prompt("Choose", default=default, type=click.IntRange(1, len(choices)), show_default=True)
    return choices[n - 1].value


def model_choices(entries: list[dict[str, Any]]) -> list[Choice]:
    """The bundled demo first, then the catalog, then what the HF cache holds, then free entry."""
    order = {"bundled": 0, "catalog": 1, "hf-cache": 2}
    cached = {e["ref"] for e in entries if e["where"] == "hf-cache"}
    out, seen = [], set()
    for e in sorted(entries, key=lambda e: order.get(e["where"], 3)):
        if e["ref"] in seen:  # a catalog model already in the cache is listed once, as the catalog's
            continue
        seen.add(e["ref"])
        where = "bundled" if e["where"] == "bundled" else e["where"]
        if e["where"] == "catalog":
            title = e["title"].split(" — ")[0]  # the catalog's graft hint is given after the check instead
            note = "cached, needs graft" if e["ref"] in cached else "needs graft"
            extra = f"~{e['memory_gb']:g} GB" if e.get("memory_gb") else "-"
            label = f"{e['ref']:<28} {title}  [{note}, {extra}]"
        else:
            label = f"{e['ref']:<28} {e['title']}  [{where}, {_size(e.get('size_bytes'))}]"
        out.append(Choice(_short(label, 110), e["ref"]))
    out.append(Choice("Local path…", LOCAL_PATH))
    out.append(Choice("Custom Hugging Face repo…", CUSTOM_REPO))
    return out


def ask_model() -> str:
    from mtplx.artifact.models import list_models

    value = choose("Which model?", model_choices(list_models()))
    if value == LOCAL_PATH:
        return str(Path(click.prompt("Artifact directory", type=click.Path(exists=True, file_okay=False))).expanduser())
    if value == CUSTOM_REPO:
        return click.prompt("Hugging Face repo id (org/name)").strip()
    return value


def _catalog_source(ref: str) -> str | None:
    from mtplx.artifact.catalog import catalog

    for m in catalog():
        if m["ref"] == ref and m.get("source"):
            return m["source"]
    return None


def graft_command(source: str) -> str:
    """The exact command that turns an original checkpoint into an artifact mtplx can run."""
    return f"mtplx graft --source {shlex.quote(source)} --out {graft_dir(source)}"


def graft_dir(source: str) -> str:
    # A concrete directory rather than DIR, so the command can be pasted as it is.
    # ~ stays unquoted so the shell expands it; the name after it is quoted if it needs to be.
    return "~/mtplx-models/" + shlex.quote(source.rstrip("/").split("/")[-1])


def inspect_model(ref: str) -> Any:
    """`inspect_ref`, with a catalog model that cannot be fetched right now explained as such."""
    from mtplx.artifact.inspect import inspect_ref

    try:
        return inspect_ref(ref)
    except MtplxError as e:
        source = _catalog_source(ref)
        if source is None:
            raise
        reason = str(e).split(" Fix: ")[0].rstrip(".")
        raise MtplxError(f"{ref} is an original checkpoint that mtplx runs only once its MTP head is grafted, and "
                         f"its files cannot be read right now ({reason})",
                         fix=f"connect to the network, run `{graft_command(source)}`, then "
                             f"`mtplx start --model {graft_dir(source)}`") from None


def saved_depths(info: Any) -> tuple[int | str | None, int]:
    """Read without loading weights: the depth `mtplx tune` saved for this artifact (None if
    none), and the fixed depth "MTP at a depth I choose" offers first (the tuned one if it is a
    positive integer, else the contract's)."""
    if not info.can_run_mtp or not info.path:
        return None, knobs.CONTRACT_DEPTH
    from mtplx.artifact.loader import read_contract
    from mtplx.core.config import tuned_depth

    try:
        contract = read_contract(Path(info.path))
    except MtplxError:
        return None, knobs.CONTRACT_DEPTH
    # tuned_depth() only looks at `.contract`, so a stand-in spares loading the model to ask.
    tuned = tuned_depth(SimpleNamespace(contract=contract, path=info.path))
    fixed = tuned if isinstance(tuned, int) and tuned > 0 else int(contract.defaults.get("depth", knobs.CONTRACT_DEPTH))
    return tuned, max(fixed, 1)


def verdict(info: Any) -> str:
    """The inspection's verdict, with the default depth it names being the one this machine will
    use: what `mtplx tune` saved where it saved a fixed depth (`start` and `run` default to it)."""
    text = info.verdict
    try:
        tuned, _ = saved_depths(info)
    except MtplxError:  # a damaged tuned entry: the load says so, naming the file
        return text
    if isinstance(tuned, int):
        saved = "plain AR (depth 0)" if tuned == 0 else f"depth {tuned}"
        text = text.replace("depth auto", f"{saved}, saved by `mtplx tune`", 1)
    return text


def report_and_check(info: Any, *, ar_only: bool, yes: bool) -> None:
    """Print what will happen; raise MtplxError (one paragraph, no traceback) if it cannot run."""
    a = info.architecture
    arch = f"{a.get('model_type')}, hidden {a.get('hidden_size')}, {a.get('num_hidden_layers')} layers, vocab {a.get('vocab_size')}"
    if a.get("num_experts"):
        arch += f", {a['num_experts']} experts"
    need = int(info.weights_bytes * MEMORY_MARGIN)
    click.echo(f"  model:        {info.ref}  ({info.path})")
    click.echo(f"  kind:         {info.kind}")
    if a:
        click.echo(f"  architecture: {arch}")
    click.echo(f"  MTP head:     {'present' if info.mtp_head else 'absent'}"
               + ("" if info.contract_valid is not False else "  (contract INVALID: MTP refused)"))
    click.echo(f"  memory:       needs ~{_size(need)} (weights {_size(info.weights_bytes)} + 20%), "
               f"this machine offers {_size(info.memory_bytes)}")
    click.echo(f"  verdict:      {verdict(info)}")
    if info.kind == "hf-checkpoint":
        raise MtplxError(f"{info.ref} is an original checkpoint: its MTP head has to be grafted onto an MLX trunk "
                         f"before mtplx can run it", fix=f"run `{graft_command(info.ref)}`, then "
                         f"`mtplx start --model {graft_dir(info.ref)}`")
    if not (info.can_run_ar or info.can_run_mtp):
        raise MtplxError(f"{info.ref} cannot run: {info.verdict}", fix="pick another model (`mtplx models` lists them)")
    if not ar_only and not info.can_run_mtp:
        click.echo("  note:         no usable MTP head, so only plain AR decoding is offered")
    if need and info.memory_bytes and need > info.memory_bytes:
        if yes or not click.confirm("  This model probably does not fit in memory. Load it anyway?", default=False):
            raise MtplxError(f"{info.ref} needs about {_size(need)} and this machine offers {_size(info.memory_bytes)}",
                             fix="pick a smaller model or a lower-bit trunk (`mtplx graft --trunk-bits 4`)")


def ask_depth(info: Any, *, depth: int | str | None, no_mtp: bool, yes: bool) -> int | str | None:
    """0 = plain AR, N = MTP at depth N, "auto" = adaptive, None = what `mtplx tune` saved,
    else auto (resolved at load).

    One menu, whatever was tuned: adaptive MTP, a fixed depth, plain AR. What `mtplx tune`
    saved only moves the default (Enter) to its entry and says so."""
    if no_mtp:
        return 0
    if depth is not None:  # already checked by start's --depth callback (mtplx.core.knobs)
        if depth != 0 and not info.can_run_mtp:
            raise MtplxError(f"--depth {depth} needs an MTP head and {info.ref} has no usable one",
                             fix="drop --depth, or pass --no-mtp for plain AR decoding")
        return depth
    if not info.can_run_mtp:
        return 0
    if yes:
        return None
    tuned, fixed = saved_depths(info)
    saved = " [saved by `mtplx tune`]"
    choices = [Choice("MTP, adaptive (depth auto: each step's depth from this machine's costs and the acceptance "
                      "so far)" + (saved if tuned == knobs.AUTO else ""), "auto"),
               Choice("MTP at a fixed depth I choose" + (f" [`mtplx tune` saved depth {tuned}]"
                                                          if isinstance(tuned, int) and tuned > 0 else ""), "custom"),
               Choice("Plain autoregressive decoding (AR, depth 0)" + (saved if tuned == 0 else ""), "ar")]
    default = {0: 3}.get(tuned, 2) if isinstance(tuned, int) else 1
    value = choose("Decoding mode?", choices, default=default)
    if value == "ar":
        return 0
    if value == "custom":
        return click.prompt("Draft depth", type=click.IntRange(1, knobs.MAX_DEPTH), default=fixed)
    return knobs.AUTO


def ask_surface(surface: str | None, yes: bool) -> str:
    if surface is not None:
        return surface
    if yes:
        return "chat"
    return choose("Where?", [Choice("Chat in this terminal", "chat"),
                             Choice("API server (OpenAI-compatible, `mtplx serve`)", "serve")])


def ask_thinking(thinking: bool | None, yes: bool) -> bool:
    # Off by default: thinking makes every reply much longer, and it can be toggled with /thinking.
    if thinking is not None:
        return thinking
    if yes:
        return False
    return choose("Thinking mode?", [Choice("Off (answer directly)", "off"),
                                     Choice("On (the model reasons in <think> first)", "on")]) == "on"


def plan(*, model_ref: str | None, depth: int | None, no_mtp: bool, thinking: bool | None,
         surface: str | None, yes: bool) -> Plan:
    """Ask what the flags did not say, check the model, and return the plan."""
    from mtplx.artifact.paths import find_artifact
    from mtplx.artifact.store import ensure_artifact
    from mtplx.cli.options import confirm_download

    asked = model_ref or ("demo" if yes else ask_model())
    fresh = find_artifact(asked) is None
    ref = ensure_artifact(asked, confirm=confirm_download(yes))
    if fresh and ref != asked and not yes:  # grafted just now (the only case that changes the ref): offer the check once
        from mtplx.cli.doctor_cmd import offer_exactness

        offer_exactness(ref)
    click.echo(f"Checking {ref} ...")
    info = inspect_model(ref)
    report_and_check(info, ar_only=no_mtp or depth == 0, yes=yes)
    d = ask_depth(info, depth=depth, no_mtp=no_mtp, yes=yes)
    where = ask_surface(surface, yes)
    think = ask_thinking(thinking, yes) if where == "chat" else False
    return Plan(ref=ref, depth=d, thinking=think, surface=where, load_mtp=info.can_run_mtp)
