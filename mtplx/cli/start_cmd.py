"""`mtplx start`: pick a model and a mode interactively, then chat or serve.

The command stays thin: the questions and the model check live in launcher.py, the chat loop
in chat.py.
"""

from __future__ import annotations

import time

import click

from mtplx.cli.options import knob, kv_options


@click.command("start")
@click.option("--model", "-m", "model_ref", default=None,
              help="Skip the model question: 'demo', a directory, or a Hugging Face repo id.")
@click.option("--depth", "-d", default=None, metavar="N|auto", callback=knob("depth", text=True),
              help="Skip the mode question: draft depth (auto = adaptive, 0 = plain AR).")
@click.option("--no-mtp", is_flag=True, help="Skip the mode question: plain autoregressive decoding.")
@click.option("--lookup", default=None, metavar="N|auto", callback=knob("lookup", text=True),
              help="Drafts copied from the prompt and the reply so far, in the chat or the server (default auto: "
                   "where it pays in a row that speculates; 0 off; N up to N tokens a step, at depth 0 too).")
@click.option("--thinking/--no-thinking", default=None, help="Skip the thinking question.")
@click.option("--surface", type=click.Choice(["chat", "serve"]), default=None,
              help="Skip the surface question: chat in this terminal, or run the API server.")
@click.option("--port", "-p", type=click.IntRange(1, 65535), default=None,
              help="The API server's port (default 8000, as `mtplx serve`); implies --surface serve.")
@click.option("--temperature", "-t", type=float, default=None, callback=knob("temperature"),
              help="Sampling temperature (default: the contract's).")
@click.option("--top-p", type=float, default=None, callback=knob("top_p"), help="Nucleus filter (default: the contract's).")
@click.option("--top-k", type=int, default=None, callback=knob("top_k"), help="Top-k filter (default: the contract's).")
@click.option("--max-tokens", "-n", type=int, default=512, show_default=True, callback=knob("max_tokens"),
              help="Max tokens per reply (change it in the chat with /max N).")
@click.option("--seed", type=int, default=None, callback=knob("seed"),
              help="Seed for every random draw (each reply reuses it).")
@click.option("--prompt-cache-dir", default=None, metavar="DIR|none",
              help="Where the chat also keeps its prompt caches on disk ('none': memory only). Default: "
                   "prompt-cache/ in mtplx's cache folder (MTPLX_CACHE, ~/.cache/mtplx), as `mtplx serve`.")
@click.option("--yes", "-y", is_flag=True, help="Accept every default without asking (demo, MTP, chat, thinking off).")
@kv_options
@click.pass_context
def start(ctx: click.Context, model_ref: str | None, depth: int | str | None, no_mtp: bool, thinking: bool | None,
          surface: str | None, port: int | None, temperature: float | None, top_p: float | None, top_k: int | None,
          max_tokens: int, seed: int | None, prompt_cache_dir: str | None, yes: bool,
          lookup: int | str | None = None, kv_bits: int | None = None, kv_group_size: int = 64) -> None:
    """Interactive launcher: choose a model, a decoding mode and thinking, check that the model
    fits, then chat in this terminal or start the API server. Every question has a flag that
    skips it; --yes takes all the defaults."""
    from mtplx.cli.launcher import plan as make_plan

    if no_mtp and depth not in (None, 0):
        raise click.UsageError("--no-mtp decodes at depth 0; drop --depth or --no-mtp")
    if port is not None:  # a port means the server: the chat has none
        if surface == "chat":
            raise click.UsageError("--port is the API server's; the chat listens on none: drop --port or "
                                   "pass --surface serve")
        surface = "serve"
    p = make_plan(model_ref=model_ref, depth=depth, no_mtp=no_mtp, thinking=thinking, surface=surface, yes=yes)
    if p.surface == "serve":
        # Only a quantized setting is passed on: else serve's own default.
        kv = {} if kv_bits is None else {"kv_bits": kv_bits, "kv_group_size": kv_group_size}
        _serve(ctx, p.ref, p.depth, port, lookup, **kv)
        return
    _chat(p, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed,
          prompt_cache_dir=prompt_cache_dir, lookup=lookup, kv_bits=kv_bits, kv_group_size=kv_group_size)


def _serve(ctx: click.Context, ref: str, depth: int | str | None, port: int | None = None,
           lookup: int | str | None = None, **kv: int | None) -> None:
    # Imported late: `mtplx serve` is optional and its module may be missing or broken.
    try:
        from mtplx.cli.serve_cmd import serve
    except ImportError as e:
        from mtplx.errors import MtplxError

        raise MtplxError(f"the API server is not available in this installation ({e})",
                         fix="choose 'Chat in this terminal', or install a version of mtplx with `mtplx serve`") from None
    click.echo("Starting the API server (sampling and thinking are set per request) ...")
    # serve's own port check runs before the model loads, and its "choose another --port" is
    # start's --port too.
    extra = {} if port is None else {"port": port}
    if lookup is not None:  # else serve's own default
        extra["lookup"] = lookup
    ctx.invoke(serve, model_ref=ref, depth=None if depth == 0 else depth, no_mtp=depth == 0, **extra, **kv)


def _chat(p, *, temperature: float | None, top_p: float | None, top_k: int | None, max_tokens: int,
          seed: int | None, prompt_cache_dir: str | None = None, lookup: int | str | None = None,
          kv_bits: int | None = None, kv_group_size: int = 64) -> None:
    import mtplx
    from mtplx.api import default_depth
    from mtplx.core import knobs
    from mtplx.cli.chat import ChatSession, run_chat

    # On its own line: a Hugging Face download draws its progress bars below it.
    click.echo(f"Loading {p.ref} ...")
    t0 = time.perf_counter()
    model, tokenizer = mtplx.load(p.ref, mtp=p.load_mtp)
    click.echo(f"Loaded in {time.perf_counter() - t0:.1f} s ({'with' if model.has_mtp else 'without'} the MTP head).")
    depth = default_depth(model) if p.depth is None else p.depth
    session = ChatSession(model, tokenizer, depth=depth, thinking=p.thinking, max_tokens=max_tokens,
                          temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                          prompt_cache_dir=_disk_dir(prompt_cache_dir),
                          lookup=knobs.AUTO if lookup is None else lookup, kv_bits=kv_bits,
                          kv_group_size=kv_group_size)
    run_chat(session)


def _disk_dir(value: str | None):
    """The chat's prompt-cache folder: ``value``, mtplx's default, or None for 'none'."""
    from pathlib import Path

    from mtplx.artifact.paths import prompt_cache_dir

    if value is not None and value.strip().lower() == "none":
        return None
    return Path(value).expanduser() if value is not None else prompt_cache_dir()


COMMANDS = [start]
