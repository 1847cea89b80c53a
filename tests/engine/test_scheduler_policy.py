"""Scheduler policy without a model: budgets, chunking, FCFS admission, page accounting, preemption, stops."""

from __future__ import annotations

import pytest

from moed.engine.kv_pages import KVPages
from moed.engine.protocol import SamplingParams
from moed.engine.scheduler import Scheduler, SchedulerConfig
from moed.engine.sequence import PENDING, Sequence, SequenceStatus


def _seq(i: int, prompt_len: int, **sampling) -> Sequence:
    return Sequence(f"r{i}", list(range(1, prompt_len + 1)), SamplingParams(**sampling), seed=i, arrival=i)


def _sched(pages=64, page_size=4, **cfg) -> tuple[Scheduler, list[Sequence]]:
    released: list[Sequence] = []
    kv = KVPages(pages, page_size)
    cfg.setdefault("max_model_len", 10_000)
    cfg.setdefault("max_running", 4)
    return Scheduler(SchedulerConfig(**cfg), kv, released.append), released


def _run(sched: Scheduler, batch, sampled_token: int = 5) -> None:
    """What the engine does after a step: commit the chunk, append a token where the step samples."""
    for it in batch.items:
        samples = it.samples
        it.seq.num_computed += it.num_prompt_chunk
        if samples:
            sched.append_tokens(it.seq, [sampled_token], frozenset())


def test_scheduler_chunked_prefill_under_token_budget():
    s, _ = _sched(max_running=4, max_tokens_per_step=8)
    a, b = _seq(1, 13), _seq(2, 3)
    s.add(a)
    s.add(b)
    batch = s.schedule()
    assert [(it.seq.request_id, it.num_new) for it in batch.items] == [("r1", 8)]
    assert not batch.items[0].samples
    _run(s, batch)
    batch = s.schedule()  # a's last 5 prompt tokens, then b's 3
    assert [(it.seq.request_id, it.num_new, it.samples) for it in batch.items] == [("r1", 5, True), ("r2", 3, True)]
    _run(s, batch)
    batch = s.schedule()  # both decode now
    assert [(it.seq.request_id, it.num_new) for it in batch.items] == [("r1", 1), ("r2", 1)]
    assert batch.is_decode


def test_scheduler_decode_goes_first_then_prefill_chunks():
    s, _ = _sched(max_running=4, max_tokens_per_step=6)
    a = _seq(1, 2)
    s.add(a)
    _run(s, s.schedule())
    assert a.in_decode
    b = _seq(2, 20)
    s.add(b)
    batch = s.schedule()
    assert [(it.seq.request_id, it.num_new) for it in batch.items] == [("r1", 1), ("r2", 5)]


def test_scheduler_fcfs_head_blocks_and_max_running():
    s, _ = _sched(pages=6, page_size=4, max_running=2, max_tokens_per_step=64)
    a, b, c = _seq(1, 16), _seq(2, 12), _seq(3, 1)
    for q in (a, b, c):
        s.add(q)
    batch = s.schedule()
    # a takes 4 of 6 pages; b needs 3 (> 2 free) and blocks c behind it although c would fit.
    assert [it.seq.request_id for it in batch.items] == ["r1"]
    assert [q.request_id for q in s.waiting] == ["r2", "r3"]
    s.finish(a, "stop")
    assert s.kv.num_free == 6
    batch = s.schedule()
    assert [it.seq.request_id for it in batch.items] == ["r2", "r3"]
    d = _seq(4, 1)
    s.add(d)
    _run(s, batch)
    batch = s.schedule()  # max_running = 2: d waits
    assert [it.seq.request_id for it in batch.items] == ["r2", "r3"] and list(s.waiting) == [d]


def test_scheduler_pages_follow_tokens():
    s, _ = _sched(pages=16, page_size=4, max_tokens_per_step=64)
    a = _seq(1, 7)
    s.add(a)
    _run(s, s.schedule())
    assert len(a.pages) == 2 and a.num_computed == 7 and a.num_tokens == 8
    _run(s, s.schedule())  # decode writes position 7: still page 2
    assert len(a.pages) == 2
    _run(s, s.schedule())  # position 8 needs a third page
    assert len(a.pages) == 3 and s.kv.num_used == 3


def test_scheduler_preempts_latest_arrival_and_requeues_it_first():
    s, released = _sched(pages=4, page_size=4, max_running=4, max_tokens_per_step=64)
    a, b = _seq(1, 8), _seq(2, 8)
    s.add(a)
    s.add(b)
    _run(s, s.schedule())  # 2 pages each: the pool is full
    assert s.kv.num_free == 0
    c = _seq(3, 2)
    s.add(c)
    batch = s.schedule()  # a needs a 3rd page: b (latest running) is preempted; c cannot be admitted
    assert [it.seq.request_id for it in batch.items] == ["r1"]
    assert batch.preempted == [b] and released == [b]
    assert b.status is SequenceStatus.WAITING and b.num_computed == 0 and b.pages == [] and b.num_tokens == 9
    assert [q.request_id for q in s.waiting] == ["r2", "r3"]  # b goes back before the later c
    assert s.num_preemptions == 1


def test_scheduler_preempts_itself_when_it_is_the_latest():
    s, _ = _sched(pages=4, page_size=4, max_running=4, max_tokens_per_step=64)
    a, b = _seq(1, 5), _seq(2, 8)
    s.add(a)
    s.add(b)
    _run(s, s.schedule())  # 2 pages each
    batch = s.schedule()  # a fits its page; b needs a third page and is itself the latest arrival
    assert [it.seq.request_id for it in batch.items] == ["r1"] and batch.preempted == [b]
    assert b.status is SequenceStatus.WAITING and s.kv.num_free == 2
    s.finish(a, "stop")
    batch = s.schedule()  # b comes back and recomputes prompt + its sampled token
    assert [(it.seq.request_id, it.num_new, it.samples) for it in batch.items] == [("r2", 9, True)]


def test_scheduler_abort_frees_everything_anywhere():
    s, released = _sched(pages=16, page_size=4, max_running=2, max_tokens_per_step=8)
    a, b, c = _seq(1, 20), _seq(2, 3), _seq(3, 3)
    for q in (a, b, c):
        s.add(q)
    s.schedule()  # a mid-prefill (8 of 20)
    assert a.pages and s.abort("r1") is a
    assert a.finish_reason == "abort" and a.pages == [] and s.kv.num_free == 16 and a in released
    assert s.abort("r3", "stop") is c and c.finish_reason == "stop"  # still waiting
    assert s.abort("r1") is None and s.abort("nope") is None
    _run(s, s.schedule())
    s.abort("r2")
    assert not s.has_work and s.kv.num_free == 16


def test_scheduler_stops():
    s, _ = _sched(max_tokens_per_step=64)
    eos = frozenset({9})
    a = _seq(1, 3, max_tokens=3, stop_token_ids=[42])
    s.add(a)
    s.schedule()
    assert s.append_tokens(a, [11, 42, 12], eos) == 2 and a.finish_reason == "stop" and a.output_token_ids == [11, 42]
    b = _seq(2, 3, max_tokens=2)
    s.add(b)
    s.schedule()
    assert s.append_tokens(b, [9], eos) == 1 and b.finish_reason == "stop"
    c = _seq(3, 3, max_tokens=2, ignore_eos=True)
    s.add(c)
    s.schedule()
    assert s.append_tokens(c, [9, 9, 9], eos) == 2 and c.finish_reason == "length"


def test_scheduler_config_and_pool_errors():
    with pytest.raises(ValueError, match="max_tokens_per_step=8 is below"):
        SchedulerConfig(max_running=4, max_tokens_per_step=8, num_spec_tokens=2)
    with pytest.raises(ValueError, match="too small"):
        _sched(pages=1, page_size=2, num_spec_tokens=1, max_running=1, max_tokens_per_step=8)
    with pytest.raises(ValueError, match="already in flight"):
        s, _ = _sched()
        s.add(_seq(1, 2))
        s.add(_seq(1, 2))


def test_scheduler_reserves_draft_lookahead():
    s, _ = _sched(pages=64, page_size=1, max_running=2, max_tokens_per_step=64, num_spec_tokens=3)
    a = _seq(1, 5)
    s.add(a)
    s.schedule()
    assert len(a.pages) == 5 + 2  # the prompt, and the k - 1 positions the drafter writes past it
    a.num_computed = 5
    a.token_ids.append(7)
    a.draft_token_ids = [1, 2, 3]
    batch = s.schedule()
    assert batch.items[0].num_new == 4 and batch.items[0].input_token_ids() == [7, 1, 2, 3]
    assert len(a.pages) == 5 + 6  # 1 + k verified, then up to k - 1 drafted past the accepted ones


def _launch(sched: Scheduler, batch) -> None:
    """What the overlapped engine does at launch: commit the chunk, a placeholder where the step samples."""
    for it in batch.items:
        it.seq.num_computed += it.num_prompt_chunk
        if it.seq.num_computed == it.seq.num_tokens:
            it.seq.token_ids.append(PENDING)
            it.seq.num_pending += 1


def test_scheduler_pending_tokens_resolve_in_order_and_stop_drops_later_ones():
    s, _ = _sched(max_tokens_per_step=64)
    eos = frozenset({9})
    a = _seq(1, 3, max_tokens=10, stop_token_ids=[42])
    s.add(a)
    _launch(s, s.schedule())
    assert a.in_decode and a.num_pending == 1 and a.num_known == 3
    batch = s.schedule()  # decodes on the pending token before it is known
    assert batch.items[0].input_token_ids() == [PENDING]
    _launch(s, batch)
    assert a.num_pending == 2 and a.num_output_tokens == 2
    with pytest.raises(RuntimeError, match="first pending"):
        s.resolve_token(a, 4, 5, eos)
    assert not s.resolve_token(a, 3, 11, eos) and a.num_known == 4 and a.token_ids[-1] == PENDING
    _launch(s, s.schedule())
    assert s.resolve_token(a, 4, 42, eos) and a.finish_reason == "stop"
    assert a.output_token_ids == [11, 42] and a.num_pending == 0 and a.pages == [] and s.kv.num_free == 64


def test_scheduler_does_not_schedule_a_sequence_its_pending_tokens_finish():
    s, _ = _sched(max_tokens_per_step=64)
    a, b = _seq(1, 3, max_tokens=2), _seq(2, 3, max_tokens=5)
    s.add(a)
    s.add(b)
    _launch(s, s.schedule())
    _launch(s, s.schedule())  # a's second (last) token is now pending
    assert s.will_finish(a) and not s.will_finish(b)
    assert [it.seq.request_id for it in s.schedule().items] == ["r2"]
    s.resolve_token(a, 3, 7, frozenset())
    assert not a.is_finished
    s.resolve_token(a, 4, 8, frozenset())
    assert a.finish_reason == "length" and a.output_token_ids == [7, 8]


def test_scheduler_holds_back_a_preempted_sequence_until_its_token_resolves():
    s, _ = _sched(pages=4, page_size=4, max_running=4, max_tokens_per_step=64)
    a, b = _seq(1, 8), _seq(2, 7)
    s.add(a)
    s.add(b)
    _launch(s, s.schedule())  # 2 pages each: the pool is full; both have a pending token
    s.finish(a, "abort")
    a2 = _seq(3, 8)
    s.add(a2)
    _launch(s, s.schedule())  # a2 takes a's pages; b decodes into its second page
    batch = s.schedule()  # b needs a third page: a2, the latest arrival, is preempted with its token in flight
    assert batch.preempted == [a2] and a2.num_pending == 1 and a2.status is SequenceStatus.WAITING
    s.finish(b, "stop")
    assert s.schedule().items == []  # a2 waits at the head until its token is read back
    s.resolve_token(a2, 8, 5, frozenset())
    batch = s.schedule()
    assert [(it.seq.request_id, it.num_new) for it in batch.items] == [("r3", 9)]
    assert batch.items[0].input_token_ids()[-1] == 5
