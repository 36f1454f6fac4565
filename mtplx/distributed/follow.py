"""The loop of a follower rank: run this rank's layers on every pass the leader starts.

A follower keeps the trunk caches of its own layers only (KV, Gated-DeltaNet recurrent and
conv states) and changes them exactly as the leader's engine changes its own: a fresh cache
when the leader starts a sequence, a plain pass for prefill chunks and AR steps, the
verify-block pass (which keeps what a rollback needs) for a speculative step, and, with the
next message, the leader's decision on that verify, committed with the engine's own
:func:`~mtplx.engine.cache.commit` so every rank keeps the same prefix.
"""

from __future__ import annotations

from mtplx.distributed.protocol import NO_DECISION, Op
from mtplx.distributed.stage import FollowerStage
from mtplx.distributed.watchdog import DistributedError
from mtplx.engine.cache import commit
from mtplx.model.mtp_model import ModelCache, MTPModel
from mtplx.model.trunk import VerifyRecord


def follow(model: MTPModel) -> None:
    """Serve the leader's passes until it says stop."""
    stage: FollowerStage = model.trunk.stage
    cache: ModelCache | None = None
    record: VerifyRecord | None = None
    while True:
        control = stage.receive_control()
        if control.reset:
            cache, record = model.make_cache(), None
        elif control.keep != NO_DECISION:
            if record is None or cache is None:
                raise DistributedError("the leader committed a verify pass this rank never ran: the ranks are out "
                                       "of step")
            commit(cache, record, control.keep)
            record = None
        if control.op is Op.STOP:
            return
        if control.op is Op.PING:
            stage.answer_ping()
            continue
        if control.op is Op.STATS:
            stage.report_stats()
            continue
        if cache is None:
            raise DistributedError("the leader sent a pass before starting a sequence: the ranks are out of step")
        record = VerifyRecord() if control.op is Op.VERIFY else None
        stage.run_pass(model.trunk, control, cache.trunk, record)
