"""The decoder: the step loop over B rows (B = 1 for the one-row API, speculative.Engine), each
row with its own acceptance and rollback. Prefill, the plain (pipelined AR) lane and the
speculative step exist here once, for one row and for many.

State between steps: a row's trunk caches hold every committed token but the newest one,
``pending`` (already sampled and emitted, not yet fed to the trunk); the head's cache holds one
row per committed position except the rows in ``cache.backlog`` (trunk hiddens of the last
verify), which the next draft feeds in the same call as its first row. Every row keeps its own
:class:`~mtplx.model.mtp_model.ModelCache`; a step runs each *pass* once for all rows, as a
ragged pass (mtplx/model/rows.py: the rows' tokens concatenated, the weights read once, only
attention and the Gated-DeltaNet recurrence split by row):

0. joining rows feed their next prompt chunk (``prefill_chunk`` tokens at most) in the same
   trunk pass as the others' verify blocks, so a long prompt costs the running rows one chunk
   per step, never a stall; a row whose prompt is done samples its first token there;
1. draft: pass k over the rows drafting at least k tokens this step (pass 1 also feeds each
   row's backlog): head(backlog rows ..., (h_last, pending)) -> q_1, d_1; head((chain hidden,
   d_1)) -> q_2 ...; each q over the draft vocabulary (all V tokens, or a reduced subset
   scattered back to V), each row sampling with its own draft law and random stream;
2. verify: one trunk pass over every row's [pending, d_1 .. d_D] (rows of different depths),
   with the acceptance test's device work (target law, ratios, residual draws): a step
   synchronizes twice, once for the drafts, once for verify + acceptance;
3. accept per row (sampling.py's rule, the row's own uniforms): d_i while u_i <
   p_i(d_i)/q_i(d_i), then a residual or bonus token; a row keeps its own accepted prefix and
   its own residual or bonus token, whatever the others accepted;
4. commit per row: trim/restore every cache to the accepted prefix (cache.py), the accepted
   positions' hiddens becoming the head's backlog.

With a prompt cache the prefill covers only the prompt's new suffix, and the caches are left
holding exactly the tokens the trunk consumed, so the next call can extend them. A grammar
constraint (constraints.py) masks p and q at the points marked ``# constraint:``.

A row's tokens depend only on its own prompt, settings and seed: its random draws come from its
own generator in the same order as alone, and a ragged pass computes each row as it would alone.
Its prompt's chunking is fixed by the row alone (``prefill_chunk`` and its prompt-cache
snapshot positions), never by what else the step carries.

Depth: each row has its own policy (policy.py), asked before every step; a row at depth 0 only
verifies its pending token. The cost of a step grows with the sum of the rows' blocks.

Plain rows: a row that never drafts (a pinned depth 0, or "auto" where no depth pays) and has no
grammar needs nothing from the host to take its next step, so it runs mlx-lm's pipelined loop
inside the batch: its token is sampled on the device and fed to the next pass unread, and the
host reads it while that pass runs. A step of plain rows only is queued, not waited for, so the
host's work between steps (detokenizing, streaming) overlaps the next pass. A plain row keeps
the head's cache in step only when a prompt cache will carry it to a later call.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import mlx.core as mx

from mtplx.core import knobs
from mtplx.engine import steps, strict
from mtplx.engine.lookup import AUTO, one_hot
from mtplx.engine.policy import FixedDepth
from mtplx.engine.row import (
    Emitted,
    Row,
    RowRequest,
    Work,
    check_depth,
    check_prompt,
    extend_backlog,
)
from mtplx.engine.sampling import decide, filtered_probs, sample_logits
from mtplx.errors import MtplxError
from mtplx.model import rows as ragged
from mtplx.model.mtp_model import MTPModel
from mtplx.model.trunk import VerifyRecord

__all__ = ["BatchDecoder", "Emitted", "Row", "RowRequest"]


class BatchDecoder:
    """Decodes up to ``max_batch`` rows together (more wait for a free slot, first come first
    served). Rows join at the next :meth:`step` and leave when done or on :meth:`remove`.

    ``isolate_rows``: a row's own host work after the shared passes (its acceptance, strict
    greedy's settle, its logprobs, its budget and policy) that raises ends that row alone: the
    row is done with the exception in ``row.error`` and the others' step completes unchanged
    (the server). Off, the exception propagates (the one-row API and batch_generate raise it)."""

    def __init__(self, model: MTPModel, max_batch: int = 8, prefill_chunk: int = knobs.PREFILL_CHUNK,
                 isolate_rows: bool = False):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise MtplxError(f"max_batch must be an integer >= 1, got {max_batch!r}", fix="pass a positive integer")
        prefill_chunk = knobs.check("prefill_chunk", prefill_chunk)
        if max_batch > 1 and model.trunk.stage is not None:
            raise MtplxError("a distributed pipeline stage decodes one sequence at a time",
                             fix="use --max-batch 1 with --distributed")
        self.model = model
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.isolate_rows = isolate_rows
        self._active: list[Row] = []
        self._waiting: list[Row] = []
        self._ids = itertools.count()

    # -- membership -------------------------------------------------------------------------

    @property
    def rows(self) -> list[Row]:
        """Rows not done: the decoding ones, then the ones waiting for a slot."""
        return self._active + self._waiting

    def __len__(self) -> int:
        return len(self._active) + len(self._waiting)

    def add(self, request: RowRequest) -> Row:
        """Check ``request`` and queue it; it joins at the next step boundary (its caches are
        made now when a slot is free, else when one frees). A request with nothing to generate
        (``max_tokens`` 0) comes back already done."""
        model = self.model
        request.prompt = check_prompt(model, request.prompt)
        check_depth(model, request.depth)
        request.lookup = knobs.check("lookup", request.lookup)
        request.kv_bits, request.kv_group_size = model.trunk.check_kv(request.kv_bits, request.kv_group_size)
        if request.prompt_cache is not None:
            request.prompt_cache.check_model(model)
            request.prompt_cache.check_kv(request.kv_bits, request.kv_group_size)
            if any(r.request.prompt_cache is request.prompt_cache for r in self.rows):
                raise MtplxError("this prompt cache is already in use by a row of the batch",
                                 fix="give each concurrent request its own prompt cache")
        if request.constraint is not None and any(r.request.constraint is request.constraint for r in self.rows):
            raise MtplxError("this constraint is already in use by a row of the batch",
                             fix="give each concurrent request its own Constraint")
        row = Row(next(self._ids), request, model)
        # A row that never drafts and has no grammar (whose mask needs each token on the host)
        # runs the pipelined plain lane (_plain). A strict-greedy one only where every pass has
        # one row (max_batch 1): in a batch its token comes from a multi-row pass, which strict.py
        # must check.
        # A forced lookup (an integer) needs the speculative step to verify its copies; "auto"
        # copies only where the row speculates anyway (the plain lane is the cheaper loop).
        forced = row.lookup.active and request.lookup != AUTO
        lane_ok = request.constraint is None and (not strict.active(row) or self.max_batch == 1)
        row.plain = row.depth == 0 and lane_ok and not forced
        # A policy that chooses per step (auto) takes its plain steps in the plain lane and
        # leaves it when it drafts (a probe, a depth that pays, a copy that pays): _plan.
        row.switches = lane_ok and row.depth > 0 and not isinstance(row.policy, FixedDepth)
        if row.plain:
            row.lookup.max_copy = 0
        if row.budget.done:
            row.done = True
            return row
        self._waiting.append(row)
        self._admit()
        return row

    def _admit(self) -> None:
        """Start waiting rows while there are free slots (between steps only)."""
        while self._waiting and len(self._active) < self.max_batch:
            self._start(self._waiting.pop(0))

    def remove(self, row: Row) -> None:
        """``row`` leaves now (cancelled, stop string, client gone). Its prompt cache, if any,
        keeps the tokens the trunk consumed, as after a finished generation."""
        if row in self._active:
            self._active.remove(row)
        elif row in self._waiting:
            self._waiting.remove(row)
        else:
            return
        self._finish(row)

    def _finish(self, row: Row) -> None:
        row.done = True
        pc = row.request.prompt_cache
        if pc is not None and row.cache is not None:
            pc.tokens = row.consumed
        row.cache = None

    def _start(self, row: Row) -> None:
        """Bring a waiting row in: its caches (a prompt cache's, extended), its prompt pieces."""
        request, model = row.request, self.model
        prompt, pc = request.prompt, request.prompt_cache
        stops: list[int] = []
        if pc is not None:
            row.reused = pc.prepare(model, prompt)
            row.stats.cached_tokens = row.reused
            stops, at_stop = pc.snapshot_stops(len(prompt), row.reused, request.snapshot_at)
            row.at_stop = at_stop
        row.cache = pc.cache if pc is not None else model.make_cache(request.kv_bits, request.kv_group_size)
        if row.constraint is not None:  # constraint: every generation starts at the grammar's start
            row.constraint.start()
        row.stops = set(stops)
        row.chunks = [(row.reused + s, row.reused + e)
                      for s, e in steps.chunks(len(prompt) - row.reused, stops, self.prefill_chunk)]
        self._active.append(row)

    # -- the step ---------------------------------------------------------------------------

    def step(self) -> list[tuple[Row, Emitted]]:
        """One step for every active row; returns what each row emitted (rows still in their
        prompt, and a plain row's first step, emit nothing). Rows that finish are marked done
        and leave after this step."""
        self._admit()
        if not self._active:
            return []
        t0 = time.perf_counter()
        out: list[tuple[Row, Emitted]] = []
        decoding, plain = [], []
        for r in [r for r in self._active if not r.prefilling]:
            w = self._plan(r, out)
            if w is not None:
                (plain if r.plain else decoding).append(w)
        prefill = self._prefill_work()
        self._draft(decoding)
        t1 = time.perf_counter()
        self._verify(decoding, prefill, plain)
        t2 = time.perf_counter()
        for w in decoding:
            self._host(out, w, self._accept, t1 - t0, t2 - t1)
        unread = [w.row.feed for w in plain if w.row.unread]
        if unread:  # the previous step's tokens: waits for that step's pass only
            mx.eval(unread)
        t3 = time.perf_counter()
        for w in plain:
            self._host(out, w, self._plain, t3 - t0)
        for w in prefill:
            w.row.stats.seconds["prefill"] += t2 - t0
            if w.first is not None:
                self._host(out, w, self._first)
        out = _one_per_row(out)
        for row, _ in out:
            if row.budget.done and not row.done:
                self._active.remove(row)
                self._finish(row)
        return out

    def _host(self, out: list[tuple[Row, Emitted]], w: Work, work: Any, *args: Any) -> None:
        """One row's host work after the shared passes, its emission appended to ``out``; with
        ``isolate_rows`` an exception ends that row only (see the class docstring)."""
        try:
            emitted = work(w, *args)
        except Exception as e:  # noqa: BLE001 - ends this row alone; the server reports it
            if not self.isolate_rows:
                raise
            w.row.error = e
            self._active.remove(w.row)
            self._finish(w.row)
            return
        if emitted is not None:
            out.append((w.row, emitted))

    def _plan(self, row: Row, out: list[tuple[Row, Emitted]]) -> Work | None:
        """The row's work this step: the plain lane, or drafts copied from its context
        (lookup.py) or from the head at the policy's depth. Decided from committed tokens and
        past acceptance only, before any of the step's draws, so the choice (and a change of
        lane) never biases the output law. None: the row ended on the token it had in flight."""
        if row.plain and not row.switches:
            return Work(row)
        # A step emits at most depth + 1 tokens: drafting more than the budget's last token needs is waste.
        room = row.budget.remaining - 1
        depth = min(row.policy.choose(len(row.request.prompt) + len(row.fed)), room)
        copy = row.lookup.choose(room, row.policy, depth) if row.lookup.active else []
        if row.plain:
            if not copy and depth == 0:
                return Work(row)
            # Leaving the plain lane: its in-flight token becomes the pending one. A copy was
            # chosen on the context before that token; its tokens are proposed again after it.
            self._host(out, Work(row), self._leave_plain)
            if row.done or row.budget.done:
                return None
            room = row.budget.remaining - 1
            depth = min(depth, room)
            if copy:
                copy = row.lookup.index.propose(min(len(copy), room)) if room > 0 else []
        elif row.switches and not copy and depth == 0:
            _enter_plain(row)
            return Work(row)
        if copy and row.constraint is not None:
            # constraint: the copy walked as drafts are (masks recorded, matcher advanced), cut
            # before a token the grammar forbids; nothing left: the head drafts instead
            copy = row.constraint.take_copy(copy)
        if copy:
            return Work(row, depth=len(copy), copy=copy)
        return Work(row, depth=depth)

    def _leave_plain(self, w: Work) -> Emitted:
        """A plain row turns speculative: read and emit the token its last pass sampled, which
        the trunk has not consumed (the pending token of a speculative row)."""
        row = w.row
        token, emitted, logprobs = _read_in_flight(row)
        row.plain, row.feed, row.feed_lp, row.unread = False, None, None, False
        row.pending = token
        row.count_step(0, 0, emitted)
        row.emitted += emitted
        row.lookup.extend(emitted)
        return Emitted(emitted, 0, 0, logprobs)

    def _prefill_work(self) -> list[Work]:
        """Prompt pieces this step feeds: whole pieces of the joining rows, first come first
        served, up to ``prefill_chunk`` tokens in all (at least one piece), so a step's cost is
        bounded while each row's chunking stays its own."""
        work, budget = [], self.prefill_chunk
        for r in self._active:
            if r.prefilling:
                s, e = r.chunks[0]
                if work and e - s > budget:
                    break
                work.append(Work(r, chunk=r.chunks.pop(0)))
                budget -= e - s
        return work

    def _draft(self, work: list[Work]) -> None:
        """Draft passes over the rows: pass k feeds every row drafting at least k tokens."""
        model = self.model
        vocab, subset = model.vocab_size, model.draft_vocab
        heads = [w for w in work if w.copy is None]
        feed = {id(w): (w.row.cache.backlog, mx.array([w.row.cache.backlog_tokens + [w.row.pending]])) for w in heads}
        for k in range(1, max((w.depth for w in heads), default=0) + 1):
            group = [w for w in heads if w.depth >= k]
            logits, chain = model.draft_rows([feed[id(w)][0] for w in group], [feed[id(w)][1] for w in group],
                                             [w.row.cache for w in group])
            for j, w in enumerate(group):
                d_logits, constraint = logits[:, j : j + 1], w.row.constraint
                if constraint is not None:  # constraint: mask q with the state after pending, d_1..d_{k-1}
                    d_logits = constraint.mask_draft(d_logits, subset)
                d, q = sample_logits(d_logits[0], w.row.draft_params, w.row.rng)
                if subset is not None:
                    d, q = subset.token_ids(d), subset.scatter(q, vocab)
                if constraint is not None:
                    # constraint: the next draft's mask needs this draft on the host (one sync per
                    # draft, paid only by a row with a grammar).
                    constraint.advance_draft(d.item())
                w.drafts.append(d)
                w.qs.append(q)
                feed[id(w)] = (chain[:, j : j + 1], d[None])
        drafted = []
        for w in work:
            if w.copy is not None:  # copied drafts: no head pass; q is one-hot over all V tokens
                w.draft_tokens, w.q = mx.array(w.copy, dtype=mx.int32), one_hot(w.copy, vocab)
                drafted += [w.draft_tokens, w.q]
            elif w.depth:
                w.draft_tokens, w.q = mx.concatenate(w.drafts), mx.concatenate(w.qs)
                drafted += [w.draft_tokens, w.q]
            else:  # a plain step: nothing drafted; the head's rows wait in the backlog
                w.draft_tokens = mx.zeros((0,), dtype=mx.int32)
                w.q = mx.zeros((0, vocab), dtype=mx.float32)
        if drafted:
            mx.eval(drafted)

    def _verify(self, decoding: list[Work], prefill: list[Work], plain: list[Work]) -> None:
        """One trunk pass over the verify blocks, the plain rows' tokens and the prompt pieces,
        with the acceptance test's device work, the plain rows' next tokens and the prompt
        rows' head fill and first tokens. Evaluated at once when a row needs its results on the
        host now (a verdict, a first token); a step of plain rows only is queued and not waited
        for: its tokens are read at the next step, while that step's pass runs (mlx-lm's
        pipelined loop, over rows)."""
        model = self.model
        segments, wanted = [], []  # wanted: per segment, whether logits are needed at all positions
        for w in decoding:
            w.record = VerifyRecord()
            block = mx.concatenate([mx.array([w.row.pending]), w.draft_tokens])[None]
            segments.append(ragged.Segment(block, w.row.cache.trunk, w.record))
            wanted.append("all")
        for w in plain:  # no record: a plain row never rolls back
            segments.append(ragged.Segment(w.row.feed[None], w.row.cache.trunk))
            wanted.append("all")
        prompt_ids = {}
        for w in prefill:
            s, e = w.chunk
            prompt_ids[id(w)] = w.row.request.prompt[s:e]
            segments.append(ragged.Segment(mx.array(prompt_ids[id(w)])[None], w.row.cache.trunk))
            wanted.append("last" if e == len(w.row.request.prompt) else None)
        hidden, post = model.trunk_rows(segments)
        where = ragged.spans([seg.tokens.shape[1] for seg in segments])
        # lm_head only where something is sampled: every verified position, a prompt's last.
        if all(x == "all" for x in wanted):
            logits = model.trunk.lm_head(post)
            rows_at = where
        else:
            picks, rows_at, n = [], [], 0
            for (s, e), x in zip(where, wanted):
                if x is None:
                    rows_at.append(None)
                    continue
                s = s if x == "all" else e - 1
                picks.append(post[:, s:e])
                rows_at.append((n, n + e - s))
                n += e - s
            logits = model.trunk.lm_head(ragged.join(picks)) if picks else None
        evaluate: list[mx.array] = []
        n_dec, n_plain = len(decoding), len(plain)
        for w, (s, e), at in zip(decoding, where, rows_at):
            row = w.row
            v_logits = logits[:, at[0] : at[1]]
            w.hidden = hidden[:, s:e]
            w.lp = row.logprobs.rows(v_logits[0])  # row i: the i-th token this step emits (raw logits)
            if row.constraint is not None:  # constraint: mask p at each position with the draft's state
                v_logits = row.constraint.mask_verify(v_logits[0])[None]
            p = filtered_probs(v_logits[0], row.request.params)
            w.ratio, w.candidates = row.acceptance_arrays(p, w.q, w.draft_tokens, row.rng)
            evaluate += [w.ratio, w.candidates, w.hidden, *w.lp.arrays]
            if strict.active(row):  # strict greedy: the margins, read with the acceptance (strict.py)
                w.margins = strict.margins(v_logits[0])
                evaluate.append(w.margins)
        for w, (s, e), at in zip(plain, where[n_dec:], rows_at[n_dec:]):
            row = w.row
            last = logits[:, at[0] : at[1]][:, -1]
            w.hidden = hidden[:, s:e]
            w.lp = row.logprobs.rows(last)
            w.next, _ = sample_logits(last, row.request.params, row.rng)  # as reference.ar_generate samples
            evaluate += [w.next, w.hidden, *w.lp.arrays, *row.cache.arrays()]
        self._fill_prompt_rows(prefill, prompt_ids, hidden, where[n_dec + n_plain:])
        for w, at in zip(prefill, rows_at[n_dec + n_plain:]):
            row = w.row
            evaluate += row.cache.arrays()
            if at is not None:
                last = logits[:, at[0] : at[1]][:, -1]
                w.lp = row.logprobs.rows(last)  # raw logits: logprobs are the model's, not the grammar's
                masked = last if row.constraint is None else row.constraint.mask(last)
                w.first, _ = sample_logits(masked, row.request.params, row.rng)
                evaluate += [w.first, *w.lp.arrays]
        if decoding or prefill:
            mx.eval(evaluate)
        else:
            mx.async_eval(evaluate)
        for w in prefill:
            end = w.chunk[1] - w.row.reused
            if end in w.row.stops and w.row.at_stop is not None:
                w.row.at_stop(end)

    def _fill_prompt_rows(self, prefill: list[Work], prompt_ids: dict, hidden: mx.array, where: list) -> None:
        """Head rows of the prompt pieces (ModelCache.take_prompt_rows, as steps.prefill), filled
        in one pass for every row."""
        if not self.model.has_mtp:
            return
        fills = []
        for w, (s, e) in zip(prefill, where):
            if w.row.keeps_head:
                fill = w.row.cache.take_prompt_rows(hidden[:, s:e], prompt_ids[id(w)], *w.chunk,
                                                    len(w.row.request.prompt))
                if fill is not None:
                    fills.append((*fill, w.row.cache))
        if fills:
            self.model.fill_head_rows(*(list(x) for x in zip(*fills)))

    def _first(self, w: Work) -> Emitted:
        """A row's prompt is in: its first token (sampled from the prompt's last logits)."""
        row = w.row
        row.pending = int(w.first.item())
        if row.constraint is not None:
            row.constraint.advance(row.pending)
        emitted = row.budget.take([row.pending])
        if row.plain:  # the plain lane feeds it at the next step
            _enter_plain(row)
        row.count_step(0, 0, emitted)
        row.emitted += emitted
        if row.lookup.active:
            row.lookup.start(row.request.prompt + emitted)
        return Emitted(emitted, 0, 0, w.lp.take(emitted))

    def _plain(self, w: Work, step_s: float) -> Emitted | None:
        """A plain row's step: read the token the previous step sampled (computed while this
        step's pass was being queued) and emit it; the token fed in this step was it (or, on the
        row's first plain step, the prompt's first token, already emitted). As in
        reference.ar_generate, the trunk has consumed every token a plain row emitted, its last one
        included."""
        row, model = w.row, self.model
        if row.unread:
            token, emitted, logprobs = _read_in_flight(row)
        else:
            token, emitted, logprobs = row.pending, [], None
        row.fed.append(token)
        if model.has_mtp and row.keeps_head:  # the head stays in step for a later MTP call
            extend_backlog(model, row.cache, w.hidden, token)
        row.feed, row.feed_lp, row.unread = w.next, w.lp, True
        row.pending = token
        row.stats.seconds["verify"] += step_s
        if not emitted:
            return None
        row.count_step(0, 0, emitted)
        row.policy.observe(0, 0)
        row.emitted += emitted
        row.lookup.extend(emitted)
        return Emitted(emitted, 0, 0, logprobs)

    def _accept(self, w: Work, draft_s: float, verify_s: float) -> Emitted:
        """Accept, then commit the row's caches to what it keeps (steps 3-4 above)."""
        row, model = w.row, self.model
        t3 = time.perf_counter()
        verdict = decide(w.ratio, w.candidates, row.rng)  # the host side, with the row's own uniforms
        if w.margins is not None:  # strict greedy: a near-tie is decided again by a one-row pass
            verdict, verify = strict.settle(model, w, verdict), verdict
            matched = strict.matched(w, verify, verdict)  # what the statistics count, not the output
        else:
            matched = verdict.accepted
        a = verdict.accepted
        proposed = w.draft_tokens[:a].tolist() + [verdict.next_token]
        emitted = row.budget.take(proposed)
        if row.constraint is not None:  # constraint: roll back to the accepted prefix, advance by the next token
            row.constraint.commit(a, verdict.next_token)
        t4 = time.perf_counter()
        # Normally the accepted drafts; on the last step, only as far as the output goes, so the
        # caches hold exactly the tokens emitted.
        committed = min(a, len(emitted))
        cache = row.cache
        copied = w.copy is not None
        if w.record is not None:  # (None: strict.settle committed the caches itself)
            steps.commit(cache, w.record, accepted=committed, head=not copied)
        if model.has_mtp:
            if copied:
                # The head consumed nothing this step: every committed position (the pending
                # token's and the accepted copies') joins the backlog, as plain steps would add
                # them one by one, so the next draft leaves the head's cache as a head step would.
                if row.keeps_head:
                    extend_backlog(model, cache, w.hidden[:, : committed + 1], [row.pending] + proposed[:committed])
            elif w.depth:
                cache.backlog, cache.backlog_tokens = w.hidden[:, : committed + 1], proposed[:committed]
            elif row.keeps_head:  # nothing drafted, so the head consumed no rows: this position joins the backlog
                extend_backlog(model, cache, w.hidden[:, :1], row.pending)
        row.fed += [row.pending] + proposed[:committed]
        row.pending = verdict.next_token
        t5 = time.perf_counter()
        seconds = row.stats.seconds
        seconds["draft"] += draft_s
        seconds["verify"] += verify_s
        seconds["sample"] += t4 - t3
        seconds["rollback"] += t5 - t4
        if matched > a and len(emitted) == len(proposed):
            # Strict greedy stopped the step at a near-tie the draft won: no budget or EOS cut, so
            # every draft the verify accepted counts (count_step would count only those emitted).
            row.stats.record_step(w.depth, matched, len(emitted), copied)
        else:
            row.count_step(w.depth, matched, emitted, copied)
        if copied:
            row.lookup.observe(w.depth, matched)
        else:
            row.policy.observe(w.depth, matched)
        row.lookup.extend(emitted)
        row.emitted += emitted
        return Emitted(emitted, w.depth, a, w.lp.take(emitted))


def _enter_plain(row: Row) -> None:
    """Into the plain lane: the pending token (sampled and emitted, not yet consumed) is what the
    next pass feeds, with nothing of it left to read."""
    row.plain = True
    row.feed, row.feed_lp, row.unread = mx.array([row.pending], dtype=mx.int32), None, False


def _read_in_flight(row: Row) -> tuple[int, list[int], Any]:
    """The token a plain row's last pass sampled, read now: the token, what of it the budget
    emits, and its logprobs."""
    token = int(row.feed.item())
    emitted = row.budget.take([token])
    return token, emitted, row.feed_lp.take(emitted)


def _one_per_row(out: list[tuple[Row, Emitted]]) -> list[tuple[Row, Emitted]]:
    """A row that left the plain lane emitted twice this step (its token in flight, then its
    speculative step's): one emission per row and step, in order, as every caller expects."""
    merged: dict[int, tuple[Row, Emitted]] = {}
    for row, e in out:
        if row.id in merged:
            first = merged[row.id][1]
            lp = None if first.logprobs is None and e.logprobs is None else (first.logprobs or []) + (e.logprobs or [])
            e = Emitted(first.tokens + e.tokens, e.drafted, e.accepted, lp)
        merged[row.id] = (row, e)
    return list(merged.values())
