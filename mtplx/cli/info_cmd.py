"""`mtplx inspect`, `mtplx models`, `mtplx doctor`."""

from __future__ import annotations

import platform
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
        click.echo(f"{ref}  ({info.path})")
        click.echo(f"  kind:          {info.kind}")
        click.echo(f"  architecture:  {a.get('model_type')}  hidden {a.get('hidden_size')}  layers {a.get('num_hidden_layers')}"
                   f"  vocab {a.get('vocab_size')}" + (f"  experts {a['num_experts']}" if a.get("num_experts") else ""))
        click.echo(f"  MTP head:      {'present' if info.mtp_head else 'absent'}")
        if info.contract_valid is not None:
            click.echo(f"  contract:      {'valid' if info.contract_valid else 'INVALID: ' + (info.contract_error or '')}")
        for note in info.inferred:
            click.echo(f"  inferred:      {note}")
        click.echo(f"  weights:       {info.weights_bytes / 2**20:.1f} MiB (machine offers {info.memory_bytes / 2**30:.1f} GiB)")
        click.echo(f"  verdict:       {info.verdict}")
    write_json(info.as_dict(), json_out)
    if not (info.can_run_ar or info.can_run_mtp or info.kind == "hf-checkpoint"):
        sys.exit(1)


@click.command("models")
@json_option
def models_cmd(json_out):
    """List the bundled demo, the catalog, the artifacts grafted into the mtplx cache (MTPLX_CACHE,
    default ~/.cache/mtplx) and models in the local Hugging Face cache."""
    from mtplx.models import list_models

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


@click.command("doctor")
@json_option
def doctor_cmd(json_out):
    """Check the installation: MLX backend and device, versions, caches."""
    import importlib.metadata as md
    import os

    import mlx.core as mx

    from mtplx._version import __version__
    from mtplx.artifact.inspect import machine_memory_bytes
    from mtplx.artifact.paths import cache_root
    from mtplx.config import config_path
    from mtplx.kernels import backend

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    checks = {}
    try:
        x = mx.ones((64, 64)) @ mx.ones((64, 64))
        mx.eval(x)
        checks["device_compute"] = bool(x[0, 0].item() == 64)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        checks["device_compute"] = f"failed: {e}"
    cuda = getattr(mx, "cuda", None)
    report = {
        "mtplx": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "mlx": version("mlx"),
        "mlx_lm": version("mlx-lm"),
        "transformers": version("transformers"),
        "huggingface_hub": version("huggingface_hub"),
        "default_device": str(mx.default_device()),
        "metal_available": bool(mx.metal.is_available()),
        "cuda_available": bool(cuda and cuda.is_available()),
        "kernel_backend": backend(),
        "memory_gib": round(machine_memory_bytes() / 2**30, 1),
        "hf_home": os.environ.get("HF_HOME", "~/.cache/huggingface"),
        "mtplx_cache": str(cache_root()),
        "hf_offline": os.environ.get("HF_HUB_OFFLINE", "0"),
        "config": str(config_path()),
        **checks,
    }
    healthy = report["device_compute"] is True and report["mlx"] and report["mlx_lm"]
    if json_out != "-":
        for k, v in report.items():
            click.echo(f"{k:<18} {v}")
        click.echo("status             " + ("ok" if healthy else "PROBLEM: see above"))
        if report["kernel_backend"] == "cpu":
            click.echo("note               MLX runs on the CPU here: 4-bit verify costs about T decode steps, so MTP "
                       "rarely wins; `mtplx bench` shows the cost model.")
    write_json(report, json_out)
    if not healthy:
        sys.exit(1)


COMMANDS = [inspect_cmd, models_cmd, rm_cmd, doctor_cmd]
