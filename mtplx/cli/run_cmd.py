"""`mtplx run`: one completion, streamed."""

from __future__ import annotations

import sys

import click

from mtplx.cli.options import (check_writable, confirm_download, distributed_options, force_option, format_status,
                               json_option, knob, kv_options, load_model, lookup_option, model_option, sampling_options,
                               strict_options, write_json)
from mtplx.errors import MtplxError


def read_stdin() -> str:
    """Standard input as UTF-8 text, or one clear error.

    Invalid UTF-8 is refused rather than decoded with replacement characters: the prompt would
    silently differ from the file the user piped (a Latin-1 or UTF-16 file would reach the model
    as a run of U+FFFD), and the completion would be conditioned on text nobody wrote. The
    error says where the first bad byte is and how to convert the file. Read as bytes, so the
    locale's encoding plays no part; a UTF-8 byte-order mark is dropped.
    """
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise MtplxError(f"standard input is not valid UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})",
                         fix="convert it first, e.g. `iconv -f LATIN1 -t UTF-8 FILE | mtplx run`") from None


def check_argument(prompt: str) -> str:
    # Python turns bytes of argv that are not UTF-8 into lone surrogates, which no tokenizer takes.
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MtplxError(f"the PROMPT argument is not valid UTF-8 text (character {e.start})",
                         fix="pass UTF-8 text, or pipe the prompt on standard input") from None
    return prompt


@click.command("run")
@click.argument("prompt", required=False)
@model_option
@click.option("--max-tokens", "-n", type=int, default=256, show_default=True, callback=knob("max_tokens"))
@click.option("--depth", "-d", default=None, metavar="N|auto", callback=knob("depth", text=True),
              help="Draft depth: auto (the default unless `mtplx tune` saved one) chooses each step's depth "
                   "from this machine's costs and the acceptance so far; 0 = plain AR; N drafts N every step.")
@click.option("--no-mtp", is_flag=True, help="Plain autoregressive decoding (depth 0).")
@click.option("--chat/--raw", default=True, show_default=True, help="Wrap the prompt in the chat template.")
@click.option("--thinking/--no-thinking", default=None, help="Turn the template's thinking mode on or off.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@sampling_options
@strict_options
@lookup_option
@kv_options
@force_option
@json_option
@click.option("--quiet", "-q", is_flag=True, help="Print only the completion, no statistics.")
@click.option("--yes", "-y", is_flag=True, help="Graft a model that has no artifact yet without asking.")
@click.option("--prompt-cache", "prompt_cache_file", type=click.Path(dir_okay=False), default=None,
              help="Reuse the prompt cache saved in FILE (a run whose prompt extends its tokens prefills only "
                   "the rest) and save the updated cache there. A file from another model is refused, and the "
                   "run starts cold.")
@distributed_options
def run(prompt, model_ref, max_tokens, depth, no_mtp, chat, thinking, stop, temperature, top_p, top_k, min_p,
        draft_temperature, seed, strict_greedy, lookup, kv_bits, kv_group_size, force, json_out, quiet, yes,
        prompt_cache_file, distributed):
    """Complete PROMPT (or standard input when PROMPT is omitted or '-')."""
    if no_mtp and depth not in (None, 0):
        raise click.UsageError("--no-mtp decodes at depth 0; drop --depth or --no-mtp")
    if prompt_cache_file and distributed:
        raise click.UsageError("--prompt-cache is not supported with --distributed")
    if prompt in (None, "-"):
        if sys.stdin.isatty():
            raise click.UsageError("give a PROMPT or pipe one on standard input")
        prompt = read_stdin()
        if not prompt:
            raise MtplxError("standard input is empty: there is no prompt to complete",
                             fix="pipe the prompt's text, or give it as the PROMPT argument")
    else:
        prompt = check_argument(prompt)
        if not prompt:
            # The API and /v1/completions refuse an empty prompt; so does run, even where the chat
            # template would wrap it into tokens: the model would answer a question nobody asked.
            raise MtplxError("the prompt is empty", fix="give the text to complete as PROMPT, or pipe it on standard input")
    if prompt_cache_file:
        check_writable(prompt_cache_file, "the prompt cache")  # before loading and generating, not after

    import mtplx
    from mtplx.artifact.store import ensure_artifact

    model_ref = ensure_artifact(model_ref, confirm=confirm_download(yes))
    model, tokenizer = load_model(model_ref, mtp=not no_mtp, force=force, distributed=distributed)
    if strict_greedy is not False:
        note_strict_off(model, temperature)
    cache = open_prompt_cache(prompt_cache_file, model, kv_bits, kv_group_size) if prompt_cache_file else None
    messages = [{"role": "user", "content": prompt}] if chat else prompt
    text, last = [], None
    for r in mtplx.stream_generate(model, tokenizer, messages, max_tokens=max_tokens, temperature=temperature,
                                   top_p=top_p, top_k=top_k, min_p=min_p, depth=0 if no_mtp else depth,
                                   draft_temperature=draft_temperature, seed=seed, stop=list(stop),
                                   enable_thinking=thinking, prompt_cache=cache, strict_greedy=strict_greedy,
                                   lookup=lookup, kv_bits=kv_bits, kv_group_size=kv_group_size):
        text.append(r.text)
        if json_out != "-":
            click.echo(r.text, nl=False)
        last = r
    if json_out != "-":
        click.echo()
    if last is not None and not quiet and json_out != "-":
        click.echo(format_status(last, prefill=True), err=True)
    if last is not None:
        write_json({"text": "".join(text), "finish_reason": last.finish_reason, "stats": last.stats.as_dict()}, json_out)
    if cache is not None:
        mtplx.save_prompt_cache(prompt_cache_file, cache)


def note_strict_off(model, temperature: float | None) -> None:
    """--strict-greedy guards greedy tokens only: at temperature > 0 (the contract's default,
    unless -t 0) it does nothing, and one line on stderr says so rather than leave the user to
    believe the output was checked."""
    from mtplx.api import sampling_from

    t = sampling_from(model, temperature, None, None, None).temperature
    if t > 0:
        click.echo(f"mtplx: note: --strict-greedy acts at temperature 0 only; this run samples at temperature {t:g}, "
                   "whose law is exact without it (pass -t 0 for greedy output)", err=True)


def open_prompt_cache(path: str, model, kv_bits: int | None = None, kv_group_size: int = 64):
    """The prompt cache saved at ``path``; a new one when there is none yet, or (after one line
    saying why) when the file cannot serve this model: damaged, another model, another version,
    another --kv-bits."""
    import os

    import mtplx

    kv = {"kv_bits": kv_bits, "kv_group_size": kv_group_size}
    if not os.path.exists(path):
        return mtplx.make_prompt_cache(model, **kv)
    try:
        return mtplx.load_prompt_cache(path, model, **kv)
    except MtplxError as e:
        click.echo(f"mtplx: {e} Starting without it; it will be overwritten.", err=True)
        return mtplx.make_prompt_cache(model, **kv)


COMMANDS = [run]
