"""Ray's failures become one-line causes: `replica_failed` names the replica and the cause, never a traceback."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

import ray.exceptions as rex  # noqa: E402

from daemon.cluster.faults import cause_of, concise_failure  # noqa: E402

SERVE_TEXT = (  # the shape of Serve's message for a deployment whose constructor raised
    "Deploying application easel-broken failed: Failed to update the deployments ['EaselReplica'].\n"
    "The deployment failed to start 1 times in a row. This may be due to a problem with its constructor or "
    "initial health check failing. See controller logs for details. Error:\n"
    "\x1b[36mray::ServeReplica:easel-broken:EaselReplica.initialize_and_get_metadata()\x1b[39m (pid=4242, "
    "ip=10.0.0.7, actor_id=3f0c, repr=<ray.serve._private.replica.ServeReplica object at 0x7f00>)\n"
    "Traceback (most recent call last):\n"
    '  File "/srv/easel/daemon/service.py", line 140, in load\n'
    "    model = load_model(config.preset, config.model_path)\n"
    "client.wire.errors.WeightsNotFound: preset dev: no checkpoint at /tmp/empty\n"
)


def test_a_serve_failure_is_its_first_sentence_and_what_the_replica_raised():
    msg = concise_failure(SERVE_TEXT)
    assert msg == (
        "Deploying application easel-broken failed: Failed to update the deployments ['EaselReplica']; "
        "the replica raised WeightsNotFound: preset dev: no checkpoint at /tmp/empty"
    )
    assert concise_failure("") == "no reason given"
    assert concise_failure("just one line.") == "just one line"


def test_a_remote_error_is_its_own_type_and_first_line():
    cause = ValueError("bad shape\nsecond line of detail")
    wrapped = rex.RayTaskError("render", "Traceback (most recent call last):\n  File ...", cause)
    assert cause_of(wrapped) == "ValueError: bad shape"
    assert cause_of(RuntimeError("x" * 1000)).endswith("...") and len(cause_of(RuntimeError("x" * 1000))) == 400
