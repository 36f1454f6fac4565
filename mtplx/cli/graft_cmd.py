"""`mtplx graft`: build an artifact from an official checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from mtplx.cli.options import json_option, write_json


@click.command("graft")
@click.option("--source", required=True,
              help="Original HF checkpoint (with mtp.* tensors): a directory or a repo id ORG/NAME[@REVISION]. "
                   "With --trunk, only the head's bytes are fetched from a repo id.")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Artifact directory to create (default: the mtplx cache, where `mtplx models` lists it).")
@click.option("--trunk", default=None,
              help="An MLX conversion of the same checkpoint: a directory or a repo id ORG/NAME[@REVISION] "
                   "(default: convert the source, which then comes whole).")
@click.option("--trunk-bits", type=click.Choice(["4", "8", "16"]), default="4", show_default=True,
              help="Trunk quantization when converting: 4/8-bit affine g64, or 16 (bf16).")
@click.option("--probe", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Text to measure acceptance on (default: a bundled probe).")
@click.option("--hidden-source", type=click.Choice(["post_norm", "pre_norm"]), default=None,
              help="Override the measured choice of trunk hidden fed to the head.")
@click.option("--draft-vocab", type=int, default=None,
              help="Draft from K token ids only (default 32768 where the vocabulary is larger, else the full "
                   "vocabulary; 0 keeps the full head). Exact: only speed and acceptance change.")
@click.option("--vocab-text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Rank the draft vocabulary by token frequency on this text (default: the tokenizer's merge order).")
@click.option("--depth", type=int, default=2, show_default=True, help="Default depth written into the contract.")
@click.option("--name", default=None, help="Display name recorded in the contract.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out directory.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output, only the report.")
@json_option
def graft(source, out, trunk, trunk_bits, probe, hidden_source, draft_vocab, vocab_text, depth, name, overwrite,
          quiet, json_out):
    """Graft the official MTP head onto an MLX trunk and write mtplx_runtime.json."""
    from mtplx.artifact.graft import graft as do_graft
    from mtplx.artifact.paths import artifact_name, artifacts_dir
    from mtplx.artifact.progress import Progress

    out = out or str(artifacts_dir() / artifact_name(source.rstrip("/").split("/")[-1] if Path(source).exists() else source))
    probe_text = Path(probe).read_text(encoding="utf-8") if probe else None
    text = Path(vocab_text).read_text(encoding="utf-8") if vocab_text else None
    progress = Progress("quiet" if quiet else "auto")
    progress.phase(f"Grafting {source} -> {out} (trunk {'from ' + trunk if trunk else trunk_bits + '-bit, converted'})")
    report = do_graft(source, out, trunk=trunk, trunk_bits=int(trunk_bits), probe_text=probe_text,
                      hidden_source=hidden_source, depth=depth, name=name, overwrite=overwrite,
                      draft_vocab=draft_vocab, vocab_text=text, progress=progress)
    if json_out != "-":
        print_report(report)
    write_json(report.as_dict(), json_out)


def print_report(report) -> None:
    c = report.contract
    q = c["sidecar"]["quantization"]
    click.echo(f"Artifact: {report.artifact}  ({report.seconds:.1f} s)")
    click.echo(f"  trunk: {c['trunk']['quantization']}  {report.sizes['trunk'] / 1e6:.1f} MB")
    click.echo(f"  sidecar: {c['sidecar']['path']}  {report.sizes['sidecar'] / 1e6:.2f} MB, {q['scheme']}: "
               f"{len(q['quantized'])} linears int4 g{q['group_size']}, {len(q['unquantized'])} tensors bf16")
    for t in report.tensors:
        click.echo(f"    {t['name']:<56} {t['dtype']:<9} {t['shape']}")
    m = c["measured"]
    sampler = ", ".join(f"{k} {v:g}" for k, v in m["sampler"].items())
    click.echo(f"  acceptance on the probe ({m['probe_tokens']} tokens; {sampler}):")
    for conv, a in m["acceptance"].items():
        mark = "  <- chosen" if conv == c["conventions"]["hidden_source"] else ""
        click.echo(f"    hidden_source={conv:<9} greedy agreement {a['greedy_agreement']:.3f} "
                   f"(on the trunk's argmax path {a['greedy_agreement_argmax_context']:.3f})  "
                   f"expected acceptance {a['expected_acceptance']:.3f}{mark}")
    click.echo(f"  hidden_source {c['conventions']['hidden_source']} (chosen by {m['hidden_source_chosen_by']})")
    vocab = c["sidecar"].get("draft_vocab")
    if vocab:
        full, reduced = vocab["acceptance"]["full"], vocab["acceptance"]["reduced"]
        click.echo(f"  draft vocabulary: {vocab['size']} of {c['architecture']['vocab_size']} token ids "
                   f"({vocab['chosen_by'].replace('_', ' ')}, {vocab['special_tokens']} special tokens included)")
        click.echo(f"    full head     greedy agreement {full['greedy_agreement']:.3f}  "
                   f"expected acceptance {full['expected_acceptance']:.3f}")
        click.echo(f"    reduced head  greedy agreement {reduced['greedy_agreement']:.3f}  "
                   f"expected acceptance {reduced['expected_acceptance']:.3f}")
    else:
        click.echo(f"  draft vocabulary: the full {c['architecture']['vocab_size']} token ids")


COMMANDS = [graft]
