"""Options shared by several commands, and small output helpers."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click

from mtplx.core import knobs

model_option = click.option("--model", "-m", "model_ref", default="demo", show_default=True,
                            help="Artifact: 'demo', a directory, or a Hugging Face repo id.")
force_option = click.option("--force", is_flag=True, help="Load even if the sidecar's hashes do not match (loudly).")


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that refuses NaN and infinities: NaN fails no comparison, so a plain
    FloatRange lets ``nan`` through to wherever the value is first used (after the model
    loaded, as "unexpected ValueError"). Every float option with a range uses this type."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        out = super().convert(value, param, ctx)
        if isinstance(out, float) and not math.isfinite(out):
            self.fail(f"{value!r} is not a finite number; pass one {self._describe_range()}", param, ctx)
        return out


def knob(name: str, text: bool = False) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback validating an option through :mod:`mtplx.core.knobs`, the one definition of
    every decoding knob's limits. A refused value raises :class:`~mtplx.core.knobs.KnobError` (an
    MtplxError), which the group prints as one line naming the flag, before anything loads.
    ``text``: the option is a string that :func:`mtplx.core.knobs.parse` reads (``--depth auto``)."""
    check = knobs.parse if text else knobs.check

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        flag = max(param.opts, key=len) if param.opts else name
        if isinstance(value, tuple):  # multiple=True
            return tuple(check(name, v, label=flag) for v in value)
        return check(name, value, label=flag)

    return callback


def sampling_options(f: Callable) -> Callable:
    for opt in reversed([
        click.option("--temperature", "-t", type=float, default=None, callback=knob("temperature"),
                     help=f"Target temperature (default: the contract's, else {knobs.DEFAULTS['temperature']:g}; 0 = greedy)."),
        click.option("--top-p", type=float, default=None, callback=knob("top_p"),
                     help=f"Nucleus filter (default {knobs.DEFAULTS['top_p']:g})."),
        click.option("--top-k", type=int, default=None, callback=knob("top_k"),
                     help=f"Top-k filter (default {knobs.DEFAULTS['top_k']}; 0 or -1 disables)."),
        click.option("--min-p", type=float, default=None, callback=knob("min_p"), help="Min-p filter (default off)."),
        click.option("--draft-temperature", type=float, default=None, callback=knob("draft_temperature"),
                     help="Temperature the head drafts at (default: the target's, or what `mtplx tune` found "
                          "best; exactness holds for any)."),
        click.option("--seed", type=int, default=None, callback=knob("seed"), help="Seed for every random draw."),
    ]):
        f = opt(f)
    return f


STRICT_GREEDY_HELP = (
    "Strict greedy (temperature 0 only): a token that a multi-row verify pass decided with a top-2 logit margin "
    "at or under --strict-margin is decided again by a one-row pass with plain decoding's arithmetic, so greedy "
    "MTP output equals greedy AR output even on a backend whose verify rows round differently from decode steps "
    "(`mtplx doctor --exactness` measures yours; on MLX's CPU backend they are equal without it). Cost: one "
    "one-row pass per near-tie, counted as 'recomputed'. Not covered: caches written by multi-row passes, and "
    "the first token (the prompt's prefill, as in AR). No effect at temperature > 0, whose law is exact anyway.")


def _strict_margin(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    from mtplx.engine import strict

    return None if value is None else strict.check(value, label="--strict-margin")


def strict_options(f: Callable) -> Callable:
    """--strict-greedy and --strict-margin; the command gets ``strict_greedy`` (False, True or a
    margin: what the API takes)."""
    @functools.wraps(f)
    def command(*args: Any, strict_greedy: bool, strict_margin: float | None, **kwargs: Any) -> Any:
        return f(*args, strict_greedy=strict_margin if strict_margin is not None else strict_greedy, **kwargs)

    for opt in reversed([
        click.option("--strict-greedy", is_flag=True, help=STRICT_GREEDY_HELP),
        click.option("--strict-margin", type=float, default=None, metavar="LOGITS", callback=_strict_margin,
                     help=f"The near-tie margin of --strict-greedy (default {knobs.NEAR_TIE:g}, the rounding of bf16 "
                          "logits between kernels; 'inf' re-decides every token); implies --strict-greedy."),
    ]):
        command = opt(command)
    return command


def lookup_option(f: Callable) -> Callable:
    """--lookup N|auto: drafts copied from the context (mtplx.engine.lookup); the command gets ``lookup``."""
    return click.option("--lookup", default=knobs.AUTO, show_default=True, metavar="N|auto",
                        callback=knob("lookup", text=True),
                        help="Copy drafts from the prompt and the reply so far (exact at any temperature): 0 = off, "
                             f"N = up to N tokens a step whenever the context has a match (at most {knobs.MAX_LOOKUP}), "
                             "auto = where the cost model and the copies' acceptance say it pays, in a row that "
                             "speculates.")(f)


def _kv_bits(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    return None if value in (None, "none") else int(value)


def _kv_group_size(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value not in (32, 64, 128):
        raise click.BadParameter(f"{value} is not one of 32, 64, 128 (elements per quantization group)")
    return value


def kv_options(f: Callable) -> Callable:
    """--kv-bits none|8|4 and --kv-group-size 32|64|128: the trunk's attention KV stored
    quantized (mtplx.model.kv_quant); the command gets ``kv_bits`` (None or an int) and
    ``kv_group_size``. A value outside the choices is a usage error, before anything loads.
    (Their defaults are the values themselves, so ``ctx.invoke`` passes them as they are.)"""
    for opt in reversed([
        click.option("--kv-bits", type=click.Choice(["none", "8", "4"], case_sensitive=False), default=None,
                     callback=_kv_bits,
                     help="Store the attention KV cache quantized to 8 or 4 bits (default none: full precision): "
                          "about 2x / 3.5x less KV memory per token of context, for a slightly different target "
                          "(output stays exact relative to plain decoding with the same --kv-bits). Prompt caches "
                          "are kept apart per setting."),
        click.option("--kv-group-size", type=int, default=64, show_default=True, callback=_kv_group_size,
                     help="Elements per quantization group of --kv-bits (32, 64 or 128, along the attention head)."),
    ]):
        f = opt(f)
    return f


def format_status(r: Any, *, prefill: bool = False) -> str:
    """The one-line summary after a completion (`mtplx run`, each chat reply), from the last
    GenerationResponse: the mode and depth first (``MTP d2``, ``AR``), then the rates."""
    stats = getattr(r, "stats", None)
    if stats is not None:
        mode = stats.mode
        # Positions depth auto never drafted have no acceptance to show.
        acc = " ".join(f"{a:.2f}" for a, n in zip(stats.acceptance, stats.drafted) if n) or "-"
    else:  # a response without stats: infer from the per-position acceptance
        mode = f"MTP d{len(r.acceptance)}" if r.acceptance else "AR"
        acc = " ".join(f"{a:.2f}" for a in r.acceptance) if r.acceptance else "-"
    rates = f"{r.generation_tps:.1f} tok/s" + (f" | prefill {r.prompt_tps:.1f} tok/s" if prefill else "")
    recomputed = getattr(stats, "recomputed", 0)
    if recomputed:  # strict greedy re-decided these near-ties with a one-row pass
        rates += f" | {recomputed} recomputed"
    copied = getattr(stats, "from_lookup", 0)
    if copied:  # accepted drafts copied from the context (the rest: MTP drafts and sampled tokens)
        rates += f" | {copied} copied, {getattr(stats, 'from_mtp', 0)} MTP, {getattr(stats, 'from_sampled', 0)} sampled"
    cached = getattr(r, "cached_tokens", 0)
    if cached:  # a prompt cache served these: the prefill rate is over the rest
        rates += f" | {cached} of {r.prompt_tokens} prompt tokens cached"
    return (f"[{mode} | {r.generation_tokens} tokens | {rates} | acceptance {acc}"
            f" | {r.tokens_per_step:.2f} tokens/step | {r.finish_reason or '?'}]")


def confirm_download(yes: bool) -> Callable[[str], bool]:
    """For ensure_artifact: show what a first use will download, then ask (unless --yes)."""

    def confirm(plan: str) -> bool:
        click.echo(plan, err=True)
        return yes or click.confirm("Download and graft it now?", default=True, err=True)

    return confirm


yes_option = click.option("--yes", "-y", is_flag=True,
                          help="Graft a model that has no artifact yet (a catalog id or an original checkpoint's "
                               "repo id) without asking.")


def graft_if_needed(model_ref: str, yes: bool) -> str:
    """The ref to load: an original checkpoint or a catalog id is grafted first, as `run` and
    `start` do (the plan shown, then asked unless --yes); anything else comes back as it is."""
    from mtplx.artifact.store import ensure_artifact

    return ensure_artifact(model_ref, confirm=confirm_download(yes))


def write_json(data: Any, target: str | None) -> None:
    """--json: '-' prints to stdout, a path writes the file."""
    if target is None:
        return
    text = json.dumps(data, indent=2)
    if target == "-":
        click.echo(text)
    else:
        Path(target).write_text(text + "\n", encoding="utf-8")


def check_writable(path: str | Path, what: str) -> Path:
    """Refuse, before any work is done, an output path that could not be written once the work
    is over (a report after an hour's bench, a prompt cache after a reply): a directory, or a
    place where no file can be created. The check creates the missing parent directories, as
    the write would, and a temporary file it removes."""
    import tempfile

    from mtplx.errors import MtplxError

    path = Path(path)
    if path.is_dir():
        raise MtplxError(f"{what} path is a directory", path=path, fix="name a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".check"):
            pass
    except OSError as e:
        raise MtplxError(f"{what} cannot be written there ({e.strerror or e})", path=path,
                         fix="choose a path in a directory you can write to") from None
    return path


def _json_target(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value not in (None, "-"):
        check_writable(value, "the --json report")
    return value


json_option = click.option("--json", "json_out", default=None, metavar="PATH|-", callback=_json_target,
                           help="Write the report as JSON to PATH ('-' for stdout).")


@dataclass(frozen=True)
class DistributedOptions:
    mode: str
    timeout: float | None
    layers: tuple[int, ...] | None


def _layers(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter("give layer counts separated by commas, rank 0 first, e.g. 10,22",
                                 param_hint="--distributed-layers") from None


def distributed_options(f: Callable) -> Callable:
    """--distributed and its two settings, handed to the command as one ``distributed``
    argument (None in a single process)."""

    @functools.wraps(f)
    def command(*args: Any, distributed: str | None, distributed_timeout: float | None,
                distributed_layers: str | None, **kwargs: Any) -> Any:
        if distributed is None and (distributed_timeout is not None or distributed_layers is not None):
            raise click.UsageError("--distributed-timeout and --distributed-layers apply only with --distributed")
        options = None
        if distributed is not None:
            options = DistributedOptions(distributed, distributed_timeout, _layers(distributed_layers))
        return f(*args, distributed=options, **kwargs)

    for opt in reversed([
        click.option("--distributed", type=click.Choice(["pipeline"]), default=None,
                     help="Split the trunk's layers across the ranks mlx.launch started; rank 0 decodes: "
                          "`mlx.launch --backend ring --hosts IP0,IP1 -- mtplx ... --distributed pipeline`."),
        click.option("--distributed-timeout", type=FiniteFloatRange(min=0.1), default=None, metavar="SECONDS",
                     help="How long a rank waits for another before the run ends on every rank (default 120)."),
        click.option("--distributed-layers", default=None, metavar="N0,N1,..",
                     help="Layers per rank, rank 0 (the last layers, lm_head and MTP head) first; default even."),
    ]):
        command = opt(command)
    return command


def load_model(model_ref: str, *, mtp: bool, force: bool, distributed: DistributedOptions | None) -> tuple[Any, Any]:
    """mtplx.load, or with --distributed this rank's part of the model: on rank 0 the model to
    decode with; any other rank serves rank 0 until the run ends and exits here."""
    if distributed is None:
        import mtplx

        return mtplx.load(model_ref, mtp=mtp, force=force)
    from mtplx.distributed import load_or_follow

    return load_or_follow(model_ref, mode=distributed.mode, mtp=mtp, force=force, timeout=distributed.timeout,
                          layers=distributed.layers)
