"""Start a distributed run: join the ranks, load each rank's part, agree on the artifact.

Every rank runs the same command (``mlx.launch ... -- mtplx run --distributed pipeline ...``):

1. :func:`join` starts MLX's distributed group (the backend mlx.launch set up: ring over
   TCP, or JACCL) under a deadline, so a rank that never starts ends the run.
2. :func:`load` loads the artifact through mtplx's own loader with a pipeline split (only this
   rank's layers are read from disk), then every rank exchanges a digest of its artifact (the
   contract's provenance hashes and config.json) and of its runtime version; any difference
   is refused on every rank before a single pass runs.
3. Rank 0 then decodes with the ordinary engine, its trunk a :class:`LeaderStage`; every other
   rank runs :func:`~mtplx.distributed.follow.follow` until rank 0 calls :func:`stop`.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

from mtplx._version import __version__
from mtplx.artifact.loader import load as load_artifact
from mtplx.distributed.follow import follow
from mtplx.distributed.link import DEFAULT_TIMEOUT, Link
from mtplx.distributed.split import PipelineSplit
from mtplx.distributed.stage import FollowerStage, LeaderStage
from mtplx.distributed.watchdog import DistributedError, Watchdog
from mtplx.model.mtp_model import MTPModel

MODES = ("pipeline",)
# Bumped whenever the messages between ranks change: ranks of another version are refused.
PROTOCOL_VERSION = 1

LAUNCH_HINT = "start every rank with mlx.launch, e.g. `mlx.launch --backend ring --hosts IP1,IP2 -- mtplx run --distributed pipeline ...`"


def _check_hostfile() -> None:
    """The ring backend crashes or waits forever on a hostfile of fewer than two hosts."""
    path = os.environ.get("MLX_HOSTFILE")
    if not path:
        return
    try:
        hosts = json.loads(Path(path).read_text(encoding="utf-8") or "[]")
    except (OSError, ValueError) as e:
        raise DistributedError(f"cannot read the ring backend's host file ({e})", path=path, fix=LAUNCH_HINT) from None
    if not isinstance(hosts, list) or len(hosts) < 2:
        raise DistributedError("--distributed needs at least two ranks; the host file lists fewer", path=path,
                               fix=LAUNCH_HINT)


def join(timeout: float = DEFAULT_TIMEOUT) -> Link:
    """This process's rank in the group mlx.launch started (at least two ranks)."""
    _check_hostfile()
    watchdog = Watchdog(rank=int(os.environ.get("MLX_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or -1))
    message = (f"the other ranks did not all join within {timeout:g} s: a host is down or unreachable, or its rank "
               f"was never started; {LAUNCH_HINT}")
    with watchdog.waiting(timeout, message):
        try:
            group = mx.distributed.init(strict=True)
        except RuntimeError as e:
            raise DistributedError(f"no distributed backend could start ({e})", fix=LAUNCH_HINT) from None
    watchdog.rank = group.rank()
    if group.size() < 2:
        raise DistributedError("--distributed needs at least two ranks; this run has one", fix=LAUNCH_HINT)
    return Link(group, watchdog, timeout)


def artifact_digest(path: Path, contract: Any) -> bytes:
    """What must be equal on every rank: config.json's bytes and the contract's provenance
    (sidecar and trunk-tensor hashes). The layers' weights are not hashed (minutes on a large
    model); config.json pins their shapes and quantization."""
    h = hashlib.sha256(hashlib.sha256((path / "config.json").read_bytes()).digest())
    h.update(json.dumps(contract.provenance if contract is not None else None, sort_keys=True).encode())
    return h.digest()


def runtime_digest() -> bytes:
    return hashlib.sha256(f"mtplx {__version__} protocol {PROTOCOL_VERSION}".encode()).digest()


def handshake(link: Link, artifact: bytes, timeout: float) -> None:
    """Compare every rank's digests; every rank raises the same error on any difference."""
    row = mx.array(list(artifact + runtime_digest()), dtype=mx.uint8)
    table = [bytes(r) for r in link.gather(row, "comparing the artifacts the ranks loaded", timeout).tolist()]
    for rank, theirs in enumerate(table):
        if theirs[32:] != table[0][32:]:
            raise DistributedError(f"rank {rank} runs another mtplx version or protocol than rank 0 (this rank: "
                                   f"mtplx {__version__}, protocol {PROTOCOL_VERSION})",
                                   fix="install the same mtplx on every host")
        if theirs[:32] != table[0][:32]:
            raise DistributedError(f"rank {rank} loaded another artifact than rank 0 (artifact digest "
                                   f"{theirs[:6].hex()} vs {table[0][:6].hex()}: config.json or the contract's "
                                   "provenance hashes differ), so they would not compute the same model",
                                   fix="put the same artifact directory on every host")


def load(link: Link, ref: str, *, mode: str = "pipeline", mtp: bool = True, force: bool = False,
         revision: str | None = None, layers: Sequence[int] | None = None) -> tuple[MTPModel, Any]:
    """Load this rank's part of ``ref``; returns (model, tokenizer) on every rank. On rank 0
    the model decodes as usual; elsewhere pass it to :func:`~mtplx.distributed.follow.follow`."""
    if mode not in MODES:
        raise DistributedError(f"unknown distributed mode {mode!r}", fix=f"use one of {', '.join(MODES)}")
    split = PipelineSplit(link.group, layers)
    t0 = time.monotonic()
    model, tokenizer, report = load_artifact(ref, mtp=mtp, force=force, revision=revision, split=split)
    loaded_in = time.monotonic() - t0
    model.load_report = report
    # The others may still be loading: wait for them as long as this rank took, twice over.
    handshake(link, artifact_digest(report.path, model.contract), link.timeout + 2 * loaded_in)
    weights = sum(v.nbytes for _, v in tree_flatten(model.trunk.model.parameters()))
    if model.head is not None:
        weights += sum(v.nbytes for _, v in tree_flatten(model.head.parameters()))
    kind = LeaderStage if link.rank == 0 else FollowerStage
    model.trunk.stage = kind(link, split.layer_range, split.hidden_size, split.dtype, weights)
    if link.rank == 0:
        model.trunk.stage.start_heartbeat()
    return model, tokenizer


def stop(model: MTPModel) -> None:
    """Rank 0: tell every other rank the run is over."""
    stage = model.trunk.stage
    if isinstance(stage, LeaderStage):
        stage.stop()


def load_or_follow(ref: str, *, mode: str = "pipeline", mtp: bool = True, force: bool = False,
                   timeout: float | None = None, layers: Sequence[int] | None = None) -> tuple[MTPModel, Any]:
    """For a command every rank runs: join, load, and on rank 0 return (model, tokenizer), the
    other ranks being told to stop when this process exits. Any other rank serves rank 0's
    passes until then, and exits."""
    link = join(DEFAULT_TIMEOUT if timeout is None else timeout)
    model, tokenizer = load(link, ref, mode=mode, mtp=mtp, force=force, layers=layers)
    if link.rank != 0:
        follow(model)
        raise SystemExit(0)
    atexit.register(stop, model)
    return model, tokenizer
