"""What each `mtplx bench` workload runs once its flags are checked (mtplx/cli/bench_cmd.py parses
and checks them): load the model, run the workload from mtplx/bench/, print its table, write its
JSON."""

from __future__ import annotations

import click

from mtplx.cli.options import load_model, write_json


def shape(shape, trunk_bits, layers, prompt_tokens, acceptance, max_depth, draft_vocab, bandwidth_gbs, repeats,
               save_dir, seed, json_out, concurrency=None, batch_depths=None, peak_tflops=14.2, copies=None) -> None:
    from mtplx.bench.shape_bench import parse_acceptance, run_shape_bench

    report = run_shape_bench(shape, trunk_bits=int(trunk_bits), layers=layers, prompt_tokens=prompt_tokens,
                             acceptance=parse_acceptance(acceptance) if acceptance else None, max_depth=max_depth,
                             draft_vocab=draft_vocab, bandwidth_gbs=bandwidth_gbs, repeats=repeats, seed=seed,
                             save=save_dir, progress=lambda s: click.echo(s, err=True), concurrency=concurrency,
                             batch_depths=batch_depths, peak_tflops=peak_tflops)
    data = report.as_dict()
    click.echo(f"mtplx bench --shape {report.shape.name}: {data['trunk_bits']}-bit trunk, random weights, "
               f"{data['layers_measured']} of {data['layers_full']} layers measured on {report.device}")
    click.echo(report.table())
    if report.end_to_end:
        e = report.end_to_end
        click.echo(f"end to end at depth 2 ({e['artifact']}): {e['step_ms']:.1f} ms per step against "
                   f"{e['components_ms']:.1f} ms from the components ({e['ratio']:.3f}x, "
                   f"{'within' if e['within_10_percent'] else 'NOT within'} 10%)")
    if copies:
        from mtplx.bench.rewrite import lookup_line, shape_lookup

        data["lookup_projection"] = shape_lookup(*copies, bandwidth_gbs, report=report)
        click.echo(lookup_line(data["lookup_projection"]))
    write_json(data, json_out)


def project_shape(shape, trunk_bits, prompt_tokens, acceptance, max_depth, draft_vocab, bandwidth_gbs, peak_tflops,
                   concurrency, batch_depths, json_out, copies=None) -> None:
    from mtplx.bench.roofline import table
    from mtplx.bench.shape_bench import parse_acceptance, project_shape

    data = project_shape(shape, trunk_bits=int(trunk_bits), prompt_tokens=prompt_tokens,
                         acceptance=parse_acceptance(acceptance) if acceptance else None, max_depth=max_depth,
                         draft_vocab=draft_vocab, bandwidth_gbs=bandwidth_gbs, peak_tflops=peak_tflops,
                         concurrency=concurrency, batch_depths=batch_depths)
    click.echo(f"mtplx bench --shape {data['shape']} --no-measure: {data['trunk_bits']}-bit trunk, "
               f"{data['weight_bytes'] / 1e9:.2f} GB of trunk weights, context {prompt_tokens}, acceptance "
               f"{', '.join(f'{a:g}' for a in data['acceptance'])} ({data['acceptance_source']})")
    for d, x in data["projection_memory_bound"].items():
        click.echo(f"depth {d}: {x:.2f}x one AR stream at {bandwidth_gbs:g} GB/s (memory-bound, one stream)")
    if data.get("batch_roofline"):
        click.echo(table(data["batch_roofline"]))
    if copies:
        from mtplx.bench.rewrite import lookup_line, shape_lookup

        data["lookup_projection"] = shape_lookup(*copies, bandwidth_gbs, shape_ref=shape, trunk_bits=int(trunk_bits),
                                                 prompt_tokens=prompt_tokens, draft_vocab=draft_vocab)
        click.echo(lookup_line(data["lookup_projection"]))
    write_json(data, json_out)


def concurrency(model_ref, streams, depths, max_tokens, prompts_file, temperature, top_p, top_k,
                     draft_temperature, seed, force, json_out, join_tokens=4096, prefill_chunks=None,
                     reference=True, rounds=1) -> None:
    from mtplx.bench.concurrency import run_concurrency, table
    from mtplx.bench.default_prompts import DEFAULT_PROMPTS, read_prompts
    from mtplx.core.device import device_name
    from mtplx.engine.sampling import SamplingParams

    model, tokenizer = load_model(model_ref, mtp=max(depths) > 0, force=force, distributed=None)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    draft = SamplingParams(temperature=draft_temperature, top_p=top_p, top_k=top_k) if draft_temperature is not None else None
    prompts = read_prompts(prompts_file) if prompts_file else DEFAULT_PROMPTS
    report = run_concurrency(model, tokenizer, prompts, streams, depths, max_tokens, params, draft, seed,
                             progress=lambda s: click.echo(s, err=True), join_tokens=join_tokens,
                             prefill_chunks=prefill_chunks, reference=reference, rounds=rounds)
    click.echo(f"mtplx bench --concurrency: {model_ref} on {device_name()}; B requests arriving together, "
               f"{max_tokens} tokens each, temperature {temperature}; batched (one BatchDecoder) against one at a time")
    click.echo(table(report))
    write_json({"model": model_ref, "device": device_name(), "concurrency": report}, json_out)


def chat_turns(model_ref, turns, depth, max_tokens, seed, force, json_out) -> None:
    from mtplx.bench.chat_turns import run_chat_turns

    model, tokenizer = load_model(model_ref, mtp=depth != 0, force=force, distributed=None)
    report = run_chat_turns(model, tokenizer, turns, depth=depth, max_tokens=max_tokens, seed=seed,
                            progress=lambda s: click.echo(s, err=True))
    click.echo(f"mtplx bench --chat-turns {turns}: {model_ref}, depth {depth}, greedy, {max_tokens}-token replies; "
               f"time to first token with the prompt cache against a cold prefill of the same prompt")
    click.echo(report.table())
    click.echo(report.verdict())
    write_json({"model": model_ref, "chat_turns": report.as_dict()}, json_out)


def agent_trace(model_ref, trace_ref, turns, depth, temperature, seed, max_tokens, restart, disk_dir, force,
                     json_out) -> None:
    import tempfile

    from mtplx.bench.agent_trace import load_trace, replay

    trace = load_trace(trace_ref)  # a bad file is refused before the model loads
    model, tokenizer = load_model(model_ref, mtp=depth != 0, force=force, distributed=None)
    off = disk_dir is not None and disk_dir.strip().lower() == "none"
    # By default the disk tier lives in a folder of the bench's own, removed afterwards: the user's
    # prompt-cache folder neither warms the first pass nor receives the replay's files.
    with tempfile.TemporaryDirectory(prefix="mtplx-agent-trace-") as tmp:
        folder = None if off else disk_dir or tmp
        report = replay(model, tokenizer, trace, turns=turns, depth=depth, temperature=temperature, seed=seed,
                        max_tokens=max_tokens, restart=restart, disk_dir=folder,
                        progress=lambda s: click.echo(s, err=True))
    replies = f"{max_tokens}-token replies" if max_tokens else "each request's max_tokens"
    click.echo(f"mtplx bench --agent-trace {trace.name}: {model_ref} (context {model.max_context}), "
               f"{len(trace.requests[:turns])} of {len(trace.requests)} requests, depth {depth}, temperature "
               f"{temperature}, {replies}; system turn {report.system_tokens} tokens; through the prompt cache as "
               "the server serves them")
    click.echo(report.table())
    write_json({"model": model_ref, "agent_trace": report.as_dict()}, json_out)


def context(model_ref, lengths, depths, max_tokens, temperature, seed, rounds, force, json_out) -> None:
    from mtplx.bench.context_sweep import run_context_sweep

    model, tokenizer = load_model(model_ref, mtp=depths != [0], force=force, distributed=None)
    report = run_context_sweep(model, tokenizer, lengths, depths, max_tokens=max_tokens, temperature=temperature,
                               seed=seed, rounds=rounds, model_name=model_ref, progress=lambda s: click.echo(s, err=True))
    click.echo(f"mtplx bench --context: {model_ref} on {report.device} (context {model.max_context}); {max_tokens} "
               f"tokens decoded after each context, temperature {temperature}")
    click.echo(report.table())
    write_json({"model": model_ref, "context": report.as_dict()}, json_out)


def shape_context(shape, lengths, trunk_bits, layers, acceptance, max_depth, draft_vocab, bandwidth_gbs, repeats,
                       seed, json_out) -> None:
    from mtplx.bench.context_sweep import run_shape_context_sweep
    from mtplx.bench.shape_bench import parse_acceptance

    report = run_shape_context_sweep(shape, lengths, trunk_bits=int(trunk_bits), layers=layers,
                                     acceptance=parse_acceptance(acceptance) if acceptance else None,
                                     max_depth=max_depth, draft_vocab=draft_vocab, bandwidth_gbs=bandwidth_gbs,
                                     repeats=repeats, seed=seed, progress=lambda s: click.echo(s, err=True))
    click.echo(f"mtplx bench --shape {report.model} --context: {trunk_bits}-bit trunk, random weights, on "
               f"{report.device}; each context prefilled, a step's components timed there and composed")
    click.echo(report.table())
    write_json({"shape": report.model, "context": report.as_dict()}, json_out)


def rewrite(model_ref, prompts_file, depth, lookup, max_tokens, temperature, top_p, top_k, seed, force,
                 json_out) -> None:
    from mtplx.bench.rewrite import load_prompts, run_rewrite, ways
    from mtplx.engine.sampling import SamplingParams

    ways(lookup, True, depth)  # a bad file, --lookup 0 or depth 0 are refused before the model loads
    prompts = load_prompts(prompts_file)
    model, tokenizer = load_model(model_ref, mtp=True, force=force, distributed=None)
    report = run_rewrite(model, tokenizer, prompts, max_tokens=max_tokens, lookup=lookup, depth=depth, seed=seed,
                         params=SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k),
                         model_name=model_ref, progress=lambda s: click.echo(s, err=True))
    click.echo(report.header())
    click.echo(report.table())
    for line in report.verdicts():
        click.echo(line)
    write_json({"model": model_ref, "rewrite": report.as_dict()}, json_out)


def replay(model_ref, prompts_file, force, json_out) -> None:
    from mtplx.bench.lookup_replay import cases, run_grid
    from mtplx.generation.speculation import step_costs

    model, tokenizer = load_model(model_ref, mtp=True, force=force, distributed=None)
    found = cases(tokenizer, prompts_file)  # a file without references is refused before the costs are timed
    costs = step_costs(model, progress=lambda s: click.echo(s, err=True)) if model.has_mtp else None
    report = run_grid(found, costs=costs, tokenizer_name=model_ref, progress=lambda s: click.echo(s, err=True))
    click.echo(report.table())
    for line in report.summary():
        click.echo(line)
    write_json({"model": model_ref, "replay": report.as_dict()}, json_out)


def prefill(model_ref, lengths, rounds, chunk, windows, force, json_out) -> None:
    from mtplx.bench.prefill import run_prefill

    model, tokenizer = load_model(model_ref, mtp=True, force=force, distributed=None)
    report = run_prefill(model, tokenizer, lengths, rounds=rounds, chunk=chunk, windows=windows, model_name=model_ref,
                         progress=lambda s: click.echo(s, err=True))
    click.echo(f"mtplx bench --prefill: {model_ref} on {report.device} (context {model.max_context})")
    click.echo(report.table())
    write_json({"model": model_ref, "prefill": report.as_dict()}, json_out)
