"""`mtplx doctor`: the installation check, and with --exactness the exactness check on this
machine's backend (mtplx/bench/exactness.py)."""

from __future__ import annotations

import platform
import sys

import click

from mtplx.cli.options import force_option, json_option, write_json


@click.command("doctor")
@click.option("--exactness", is_flag=True,
              help="Measure on this machine whether greedy MTP equals greedy AR (AR vs MTP depths 1-3, with and "
                   "without a prompt cache), how a T-row verify rounds against T decode steps, and whether the "
                   "sampled law of MTP matches AR's. Exit 1 on a divergence that is not a near-tie.")
@click.option("--model", "-m", "model_ref", default="demo", show_default=True,
              help="With --exactness: the artifact to check ('demo', a directory, a catalog id or a repo id).")
@click.option("--tokens", type=click.IntRange(1, 4096), default=None, metavar="N",
              help="With --exactness: greedy tokens per bundled prompt (default 64: 4 prompts, 256 positions, "
                   "each decoded by AR and MTP at depths 1-3; the first 4 of each again with a prompt cache).")
@force_option
@json_option
def doctor_cmd(exactness: bool, model_ref: str, tokens: int | None, force: bool, json_out: str | None) -> None:
    """Check the installation: MLX backend and device, versions, caches. With --exactness,
    check what mtplx promises on this backend and model: the output law is exact on every
    backend; greedy output is identical to greedy AR where the backend rounds a T-row verify
    pass as T single-row steps (true on MLX's CPU backend; this measures yours)."""
    if exactness:
        if not run_exactness(model_ref, tokens, force, json_out):
            sys.exit(1)
        return
    if tokens is not None or model_ref != "demo":
        raise click.UsageError("--model and --tokens apply only with --exactness")
    _installation(json_out)


def offer_exactness(ref: str) -> None:
    """`mtplx start`, right after a model's first graft: offer the check once (answering no
    just says how to run it later)."""
    if click.confirm("Check exactness on this machine? (greedy MTP vs AR and the sampled law; a minute or two)",
                     default=False, err=True):
        run_exactness(ref, None, False, None)
    else:
        click.echo(f"Later: `mtplx doctor --exactness --model {ref}`", err=True)


def run_exactness(model_ref: str, tokens: int | None, force: bool, json_out: str | None) -> bool:
    """The check, its report printed (and written as JSON); whether it passed."""
    import mtplx
    from mtplx.core.config import save_exactness
    from mtplx.bench.exactness import DEFAULT_TOKENS, check_exactness, format_report

    command = "mtplx doctor --exactness" + (f" --model {model_ref}" if model_ref != "demo" else "")
    quiet = json_out == "-"
    say = (lambda msg: None) if quiet else (lambda msg: click.echo(f"  {msg}", err=True))
    if not quiet:
        click.echo(f"Loading {model_ref} ...", err=True)
    model, tokenizer = mtplx.load(model_ref, force=force)
    report = check_exactness(model, tokenizer, tokens=tokens or DEFAULT_TOKENS, progress=say, model_name=model_ref)
    saved = save_exactness(model, report.verdict_record())
    if not quiet:
        click.echo(format_report(report, command))
        if saved is not None:
            click.echo(f"saved              the verdict, for `mtplx bench` to quote, in {saved}")
    write_json(report.as_json(), json_out)
    return report.ok


def _installation(json_out: str | None) -> None:
    import importlib.metadata as md
    import os

    import mlx.core as mx

    from mtplx._version import __version__
    from mtplx.core.device import machine_memory_bytes
    from mtplx.artifact.paths import cache_root
    from mtplx.core.config import config_path
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
        click.echo("exactness          `mtplx doctor --exactness [--model M]` checks greedy and sampled exactness "
                   "on this backend")
    write_json(report, json_out)
    if not healthy:
        sys.exit(1)


COMMANDS = [doctor_cmd]
