"""`mtplx inspect`, `mtplx models`, `mtplx rm` (`mtplx doctor` is in doctor_cmd.py)."""

from __future__ import annotations

import sys

import click

from mtplx.cli.options import json_option, write_json


@click.command("inspect")
@click.argument("ref")
@json_option
def inspect_cmd(ref, json_out):
    """Say whether REF can run, and how, before any weights load."""
    from mtplx.artifact.inspect import inspect_ref

    info = inspect_ref(ref)
    if json_out != "-":
        a = info.architecture
        click.echo(f"{ref}  ({info.path or 'from the catalog; nothing downloaded'})")
        click.echo(f"  kind:          {info.kind}")
        click.echo(f"  architecture:  {a.get('model_type')}  hidden {a.get('hidden_size')}  layers {a.get('num_hidden_layers')}"
                   f"  vocab {a.get('vocab_size')}" + (f"  experts {a['num_experts']}" if a.get("num_experts") else ""))
        click.echo(f"  MTP head:      {'present' if info.mtp_head else 'absent'}")
        if info.contract_valid is not None:
            click.echo(f"  contract:      {'valid' if info.contract_valid else 'INVALID: ' + (info.contract_error or '')}")
        for note in info.inferred:
            click.echo(f"  inferred:      {note}")
        click.echo(f"  weights:       {info.weights_bytes / 2**20:.1f} MiB (machine offers {info.memory_bytes / 2**30:.1f} GiB)")
        for line in info.memory_lines():
            click.echo(line)
        click.echo(f"  verdict:       {info.verdict}")
    write_json(info.as_dict(), json_out)
    if not (info.can_run_ar or info.can_run_mtp or info.kind in ("hf-checkpoint", "catalog")):
        sys.exit(1)


@click.command("models")
@click.option("--catalog", "catalog_only", is_flag=True,
              help="Only the catalog (every id --model takes, with its architecture), read offline.")
@json_option
def models_cmd(catalog_only, json_out):
    """List the bundled demo, the catalog, the artifacts grafted into the mtplx cache (MTPLX_CACHE,
    default ~/.cache/mtplx) and models in the local Hugging Face cache."""
    from mtplx.artifact.models import catalog_models, list_models

    if catalog_only:
        entries = catalog_models()
        if json_out != "-":
            click.echo(f"{'id':<20} {'architecture':<13} {'layers':>6} {'hidden':>6} {'memory':>8}  title")
            for e in entries:
                memory = f"{e['memory_gb']} GB" if e.get("memory_gb") else "-"
                click.echo(f"{e['id']:<20} {e['model_type']:<13} {e.get('layers') or '-':>6} "
                           f"{e.get('hidden_size') or '-':>6} {memory:>8}  {e['title']}")
        write_json(entries, json_out)
        return
    entries = list_models()
    if json_out != "-":
        click.echo(f"{'ref':<44} {'where':<12} {'size':>10}  description")
        for e in entries:
            size = f"{e['size_bytes'] / 2**20:.1f} MiB" if e.get("size_bytes") else "-"
            click.echo(f"{e['ref']:<44} {e['where']:<12} {size:>10}  {e['title']}")
    write_json(entries, json_out)


@click.command("rm")
@click.argument("ref")
@json_option
def rm_cmd(ref, json_out):
    """Remove an artifact from the mtplx cache (REF: a name `mtplx models` lists, a catalog id or a repo id)."""
    from mtplx.artifact.store import remove_artifact

    path, size = remove_artifact(ref)
    if json_out != "-":
        click.echo(f"Removed {path} ({size / 2**20:.1f} MiB freed)")
    write_json({"removed": str(path), "size_bytes": size}, json_out)


COMMANDS = [inspect_cmd, models_cmd, rm_cmd]
