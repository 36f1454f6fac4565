"""`mtplx run`: one completion, streamed."""

from __future__ import annotations

import sys

import click

from mtplx.cli.options import (distributed_options, force_option, json_option, load_model, model_option,
                               sampling_options, write_json)


@click.command("run")
@click.argument("prompt", required=False)
@model_option
@click.option("--max-tokens", "-n", type=int, default=256, show_default=True)
@click.option("--depth", "-d", type=int, default=None, help="Draft depth (default: tuned, else the contract's).")
@click.option("--no-mtp", is_flag=True, help="Plain autoregressive decoding (depth 0).")
@click.option("--chat/--raw", default=True, show_default=True, help="Wrap the prompt in the chat template.")
@click.option("--thinking/--no-thinking", default=None, help="Turn the template's thinking mode on or off.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@sampling_options
@force_option
@json_option
@click.option("--quiet", "-q", is_flag=True, help="Print only the completion, no statistics.")
@distributed_options
def run(prompt, model_ref, max_tokens, depth, no_mtp, chat, thinking, stop, temperature, top_p, top_k, min_p,
        draft_temperature, seed, force, json_out, quiet, distributed):
    """Complete PROMPT (or standard input when PROMPT is omitted or '-')."""
    import mtplx

    if prompt in (None, "-"):
        if sys.stdin.isatty():
            raise click.UsageError("give a PROMPT or pipe one on standard input")
        prompt = sys.stdin.read()
    model, tokenizer = load_model(model_ref, mtp=not no_mtp, force=force, distributed=distributed)
    messages = [{"role": "user", "content": prompt}] if chat else prompt
    text, last = [], None
    for r in mtplx.stream_generate(model, tokenizer, messages, max_tokens=max_tokens, temperature=temperature,
                                   top_p=top_p, top_k=top_k, min_p=min_p, depth=0 if no_mtp else depth,
                                   draft_temperature=draft_temperature, seed=seed, stop=list(stop),
                                   enable_thinking=thinking):
        text.append(r.text)
        if json_out != "-":
            click.echo(r.text, nl=False)
        last = r
    if json_out != "-":
        click.echo()
    if last is not None and not quiet and json_out != "-":
        acc = " ".join(f"{a:.2f}" for a in last.acceptance) or "-"
        click.echo(f"[{last.generation_tokens} tokens | {last.generation_tps:.1f} tok/s | prefill {last.prompt_tps:.1f} tok/s"
                   f" | acceptance {acc} | {last.tokens_per_step:.2f} tokens/step | {last.finish_reason}]", err=True)
    if last is not None:
        write_json({"text": "".join(text), "finish_reason": last.finish_reason, "stats": last.stats.as_dict()}, json_out)


COMMANDS = [run]
