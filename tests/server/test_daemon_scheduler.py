"""The scheduler's choice, queue bounds and time estimates (pure, no model)."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.wire.errors import Busy, ShuttingDown
from daemon.scheduler import (
    BATCH,
    INTERACTIVE,
    Job,
    JobQueue,
    Policy,
    Preemption,
    Shape,
    StepTimes,
    choose,
    count_switches,
    estimate_queue,
    plan,
)

SHAPE = Shape("tiny", 64, 64, 2)


def job(name, stack, priority=INTERACTIVE, at=0.0, shape=SHAPE):
    return Job(job_id=name, priority=priority, stack_key=stack, shape=shape, enqueued_at=at)


def live(name, stack):
    """A job enqueued now (JobQueue.take measures waits against the real clock)."""
    return Job(job_id=name, priority=INTERACTIVE, stack_key=stack, shape=SHAPE)


def test_prefers_active_stack_over_older_job():
    a1, b1, a2 = job("a1", "A"), job("b1", "B"), job("a2", "A")
    assert choose([b1, a2], "A", now=1.0) is a2
    assert choose([a1, b1, a2], "B", now=1.0) is b1


def test_interactive_before_batch_even_on_other_stack():
    b = job("batch", "A", BATCH)
    i = job("inter", "B", INTERACTIVE)
    assert choose([b, i], "A", now=0.0) is i


def test_bypass_bound_prevents_starvation():
    old = job("old", "B")
    pol = Policy(max_bypass=3, max_wait_s=1e9)
    q = [old] + [job(f"a{i}", "A") for i in range(10)]
    order = [j.job_id for j in plan(q, "A", now=0.0, policy=pol)]
    assert order.index("old") == 3  # passed over exactly max_bypass times, then it goes


def test_wait_bound_prevents_starvation():
    old = job("old", "B", BATCH, at=0.0)
    fresh = job("new", "A", INTERACTIVE, at=99.0)
    assert choose([old, fresh], "A", now=100.0, policy=Policy(max_wait_s=50)) is old
    assert choose([old, fresh], "A", now=10.0, policy=Policy(max_wait_s=50)) is fresh


def test_plan_groups_stacks_and_saves_switches():
    rng = random.Random(1)
    stacks = [rng.choice("ABC") for _ in range(30)]
    q = [job(str(i), s) for i, s in enumerate(stacks)]
    fifo = count_switches(stacks)
    ours = count_switches([j.stack_key for j in plan(q, None, now=0.0, policy=Policy(max_bypass=100))])
    assert ours == 3 < fifo


@settings(max_examples=50)
@given(st.lists(st.tuples(st.sampled_from("ABCD"), st.sampled_from([INTERACTIVE, BATCH])), min_size=1, max_size=40))
def test_plan_is_a_permutation_and_bounded(items):
    pol = Policy(max_bypass=4, max_wait_s=1e9)
    q = [job(str(i), s, p) for i, (s, p) in enumerate(items)]
    order = plan(q, None, now=0.0, policy=pol)
    assert sorted(j.job_id for j in order) == sorted(j.job_id for j in q)
    for pos, j in enumerate(order):  # no job is overtaken by more than max_bypass + 1 later arrivals
        overtaken_by = sum(1 for k in order[:pos] if k.seq > j.seq)
        assert overtaken_by <= pol.max_bypass + 1
    assert not any(j.bypassed for j in q)  # plan does not touch the jobs


def test_queue_busy_when_full_and_refuses_after_close():
    async def go():
        q = JobQueue(capacity=2)
        q.submit(live("1", "A"))
        q.submit(live("2", "B"))
        with pytest.raises(Busy):
            q.submit(live("3", "A"))
        first = await q.take("B")
        assert first.job_id == "2"
        q.close()
        with pytest.raises(ShuttingDown):
            q.submit(live("4", "A"))
        assert (await q.take("B")).job_id == "1"
        assert await q.take("B") is None

    asyncio.run(go())


def test_batch_jobs_cannot_take_the_interactive_reserve():
    q = JobQueue(capacity=4, interactive_reserve=2)
    assert q.batch_capacity == 2
    q.submit(job("b1", "A", BATCH))
    q.submit(job("b2", "A", BATCH))
    with pytest.raises(Busy, match="batch jobs may fill 2 of its 4 slots") as err:
        q.submit(job("b3", "A", BATCH))
    assert err.value.details["queue_depth"] == 2
    q.submit(job("i1", "B"))  # the reserve is there for the game server
    q.submit(job("i2", "B"))
    with pytest.raises(Busy, match="queue is full"):
        q.submit(job("i3", "B"))
    assert [j.job_id for j in q.jobs] == ["b1", "b2", "i1", "i2"]


@pytest.mark.parametrize("reserve", [-1, 4, 5])
def test_interactive_reserve_must_leave_room_for_batch(reserve):
    with pytest.raises(ValueError, match="interactive_reserve"):
        JobQueue(capacity=4, interactive_reserve=reserve)


def test_queue_take_waits_for_submit_and_remove_drops():
    async def go():
        q = JobQueue(capacity=4)
        t = asyncio.create_task(q.take(None))
        await asyncio.sleep(0.01)
        assert not t.done()
        j1, j2 = live("1", "A"), live("2", "A")
        q.submit(j1)
        q.submit(j2)
        assert await t is j1
        assert q.remove(j2) and len(q) == 0 and not q.remove(j2)

    asyncio.run(go())


def test_step_times_exact_per_step_and_scaled():
    t = StepTimes(smoothing=1.0)
    assert t.estimate(SHAPE) is None
    t.observe(Shape("tiny", 64, 64, 2), denoise_s=4.0, other_s=1.0)
    assert t.estimate(Shape("tiny", 64, 64, 2)) == pytest.approx(5.0)
    assert t.estimate(Shape("tiny", 64, 64, 4)) == pytest.approx(2.0 * 4 + 1.0)
    assert t.estimate(Shape("tiny", 128, 64, 2)) == pytest.approx(10.0)  # twice the pixels
    assert t.estimate(Shape("dev", 64, 64, 2)) is None


def test_with_one_size_measured_a_step_scales_with_the_transformers_sequence_not_pixels():
    """From the tiny preset's 64 px step (0.67 s; 128 text tokens) pixels said 2.68 s at 128 px and 10.7 s at
    256 px, against 0.82 s and 1.49 s measured (bench/lora.py); the sequence (128 text + 16, 64 or 256 image
    tokens) says 0.89 s and 1.79 s. The overhead, mostly the VAE's decode, still scales by pixels."""
    t = StepTimes(smoothing=1.0, text_tokens={"tiny": 128})
    t.observe(Shape("tiny", 64, 64, 1), denoise_s=0.67, other_s=0.5)
    assert t.step_s(Shape("tiny", 128, 128, 4)) == pytest.approx(0.67 * (128 + 64) / (128 + 16))
    assert t.step_s(Shape("tiny", 256, 256, 4)) == pytest.approx(0.67 * (128 + 256) / (128 + 16))
    assert abs(t.step_s(Shape("tiny", 128, 128, 4)) - 0.82) / 0.82 < 0.1
    assert t.estimate(Shape("tiny", 128, 128, 4)) == pytest.approx(4 * 0.67 * 192 / 144 + 0.5 * 4)
    assert t.step_s(Shape("tiny", 32, 32, 1)) == pytest.approx(0.67 * (128 + 4) / (128 + 16))  # smaller: less
    other = StepTimes(smoothing=1.0, text_tokens={"tiny": 128})  # another preset's: pixels, as before
    other.observe(Shape("custom", 64, 64, 1), denoise_s=0.67, other_s=0.5)
    assert other.step_s(Shape("custom", 128, 128, 1)) == pytest.approx(0.67 * 4)


def test_what_a_render_pays_whatever_its_size_is_not_scaled_with_the_picture():
    """Encoding the prompt (0.4 s at any size when not cached) was scaled with the decode by pixels: 1.6 s
    of a 128 px estimate from 64 px. It is kept per preset and added once."""
    t = StepTimes(smoothing=1.0, text_tokens={"tiny": 128})
    t.observe(Shape("tiny", 64, 64, 1), denoise_s=0.67, other_s=0.45, fixed_s=0.4)
    assert t.estimate(Shape("tiny", 128, 128, 4)) == pytest.approx(4 * 0.67 * 192 / 144 + 0.45 * 4 + 0.4)
    assert t.estimate(Shape("tiny", 64, 64, 1)) == pytest.approx(0.67 + 0.45 + 0.4)  # this shape, as measured
    (row,) = t.table()
    assert row.overhead_s == pytest.approx(0.85)  # what a render of that size pays besides its steps


def test_the_presets_text_tokens_are_mfluxs_or_their_own():
    from mflux.models.common.config.model_config import ModelConfig

    from daemon.engine.presets import PRESETS

    for p in PRESETS.values():
        mflux = getattr(ModelConfig, p.mflux_config)().max_sequence_length
        assert p.text_tokens == (p.t5_max_length or mflux)
    assert PRESETS["tiny"].text_tokens == 128 and PRESETS["schnell"].text_tokens == 256


def test_an_unmeasured_size_is_read_off_the_line_through_the_two_nearest_measured_sizes():
    """Per-step times of the tiny preset from bench/lora.py (0.67 s at 64 px, 0.82 s at 128 px, 1.49 s at
    256 px): from 64 and 128 px the line gives 256 px within 5 %, where pixels alone gave 10.7 s a step."""
    t = StepTimes(smoothing=1.0)
    t.observe(Shape("tiny", 64, 64, 1), denoise_s=0.67, other_s=1.0)
    t.observe(Shape("tiny", 128, 128, 1), denoise_s=0.82, other_s=1.3)
    assert t.step_s(Shape("tiny", 256, 256, 6)) == pytest.approx(0.67 + 0.15 * 60 / 12, rel=1e-9)  # 1.42 s
    assert abs(t.step_s(Shape("tiny", 256, 256, 6)) - 1.49) / 1.49 < 0.05
    assert t.estimate(Shape("tiny", 256, 256, 6)) == pytest.approx(6 * 1.42 + (1.0 + 0.3 * 60 / 12))
    assert t.step_s(Shape("tiny", 96, 96, 1)) == pytest.approx(0.67 + 0.15 * 5 / 12)  # between the two
    t.observe(Shape("tiny", 512, 512, 1), denoise_s=4.0, other_s=2.0)
    assert t.step_s(Shape("tiny", 384, 384, 1)) == pytest.approx(0.82 + (4.0 - 0.82) * (144 - 16) / (256 - 16))
    noisy = StepTimes(smoothing=1.0)  # the larger size measured faster: the line falls below zero further up
    noisy.observe(Shape("tiny", 64, 64, 1), denoise_s=1.0, other_s=0.5)
    noisy.observe(Shape("tiny", 128, 128, 1), denoise_s=0.9, other_s=0.5)
    assert noisy.step_s(Shape("tiny", 1024, 1024, 1)) == pytest.approx(0.9 * 64)  # scaled from 128 px instead


def test_estimates_follow_the_plan_and_add_switch_cost():
    t = StepTimes(smoothing=1.0)
    t.observe(SHAPE, 2.0, 0.0)
    t.observe_switch(1.0)
    q = [job("b", "B"), job("a", "A")]
    est = estimate_queue(q, "A", 0.0, t, running_left_s=3.0)
    assert est["a"] == (3.0, 5.0)  # same stack as active: goes first, no switch
    assert est["b"] == (5.0, 8.0)  # then a switch (1s) + render (2s)
    assert estimate_queue(q, "A", 0.0, StepTimes(), 0.0)["b"] == (None, None)


def owned(name, stack, owner, priority=BATCH):
    return Job(job_id=name, priority=priority, stack_key=stack, shape=SHAPE, enqueued_at=0.0, owner=owner)


@settings(max_examples=60)
@given(
    st.lists(st.sampled_from("ABC"), min_size=4, max_size=30),
    st.lists(st.sampled_from("ABC"), min_size=4, max_size=30),
    st.sampled_from([0.0, 1.0, 2.0]),
    st.sampled_from([2, 8, 100]),
)
def test_two_backlogged_owners_stay_within_the_fair_bound(first, second, slack, max_bypass):
    q = [owned(f"a{i}", s, "a") for i, s in enumerate(first)] + [owned(f"b{i}", s, "b") for i, s in enumerate(second)]
    pol = Policy(max_bypass=max_bypass, max_wait_s=1e9, fair_slack=slack)
    order = plan(q, None, now=0.0, policy=pol)
    a = b = 0
    for j in order:
        if a == len(first) or b == len(second):
            break  # one of them has nothing left queued: the bound is about backlogged owners
        a, b = a + (j.owner == "a"), b + (j.owner == "b")
        assert abs(a - b) <= slack + 1


def test_affinity_still_saves_switches_within_the_fair_bound():
    for seed in range(1, 4):
        rng = random.Random(seed)
        q = [owned(f"{o}{i}", rng.choice("ABC"), o) for o in "ab" for i in range(20)]
        fifo = count_switches([j.stack_key for j in q])
        fair = count_switches([j.stack_key for j in plan(q, None, now=0.0, policy=Policy(max_wait_s=1e9))])
        assert fair * 3 < fifo


def test_an_owner_back_from_idle_gets_no_credit_for_it():
    async def go():
        q = JobQueue(capacity=16)
        for i in range(4):
            q.submit(owned(f"a{i}", "A", "a"))
        for _ in range(3):
            await q.take("A")
        q.submit(owned("b0", "A", "b"))  # b starts level with a, not three renders behind it
        assert q.vtimes[(BATCH, "b")] == q.vtimes[(BATCH, "a")]

    asyncio.run(go())


def test_a_starving_job_makes_its_class_go_next_in_fair_order():
    old = owned("old", "B", "a")
    old.enqueued_at = 0.0
    fresh = Job(job_id="inter", priority=INTERACTIVE, stack_key="A", shape=SHAPE, enqueued_at=99.0)
    assert choose([old, fresh], "A", now=100.0, policy=Policy(max_wait_s=50)) is old


def test_estimates_put_queued_interactive_jobs_at_the_running_batch_jobs_next_step():
    t = StepTimes(smoothing=1.0)
    t.observe(SHAPE, 2.0, 0.0)  # 1 s per step
    q = [job("i", "A", INTERACTIVE), owned("b", "A", "x")]
    est = estimate_queue(q, "A", 0.0, t, running_left_s=1.5, preempt=Preemption(0.5, 8, "A"))
    assert est["i"] == (0.5, 2.5)  # at the boundary, then its own 2 s
    assert est["b"] == (3.5, 5.5)  # after the running job's last 1 s


def test_a_flood_that_waited_long_still_groups_stacks_and_stays_fair():
    rng = random.Random(5)
    q = [owned(f"{o}{i}", rng.choice("ABC"), o) for o in "ab" for i in range(20)]
    order = plan(q, None, now=1000.0, policy=Policy(max_wait_s=120.0))  # every job is past max_wait_s
    assert count_switches([j.stack_key for j in order]) * 3 < count_switches([j.stack_key for j in q])
    a = b = 0
    for j in order[:30]:
        a, b = a + (j.owner == "a"), b + (j.owner == "b")
        assert abs(a - b) <= 2


def test_with_preemption_a_long_batch_wait_does_not_go_before_an_interactive_job():
    old = job("old", "B", BATCH, at=0.0)
    fresh = job("new", "A", INTERACTIVE, at=99.0)
    assert choose([old, fresh], "A", now=100.0, policy=Policy(max_wait_s=50, preempt=True)) is fresh
    old.bypassed = 8  # passed over max_bypass times: it goes, preemption or not
    assert choose([old, fresh], "A", now=100.0, policy=Policy(max_wait_s=50, preempt=True)) is old
