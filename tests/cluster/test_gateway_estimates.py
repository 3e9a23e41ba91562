"""What the gateway's `status` says of a forwarded render's start and finish (daemon/cluster/gateway.py):
the replica's own estimate for a job it queues, aged by the time since it came, and for a running job the
replica's step time at its size, or the pace of its steps so far."""

from __future__ import annotations

import pytest

from client.wire.messages import Render, StepTime

pytestmark = pytest.mark.ray  # daemon.cluster imports Ray


def job(**fields):
    from daemon.cluster.gateway import ClusterJob

    return ClusterJob(job_id="c1:1", request=Render(id="r1", prompt="fox"), listener=None, **fields)


def estimates(j, times=None, now=100.0):
    from daemon.cluster.gateway import _estimates

    return _estimates(j, times or {}, now)


def test_a_job_no_replica_has_estimated_is_unknown():
    assert estimates(job()) == {"estimated_start_s": None, "estimated_finish_s": None}


def test_a_queued_job_keeps_its_replicas_estimate_less_the_time_since():
    from daemon.runner import Estimate

    j = job(forecast=Estimate(5.0, 9.0), forecast_at=97.5)
    assert estimates(j) == {"estimated_start_s": 2.5, "estimated_finish_s": 6.5}
    assert estimates(j, now=110.0) == {"estimated_start_s": 0.0, "estimated_finish_s": 0.0}  # late: not negative
    j = job(forecast=Estimate(None, None), forecast_at=97.5)  # nothing comparable measured on that replica yet
    assert estimates(j) == {"estimated_start_s": None, "estimated_finish_s": None}


def test_a_running_job_finishes_by_its_replicas_step_time_at_its_size():
    from daemon.scheduler import Shape

    shape = Shape("tiny", 64, 64, 10)
    times = {("tiny", 64, 64): StepTime("tiny", 64, 64, step_s=0.5, overhead_s=1.0)}
    j = job(state="running", shape=shape, step=4, elapsed_s=3.0, step_at=99.0)
    # 10 steps of 0.5 s and 1 s besides: 6 s in all, 3 s of them gone at step 4, and 1 s since
    assert estimates(j, times) == {"estimated_start_s": 0.0, "estimated_finish_s": 2.0}
    other = {("tiny", 128, 128): StepTime("tiny", 128, 128, step_s=2.0, overhead_s=1.0)}
    # no step time at its size: its own pace, 0.75 s a step, for the 6 steps left, less the 1 s since
    assert estimates(j, other) == {"estimated_start_s": 0.0, "estimated_finish_s": 3.5}
    assert estimates(job(state="running", shape=shape, step=None)) == {
        "estimated_start_s": 0.0,
        "estimated_finish_s": None,
    }
