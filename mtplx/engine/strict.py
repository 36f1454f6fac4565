"""Strict greedy: no greedy token is decided by a multi-row pass when its top-2 logit gap is a
near-tie; such a token is decided again by a one-row pass, with a plain AR step's arithmetic.

Why: greedy MTP equals greedy AR token for token only where the backend rounds a row of a
T-row verify pass exactly as a one-row decode step. MLX's CPU backend does (tests/test_greedy.py);
some Apple GPUs pick another quantized-matmul kernel for 2+ rows, so a verify row can round
differently and flip a near-tie (`mtplx doctor --exactness` measures this machine). Strict
greedy is the choice to pay for certainty there instead of hiding the difference.

How, in a greedy step of the batched decoder (batch.py calls :func:`margins` in its verify
and :func:`settle` in its accept): verify row j's logits decide token j+1 (row 0: the first
draft's position). With ``a`` drafts accepted, rows 0..a decide tokens. Let i be the first of
those rows whose top-2 margin (of the logits the acceptance used, grammar mask included) is
at or under the row's margin ``eps``. Then the step keeps d_1..d_i (decided confidently), rolls
the caches back to the block's inputs 0..i-1 (none of the block for i = 0), runs ONE one-row
trunk pass over input i (the pending token for i = 0, else d_i) on the row's own caches, alone,
and takes that pass's argmax as the next token: the caches then hold inputs 0..i, as if i
drafts had been committed, and the step emits d_1..d_i and the recomputed token. The margins are
evaluated with the acceptance arrays (no extra synchronization); a recompute costs one
one-row trunk pass and one synchronization, only at a near-tie (its time falls in the step's
"sample" phase; ``DecodeStats.recomputed`` counts them).

What it guarantees: no emitted greedy token was decided from a multi-row pass with a top-2
gap within ``eps``. What it does not: the caches themselves (KV rows, recurrent states) are
still written by multi-row passes, so a backend that rounds those differently can still part
from AR where AR's own gap is within the caches' rounding; and the first token comes from the
prompt's prefill pass, as in AR. With ``eps`` at or above the backend's verify-vs-decode
difference (``mtplx doctor --exactness`` reports it) the flips the doctor finds are covered.

Temperature > 0: the option does nothing (the law is exact on any backend; there is no argmax
to protect). A depth-0 step of the batched decoder is a row of a ragged pass too, so it is
checked the same way, except where the decoder holds one row at most (``max_batch`` 1): its
plain lane's passes have one row already, so it runs there unchecked.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from mtplx.engine import steps
from mtplx.engine.sampling import Verdict
from mtplx.core.knobs import NEAR_TIE, KnobError
from mtplx.errors import MtplxError

if TYPE_CHECKING:
    from mtplx.engine.row import Row, Work
    from mtplx.model.mtp_model import MTPModel

__all__ = ["NEAR_TIE", "active", "check", "margins", "matched", "settle"]

def check(value: Any, model: MTPModel | None = None, label: str = "strict_greedy") -> float | None:
    """The user's ``strict_greedy`` as the engine's margin: False or None -> None (off), True ->
    :data:`NEAR_TIE`, a number >= 0 -> that margin (``math.inf``: every decided token is
    recomputed). Anything else raises :class:`~mtplx.core.knobs.KnobError` (``label``: the option's
    name as the user wrote it). :data:`NEAR_TIE` lives in mtplx.core.knobs with the other defaults."""
    if value is None or value is False:
        return None
    if value is True:
        return NEAR_TIE
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value) and value >= 0:
        margin = float(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):  # a margin out of range
        raise KnobError("strict_greedy", f"{label} must be a top-2 logit margin >= 0, got {value!r}",
                        fix=f"pass a margin such as {NEAR_TIE} (the default) or 0.1; 'inf' re-decides every token")
    else:
        raise KnobError("strict_greedy", f"{label} must be true, false or a top-2 logit margin >= 0, got {value!r}",
                        fix=f"pass true (margin {NEAR_TIE}) or a number such as 0.1")
    if model is not None and model.trunk.stage is not None:
        raise MtplxError("strict_greedy is not available with --distributed: the pipeline's ranks roll back only "
                         "to a verified prefix", fix="drop --strict-greedy or --distributed")
    return margin


def active(row: Row) -> bool:
    """Whether ``row``'s steps are checked: strict greedy asked for, and a greedy target."""
    return row.request.strict_greedy is not None and row.request.params.greedy


def margins(logits: mx.array) -> mx.array:
    """Top-2 gap of each row of ``logits [T, V]`` (float32 ``[T]``, lazy; inf where only one
    token is allowed)."""
    top = mx.topk(logits.astype(mx.float32), 2, axis=-1)
    return mx.abs(top[..., 0] - top[..., 1])


def _reaches(row: Row, kept: list[int]) -> bool:
    """Whether the output goes past the drafts ``kept`` (the budget and EOS allow one more)."""
    budget = row.budget
    return budget.remaining > len(kept) and not any(t in budget.eos for t in kept)


def matched(w: Work, verify: Verdict, settled: Verdict) -> int:
    """The drafts of a settled step that matched the target, for the acceptance statistics and
    depth auto (not for the output, which is ``settled``'s). A recompute at row i ends the step
    there, but is no rejection of draft i+1 unless the one-row pass chose another token: where it
    agrees, the drafts the verify accepted count as accepted."""
    i = settled.accepted
    if i < w.depth and settled.next_token == int(w.draft_tokens[i].item()):
        return max(verify.accepted, i + 1)
    return i


def settle(model: MTPModel, w: Work, verdict: Verdict) -> Verdict:
    """The step's verdict under strict greedy (module docstring). Without a near-tie among the
    deciding rows it is ``verdict``; with one at row i, the caches hold inputs 0..i afterwards
    (committed here: ``w.record`` is set to None), ``w.hidden`` and ``w.lp`` hold rows 0..i-1
    of the verify and the recompute's row, and the verdict is (i, the recomputed token)."""
    row = w.row
    eps = row.request.strict_greedy
    a = verdict.accepted
    near = [j for j, m in enumerate(w.margins[: a + 1].tolist()) if m <= eps]
    if not near:
        return verdict
    i = near[0]
    kept = w.draft_tokens[:i].tolist()
    if not _reaches(row, kept):
        # The output ends inside d_1..d_i: row i's token is never emitted, so nothing is
        # recomputed; the verify's own choice there stands in (the grammar allows it).
        return Verdict(i, int(w.draft_tokens[i].item()) if i < a else verdict.next_token)
    cache = row.cache
    steps.commit(cache, w.record, accepted=i - 1, head=w.copy is None)  # inputs 0..i-1 (-1: none of the block)
    token = row.pending if i == 0 else kept[-1]
    # A plain AR step's arithmetic (the decoder's plain lane, one row): this row alone, one token.
    hidden, post = model.trunk_hidden(mx.array([[token]]), cache)
    logits = model.trunk.lm_head(post)[:, -1]
    lp = row.logprobs.rows(logits)  # raw logits: logprobs are the model's, not the grammar's
    if row.constraint is not None:  # constraint: row i's mask, the state after d_i
        logits = row.constraint.mask_row(logits, i)
    next_token = mx.argmax(logits, axis=-1)
    mx.eval(next_token, hidden, *lp.arrays)
    w.hidden = mx.concatenate([w.hidden[:, :i], hidden], axis=1)
    w.lp = w.lp.splice(i, lp)
    w.record = None
    row.stats.recomputed += 1
    return Verdict(i, int(next_token.item()))
