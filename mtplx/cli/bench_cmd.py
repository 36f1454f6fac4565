"""`mtplx bench` and `mtplx tune`."""

from __future__ import annotations

import dataclasses

import click

from mtplx.cli import bench_runs as runs
from mtplx.core import knobs
from mtplx.cli.options import (FiniteFloatRange, distributed_options, force_option, graft_if_needed, json_option, knob,
                               kv_options, load_model, lookup_option, model_option, strict_options, write_json,
                               yes_option)


def _depths(value: str) -> list[int | str]:
    """'0,1,2,auto' -> [0, 1, 2, 'auto']: fixed depths ascending, then auto."""
    from mtplx.bench.runner import depth_order

    items = value.split(",")
    if not all(x.strip() for x in items):  # '0,,2' or a trailing comma: a list typed wrong, not two depths
        raise click.BadParameter(f"{value!r} has an empty item: give depths separated by commas, e.g. 0,1,2,3,auto",
                                 param_hint="'--depths'")
    return sorted({knobs.parse("depth", x, label="--depths") for x in items}, key=depth_order)


# --max-depth is a number of drafts to measure, never "auto".
_FIXED_DEPTH = dataclasses.replace(knobs.KNOBS["depth"], words=())


def _concurrency(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:  # an empty item ('2,,3', a trailing comma) is no integer: refused, not skipped
        streams = sorted({int(x) for x in value.split(",")})
    except ValueError:
        streams = []
    if not streams or streams[0] < 1 or streams[-1] > 256:
        raise click.BadParameter(f"{value!r} is not a list of stream counts: give integers in [1, 256] separated by "
                                 "commas, e.g. 1,2,4,8")
    return streams


def _prefill_chunks(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    from mtplx.core import knobs

    try:
        chunks = sorted({int(x) for x in value.split(",")})
    except ValueError:
        chunks = []
    if not chunks or chunks[0] < 1 or chunks[-1] > knobs.MAX_PREFILL_CHUNK:
        raise click.BadParameter(f"{value!r} is not a list of chunk sizes: give integers in [1, "
                                 f"{knobs.MAX_PREFILL_CHUNK}] separated by commas, e.g. 256,512,1024,2048")
    return chunks


def _max_depth(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is None:  # bench --shape: one depth per --acceptance value
        return None
    value = _FIXED_DEPTH.check(value, label="--max-depth")
    if value < 1:  # tune and bench --shape compare AR with depths 1..N: they need at least one
        raise knobs.KnobError("depth", f"--max-depth must be at least 1, got {value}",
                              fix=f"pass an integer in [1, {knobs.MAX_DEPTH}]")
    return value


def _draft_temperature(value: str | None) -> float | str | None:
    if value is None or value.strip().lower() == "sweep":
        return value and "sweep"
    return knobs.parse("draft_temperature", value, label="--draft-temperature")


def _gain(ctx: click.Context, param: click.Parameter, value: float) -> float:
    import math

    if not math.isfinite(value) or value <= 0:
        raise click.BadParameter(f"must be a positive factor such as 1.02, got {value}")
    return value


def _shape_options(f):
    """`mtplx bench --shape NAME`: a catalog model's real shape with random weights."""
    for opt in reversed([
        click.option("--shape", default=None, metavar="NAME|FILE",
                     help="Measure a catalog model's real shape (e.g. qwen3.5-4b) with random weights instead of --model."),
        click.option("--trunk-bits", type=click.Choice(["4", "8", "16"]), default="4", show_default=True,
                     help="--shape: trunk stored as a 4/8-bit affine g64 artifact, or bf16 (16)."),
        click.option("--layers", type=int, default=None,
                     help="--shape: measure N layers (both kinds) and compose to the full depth."),
        click.option("--prompt-tokens", type=int, default=512, show_default=True, help="--shape: prefill and context length."),
        click.option("--acceptance", default=None, metavar="A1,A2,..",
                     help="--shape: P(draft k accepted) per position; default: the demo head's measured acceptance."),
        click.option("--max-depth", type=int, default=None, callback=_max_depth, help="--shape: deepest depth projected (default: one per --acceptance value)."),
        click.option("--draft-vocab", type=int, default=None,
                     help="--shape: draft vocabulary K measured (default 32768 where the vocabulary is larger; 0 = full)."),
        click.option("--bandwidth-gbs", type=FiniteFloatRange(min=0, min_open=True), default=400.0, show_default=True,
                     help="--shape: memory bandwidth of the memory-bound projection (400: an M3 Max, 40-core GPU)."),
        click.option("--peak-tflops", type=FiniteFloatRange(min=0, min_open=True), default=14.2, show_default=True,
                     help="--shape --concurrency: peak arithmetic of the roofline (14.2: an M3 Max, 40-core GPU, fp16)."),
        click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="--shape: timed calls per component (median)."),
        click.option("--no-measure", is_flag=True,
                     help="--shape: only the memory-bound projections, from the shape's stored bytes and flops "
                          "(nothing is built or timed: seconds at any size)."),
        click.option("--save", "save_dir", default=None, type=click.Path(file_okay=False),
                     help="--shape: also write the random model as an artifact in DIR and run it end to end."),
        click.option("--lookup-acceptance", type=FiniteFloatRange(0, 1), default=None, metavar="A",
                     help="--shape: also project drafts copied from the context, each copied token kept with "
                          "probability A (given the ones before it were); with --lookup-length."),
        click.option("--lookup-length", type=click.IntRange(1, knobs.MAX_LOOKUP), default=None, metavar="K",
                     help="--shape --lookup-acceptance: tokens every step copies (no draft pass; verify of K + 1)."),
    ]):
        f = opt(f)
    return f


def _head_windows(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        out = [int(v) for v in value.split(",")]
    except ValueError:
        out = [-1]
    if not out or min(out) < 0:
        raise click.BadParameter(f"{value!r}: give token counts >= 0 separated by commas (0: the whole prompt)")
    return out


def _context(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    from mtplx.bench.context_sweep import parse_lengths

    return None if value is None else parse_lengths(value)


def _check_workloads(given, shape, strict_greedy) -> None:
    """--agent-trace, --context, --chat-turns and --concurrency are workloads of their own: one
    at a time; and their own options need them."""
    picked = [f for n, f in (("agent_trace", "--agent-trace"), ("context_lengths", "--context"),
                             ("chat_turns", "--chat-turns"), ("concurrency", "--concurrency"),
                             ("workload", "--workload"), ("prefill_lengths", "--prefill")) if given(n)]
    if len(picked) > 1:
        raise click.UsageError(f"{' and '.join(picked)} are separate workloads: pass one of them")
    if given("head_windows") and not given("prefill_lengths"):
        raise click.UsageError("--head-windows goes with --prefill")
    for name, flag in (("turns", "--turns"), ("no_restart", "--no-restart"), ("trace_cache_dir", "--prompt-cache-dir")):
        if given(name) and not given("agent_trace"):
            raise click.UsageError(f"{flag} goes with --agent-trace")
    ours = [f for f in ("--agent-trace", "--context", "--workload", "--prefill") if f in picked]
    if ours and given("distributed"):
        raise click.UsageError(f"{ours[0]} runs in one process; drop --distributed")
    if ours and strict_greedy is not False:
        raise click.UsageError(f"--strict-greedy adds strict columns to the plain bench; drop {ours[0]}")
    if shape is not None and "--agent-trace" in picked:
        raise click.UsageError("--agent-trace replays a session on a model: pass --model, not --shape")
    if shape is not None and "--prefill" in picked:
        raise click.UsageError("--prefill times a model's prompt processing against mlx-lm's: pass --model, not --shape")
    if shape is not None and "--workload" in picked:
        raise click.UsageError("--workload rewrite decodes prompts on a model: pass --model, not --shape")
    if given("lookup") and [f for f in picked if f != "--workload"]:
        raise click.UsageError(f"--lookup goes with the plain bench and --workload rewrite; drop it or {picked[0]}")
    if shape is not None and "--context" in picked:
        for name, flag in (("model_ref", "--model"), ("no_measure", "--no-measure"), ("save_dir", "--save"),
                           ("prompt_tokens", "--prompt-tokens")):
            if given(name):
                raise click.UsageError(f"--shape --context measures at each context length; drop {flag}")


@click.command("bench")
@model_option
@click.option("--depths", default="0,1,2,3,auto", show_default=True,
              help="Depths to compare, in one process: 0 is AR, auto the adaptive depth.")
@click.option("--max-tokens", "-n", type=int, default=256, show_default=True, callback=knob("max_tokens"))
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="One prompt per line (or .jsonl with {\"prompt\": ...}); default: a bundled set.")
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Passes over all prompts and depths.")
@click.option("--temperature", "-t", type=float, default=knobs.DEFAULTS["temperature"], show_default=True,
              callback=knob("temperature"))
@click.option("--top-p", type=float, default=knobs.DEFAULTS["top_p"], show_default=True, callback=knob("top_p"))
@click.option("--top-k", type=int, default=knobs.DEFAULTS["top_k"], show_default=True, callback=knob("top_k"))
@click.option("--draft-temperature", default=None, metavar="X|sweep", callback=lambda c, p, v: _draft_temperature(v),
              help="Temperature the head drafts at (default: the target's). 'sweep' also measures tokens per step "
                   "for draft temperatures 0, T/2 and T at targets 0.6 and 1.0 (what `mtplx tune` saves).")
@click.option("--seed", type=int, default=0, show_default=True, callback=knob("seed"))
@click.option("--no-reference", is_flag=True, help="Skip timing mlx_lm.generate on the same trunk.")
@click.option("--concurrency", default=None, callback=_concurrency, metavar="B1,B2,..",
              help="Streams decoding at once. --model: run them concurrently and compare with one at a time; "
                   "--shape: project B rows per step on the memory-bound device (roofline).")
@click.option("--join-tokens", type=click.IntRange(min=0), default=0, show_default=True,
              help="--model --concurrency: also time the decoding rows' steps while a prompt of N tokens joins "
                   "(0: skip; 4096 took 3.3 of the 5 minutes on the demo, so it is asked for, not assumed).")
@click.option("--prefill-chunk", "prefill_chunks", default=None, callback=_prefill_chunks, metavar="C1,C2,..",
              help="--join-tokens: time the join once per prefill chunk (prompt tokens per step; serve's "
                   "--prefill-chunk): the running rows' worst gap against the joining prompt's prefill.")
@strict_options
@_shape_options
@force_option
@yes_option
@json_option
@distributed_options
@click.option("--chat-turns", type=click.IntRange(min=1), default=None, metavar="N",
              help="Replay an N-turn chat: time to first token and cached tokens per turn, with and without "
                   "the prompt cache (depth: the last of --depths, auto if listed).")
@click.option("--agent-trace", "agent_trace", default=None, metavar="FILE|sample",
              help="Replay a recorded agent session (docs/agent-traces.md) through the prompt cache: per turn, prompt "
                   "and cached tokens, prefill, time to first token, decode tok/s; then again as after a restart. "
                   "'sample' is the shipped trace. Depth: the last of --depths; -n overrides each request's max_tokens.")
@click.option("--turns", type=click.IntRange(min=1), default=None, metavar="N",
              help="--agent-trace: replay only the first N requests.")
@click.option("--no-restart", is_flag=True, help="--agent-trace: skip the second pass (as after a restart).")
@click.option("--prompt-cache-dir", "trace_cache_dir", default=None, metavar="DIR|none",
              help="--agent-trace: the prompt cache's disk tier in DIR ('none': memory only); default: a temporary "
                   "folder, removed afterwards.")
@click.option("--context", "context_lengths", default=None, callback=_context, metavar="L1,L2,..",
              help="Decode after contexts of these lengths (1k = 1024 tokens): tok/s for each of --depths and "
                   "acceptance by draft position, per length; lengths over the model's context are dropped. With "
                   "--shape, each context is prefilled and the step's components timed there.")
@click.option("--prefill", "prefill_lengths", default=None, callback=_context, metavar="L1,L2,..",
              help="Time prompt processing at these lengths (1k = 1024 tokens) to the first token: mtplx with and "
                   "without the head's cache against mlx-lm's generate_step on the same weights, --rounds interleaved.")
@click.option("--head-windows", "head_windows", default=None, callback=_head_windows, metavar="W1,W2,..",
              help="--prefill: also the head's greedy agreement over each length's last 256 tokens with its cache "
                   "started at each window (0: the whole prompt), teacher-forced on the same text.")
@click.option("--workload", type=click.Choice(["rewrite"]), default=None,
              help="rewrite: files and tool results handed back with one change (shipped prompts, or --prompts FILE "
                   "in their JSON shape), each decoded AR, MTP, lookup (depth 0, copies forced) and both; tok/s, "
                   "tokens by source, and how much of the output copied its prompt rather than itself. MTP depth: "
                   "the last of --depths.")
@click.option("--replay", is_flag=True,
              help="--workload rewrite: no decode; replay each prompt's reference reply through lookup over a grid "
                   "of n-gram sizes and copy lengths K, priced memory-bound and by this machine's step costs.")
@lookup_option
@kv_options
@click.pass_context
def bench(ctx, model_ref, depths, max_tokens, prompts_file, rounds, temperature, top_p, top_k, draft_temperature, seed,
          strict_greedy, no_reference, concurrency, join_tokens, prefill_chunks, shape, trunk_bits, layers, prompt_tokens, acceptance, max_depth,
          draft_vocab, bandwidth_gbs, peak_tflops, repeats, no_measure, save_dir, lookup_acceptance, lookup_length, force, json_out, distributed, chat_turns,
          yes, agent_trace, turns, no_restart, trace_cache_dir, context_lengths, prefill_lengths, head_windows, workload, lookup,
          kv_bits, kv_group_size, replay):
    """Compare AR and each MTP depth in one process: tokens/s, acceptance, cost model.

    With --shape, measure a real model shape instead: random weights at the catalog model's text
    config, every component of a step timed through the engine, composed to the full depth, and
    the speedup projected per depth for this machine and for a memory-bound device.

    With --chat-turns N, replay an N-turn conversation and compare time to first token per turn
    with and without the prompt cache.

    With --agent-trace FILE, replay a recorded coding-agent session through the prompt cache
    (docs/agent-traces.md); with --context 1k,8k,32k, decode after contexts of those lengths.

    With --distributed (under mlx.launch), each rank holds part of the trunk; the report adds
    each rank's memory and splits the time per step into each rank's compute and communication."""
    given = lambda name: ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE  # noqa: E731
    if strict_greedy is not False:
        if shape is not None or concurrency is not None or chat_turns is not None:
            raise click.UsageError("--strict-greedy adds strict columns to the plain bench; drop --shape, "
                                   "--concurrency or --chat-turns")
        if temperature != 0:
            raise click.UsageError("--strict-greedy changes nothing at temperature > 0: add --temperature 0")
    _check_workloads(given, shape, strict_greedy)
    if replay and workload != "rewrite":
        raise click.UsageError("--replay goes with --workload rewrite")
    if (given("kv_bits") or given("kv_group_size")) and any(given(n) for n in (
            "shape", "concurrency", "chat_turns", "agent_trace", "context_lengths", "workload", "prefill_lengths")):
        raise click.UsageError("--kv-bits applies to the depth comparison (--model, --depths); drop it or the "
                               "other workload's flag")
    if given("lookup") and shape is not None:
        raise click.UsageError("--lookup copies drafts in a model's runs; --shape measures no runs: project copies "
                               "with --lookup-acceptance A --lookup-length K")
    copies = None if lookup_length is None and lookup_acceptance is None else (lookup_acceptance, lookup_length)
    if copies and (None in copies or shape is None or context_lengths is not None):
        raise click.UsageError("--lookup-acceptance and --lookup-length go together, with --shape (not --context)")
    if shape is not None and context_lengths is not None:
        runs.shape_context(shape, context_lengths, trunk_bits, layers, acceptance, max_depth, draft_vocab,
                           bandwidth_gbs, repeats, seed, json_out)
        return
    if shape is not None:
        for name, flag in (("model_ref", "--model"), ("chat_turns", "--chat-turns"), ("distributed", "--distributed")):
            if given(name):
                raise click.UsageError(f"pass either {flag} or --shape, not both")
        if no_measure:
            for name, flag in (("layers", "--layers"), ("save_dir", "--save"), ("repeats", "--repeats")):
                if given(name):
                    raise click.UsageError(f"--no-measure times nothing; drop {flag}")
            runs.project_shape(shape, trunk_bits, prompt_tokens, acceptance, max_depth, draft_vocab, bandwidth_gbs,
                           peak_tflops, concurrency, _depths(depths) if given("depths") else None, json_out, copies)
            return
        runs.shape(shape, trunk_bits, layers, prompt_tokens, acceptance, max_depth, draft_vocab, bandwidth_gbs,
                   repeats, save_dir, seed, json_out, concurrency, _depths(depths) if given("depths") else None,
                   peak_tflops, copies)
        return
    if concurrency is not None:
        for name, flag in (("chat_turns", "--chat-turns"), ("distributed", "--distributed")):
            if given(name):
                raise click.UsageError(f"--concurrency decodes several streams in one process; drop {flag}")
        runs.concurrency(model_ref, concurrency, _depths(depths), max_tokens, prompts_file, temperature, top_p, top_k,
                         draft_temperature, seed, force, json_out, join_tokens, prefill_chunks, not no_reference,
                         rounds)
        return
    model_ref = graft_if_needed(model_ref, yes)
    if prefill_lengths is not None:
        runs.prefill(model_ref, prefill_lengths, rounds, (prefill_chunks or [None])[0], head_windows, force, json_out)
        return
    if workload == "rewrite" and replay:
        runs.replay(model_ref, prompts_file, force, json_out)
        return
    if workload == "rewrite":
        runs.rewrite(model_ref, prompts_file, _depths(depths)[-1], lookup, max_tokens, temperature, top_p, top_k, seed,
                     force, json_out)
        return
    if agent_trace is not None:
        runs.agent_trace(model_ref, agent_trace, turns, _depths(depths)[-1], temperature, seed,
                         max_tokens if given("max_tokens") else None, not no_restart, trace_cache_dir, force, json_out)
        return
    if context_lengths is not None:
        runs.context(model_ref, context_lengths, _depths(depths), max_tokens, temperature, seed, rounds, force,
                     json_out)
        return
    if chat_turns is not None:
        if distributed is not None:
            raise click.UsageError("--chat-turns measures the prompt cache, which --distributed turns off")
        listed = _depths(depths)
        runs.chat_turns(model_ref, chat_turns, listed[-1], max_tokens if given("max_tokens") else 48,
                        seed, force, json_out)
        return
    from mtplx.bench.default_prompts import DEFAULT_PROMPTS, read_prompts
    from mtplx.bench.runner import run_bench
    from mtplx.engine.sampling import SamplingParams
    from mtplx.engine.strict import check as strict_check

    depth_list = _depths(depths)
    model, tokenizer = load_model(model_ref, mtp=depth_list != [0], force=force, distributed=distributed)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    sweep = draft_temperature == "sweep"
    draft = (SamplingParams(temperature=draft_temperature, top_p=top_p, top_k=top_k)
             if draft_temperature is not None and not sweep else None)
    prompts = read_prompts(prompts_file) if prompts_file else DEFAULT_PROMPTS
    timer = None
    if distributed is not None:  # the cost model and mlx_lm's generate would need every rank
        from mtplx.distributed.bench import PipelineTimer

        timer = PipelineTimer(model)
    report = run_bench(model, tokenizer, prompts, depth_list, max_tokens, params, draft, rounds=rounds, seed=seed,
                       cost_model=timer is None, reference=not no_reference and timer is None,
                       progress=lambda s: click.echo(s, err=True), model_name=model_ref, around_run=timer,
                       strict_margin=strict_check(strict_greedy, model), lookup=lookup, kv_bits=kv_bits,
                       kv_group_size=kv_group_size)
    kv = "" if kv_bits is None else f", kv_bits {kv_bits} (group {kv_group_size})"
    click.echo(f"mtplx bench: {model_ref} on {report.device}; {len(prompts)} prompts x {rounds} round(s), "
               f"{max_tokens} tokens, temperature {temperature}, top_p {top_p}, top_k {top_k}, lookup {lookup}{kv}")
    click.echo(report.table())
    for line in report.verdicts():
        click.echo(line)
    if report.strict:
        click.echo(report.strict_table())
    data = report.as_dict()
    if sweep:
        from mtplx.api import encode_prompt
        from mtplx.bench.draft_law import measure_draft_law

        fixed = [d for d in depth_list if isinstance(d, int) and d > 0]
        law = measure_draft_law(model, [encode_prompt(tokenizer, p) for p in prompts], max(fixed or [2]), max_tokens,
                                top_p, top_k, seed, progress=lambda s: click.echo(s, err=True))
        click.echo("")
        click.echo(law.table())
        data["draft_law"] = law.as_dict()
    if timer is not None:
        click.echo(f"\n{len(timer.ranks)} ranks, pipeline split (rank 0: last layers, lm_head, MTP head)")
        click.echo(timer.table(report))
        data["distributed"] = timer.as_dict(report)
    write_json(data, json_out)


def tuned_choice(report, best: int, min_gain: float) -> tuple[int | str, float, str]:
    """The depth tune saves, its median gain over auto, and why auto stays when it does.

    A fixed depth is saved only if it beats auto by --min-gain and in every paired run (same
    prompt, round and seed): a median gain the runs' spread covers is noise, and pinning on
    noise is what saved plain AR while auto itself was running depth 0 throughout."""
    auto = report.results[knobs.AUTO]
    gain = report.results[best].median_tps / auto.median_tps if auto.median_tps else float("inf")
    mix = auto.depth_mix
    if mix and max(mix) == 1.0 and mix.index(1.0) == best:
        return knobs.AUTO, gain, f"is what auto already ran at every step here ({auto.mix_text})"
    if gain < min_gain:
        return knobs.AUTO, gain, f"is {gain:.2f}x auto, not the {min_gain:.2f}x --min-gain asks"
    if not report.beats(best, knobs.AUTO):
        ratios = report.ratios(best, knobs.AUTO)
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}x" if ratios else "-"
        return knobs.AUTO, gain, (f"is {gain:.2f}x auto, within the runs' spread ({spread} run by run; "
                                  "more --rounds narrow it)")
    return best, gain, ""


@click.command("tune")
@model_option
@click.option("--max-depth", type=int, default=3, show_default=True, callback=_max_depth,
              help="Deepest depth measured (and the deepest depth auto may use on this machine).")
@click.option("--max-tokens", "-n", type=int, default=128, show_default=True, callback=knob("max_tokens"))
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--min-gain", type=float, default=1.02, show_default=True, callback=_gain,
              help="A fixed depth is pinned instead of auto only if it beats auto by at least this factor.")
@force_option
@yes_option
@json_option
def tune(model_ref, max_depth, max_tokens, rounds, min_gain, force, json_out, yes):
    """Measure this machine for this model and save what depth auto and the draft law need.

    Saves, in the user's config: the step costs (verify passes at T = 1..max-depth+1, a draft
    step) that depth auto decides with; the draft temperature that yields the most tokens per
    step at target temperatures 0.6 and 1.0; and the default depth: auto, unless a fixed depth
    beats it here by --min-gain (then that depth, 0 meaning plain AR)."""
    import mtplx
    from mtplx.api import encode_prompt
    from mtplx.engine.cost_model import measure_step_costs
    from mtplx.bench.draft_law import measure_draft_law
    from mtplx.bench.default_prompts import DEFAULT_PROMPTS
    from mtplx.bench.runner import run_bench
    from mtplx.core.clock import now
    from mtplx.core.config import save_tuned
    from mtplx.engine.sampling import SamplingParams
    from mtplx.generation.speculation import save_step_costs

    model, tokenizer = mtplx.load(graft_if_needed(model_ref, yes), force=force)
    if not model.has_mtp:
        raise click.ClickException("this model has no MTP head: there is nothing to tune")
    d = {**knobs.DEFAULTS, **model.contract.defaults}
    params = SamplingParams(temperature=d["temperature"], top_p=d["top_p"], top_k=d["top_k"])
    click.echo(f"Measuring step costs (verify T = 1..{max_depth + 1}, one draft step) ...", err=True)
    save_step_costs(model, measure_step_costs(model, max_depth, rounds=7), "tune")
    prompts = DEFAULT_PROMPTS[:2]
    law = measure_draft_law(model, [encode_prompt(tokenizer, p) for p in prompts], max_depth, max_tokens,
                            params.top_p, params.top_k, progress=lambda s: click.echo(s, err=True))
    draft_temps = {f"{t:g}": dt for t, dt in law.best().items()}
    save_tuned(model, {"draft_temperature": draft_temps})  # auto's bench below drafts with it
    depths = [*range(0, max_depth + 1), knobs.AUTO]
    report = run_bench(model, tokenizer, prompts, depths, max_tokens, params, rounds=rounds,
                       cost_model=False, reference=False, progress=lambda s: click.echo(s, err=True),
                       model_name=model_ref)
    click.echo(report.table())
    click.echo(law.table())
    best = report.best_fixed()
    chosen, gain, why = tuned_choice(report, best, min_gain)
    record = {"depth": chosen, "best_fixed_depth": best, "speedup": round(report.speedup(best), 4),
              "auto_speedup": round(report.speedup(knobs.AUTO), 4), "draft_temperature": draft_temps,
              "measured_at": now(), "device": report.device, "max_tokens": max_tokens}
    path = save_tuned(model, record)
    mix = report.results[knobs.AUTO].mix_text
    if chosen == knobs.AUTO:
        click.echo(f"Saved depth auto for {model_ref} in {path}: {report.speedup(knobs.AUTO):.2f}x AR here ({mix}); "
                   f"the best fixed depth ({best}) {why}.")
    else:
        click.echo(f"Saved depth {best} for {model_ref} in {path}: {gain:.2f}x depth auto here "
                   f"({'plain AR' if best == 0 else f'{report.speedup(best):.2f}x AR'}).")
    pairs = ", ".join(f"{t} -> {dt:g}" for t, dt in draft_temps.items())
    click.echo(f"Saved the draft temperature per target temperature ({pairs}) and this machine's step costs.")
    write_json({"tuned": record, "bench": report.as_dict(), "draft_law": law.as_dict()}, json_out)


COMMANDS = [bench, tune]
