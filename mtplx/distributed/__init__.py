"""MTP decoding across machines: a thin layer over ``mx.distributed``.

``mlx.launch --backend ring --hosts IP0,IP1 -- mtplx run --distributed pipeline ...`` (or
``serve``, ``bench``) starts the same command on every host; each rank loads only its range of
the trunk's layers (mlx-lm's pipeline split, split.py), and rank 0 decodes with the ordinary
single-process engine while the others run their layers on every pass (follow.py).

Where things live, and why (split.py): rank 0 holds the LAST layers, the final norm, the
lm_head, the embedding and the MTP head. The final hidden state is produced there and both
the lm_head and the head read it, so drafting, acceptance and sampling need no transfer;
rank size-1 holds the first layers and the embedding; ranks in between hold layers only.

One speculative step (stage.py, protocol.py): rank 0 drafts, then sends one control message
(the block [pending, d_1..d_D] and the accepted count of the previous verify) to rank size-1,
which embeds the block; the hidden state then flows rank by rank back to rank 0, each rank
running the verify-block forward on its own layers (the Gated-DeltaNet layers keep their
rollback record, mtplx/model/gated_delta_cache.py). Rank 0 finishes the pass, accepts, samples
and commits; every other rank commits the same accepted count, with the engine's own commit,
when the next message arrives. Prefill chunks and AR steps take the same path as plain
passes. A step therefore costs ``size`` hops whatever the depth, and MTP spreads them over
every accepted token.

Failures (watchdog.py): a rank whose peer dies gets an error from the ring backend at once; a
peer that is alive but silent, or never starts, is caught by a watchdog process per rank that
ends the rank after ``--distributed-timeout`` seconds with one line. Every rank then sees a
closed connection and ends too. Ranks that loaded different artifacts are refused at start,
by comparing the contract's provenance hashes and config.json (session.py).
"""

from mtplx.distributed.follow import follow
from mtplx.distributed.link import DEFAULT_TIMEOUT, Link
from mtplx.distributed.session import MODES, join, load, load_or_follow, stop
from mtplx.distributed.watchdog import DistributedError

__all__ = ["DEFAULT_TIMEOUT", "DistributedError", "Link", "MODES", "follow", "join", "load", "load_or_follow", "stop"]
