"""What a task, or another client, of a Dask cluster served by
``CredstreamPlugin`` can read of the agent token and the seal key
(finding 2 of issue 34).

One world for the module: ``credstream-broker --dev``, ``dask scheduler``
and two ``dask worker`` processes sharing one "host", and publishers in
this process that publish only a private env (no cloud identity needed:
the secrets under test are the agent token and the seal key). Tests run in
file order: session A is served, probed, then replaced by session B of the
same cluster name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from distributed import Client

import credstream
from credstream.dask import CredstreamPlugin

from conftest import agent_infos, start_broker, start_scheduler, wait_until
from dask_tasks import getenv, plugin_state, probe_memory

# The dev broker's tokens are for cluster "dev".
CLUSTER = "dev"
VALUE_A = "session-a-value-5d1e"
VALUE_B = "session-b-value-93c0"


@pytest.fixture(scope="module")
def world(log_dir: str) -> Iterator[dict[str, Any]]:
    world: dict[str, Any] = {"publishers": []}
    cleanup: list[Callable[[], object]] = []
    directory = os.path.join(log_dir, "secrets")
    os.makedirs(directory, exist_ok=True)
    try:
        broker = world["broker"] = start_broker(directory)
        cleanup.append(broker.proc.stop)
        # No cloud calls here: the workers only ever talk to the broker.
        cluster = world["cluster"] = start_scheduler(directory, "http://127.0.0.1:9")
        cleanup.append(cluster.close)
        # Root's CAP_SYS_PTRACE reads any process, dumpable or not; an
        # ordinary user has no such capability. As root (CI), the workers,
        # and so every process they start, run without it.
        prefix: tuple[str, ...] = ()
        if os.geteuid() == 0:
            prefix = ("setpriv", "--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace")
        cluster.add_worker("host-s", "s1", prefix)
        cluster.add_worker("host-s", "s2", prefix)
        client = world["client"] = Client(  # type: ignore[no-untyped-call]
            scheduler_file=cluster.scheduler_file, timeout=60
        )
        cleanup.append(client.close)
        client.wait_for_workers(2, timeout=120)
        yield world
    finally:
        for publisher in world["publishers"]:
            publisher.close()
        for stop in reversed(cleanup):
            stop()


def _publisher(world: dict[str, Any], value: str) -> credstream.Publisher:
    broker = world["broker"]
    publisher = credstream.Publisher(
        broker=broker.url,
        cluster=CLUSTER,
        token=broker.publisher_token,
        aws=False,
        gcp=False,
        env={"SESSION_VALUE": value},
        seal_key="session",
    )
    world["publishers"].append(publisher)
    return publisher


def _host_agent(world: dict[str, Any]) -> dict[str, Any]:
    runtime = world["cluster"].worker_env("host-s")["XDG_RUNTIME_DIR"]
    infos = agent_infos(runtime)
    assert len(infos) == 1, infos
    return infos[0]


def _agent_log(info: dict[str, Any]) -> str:
    with open(os.path.join(info["directory"], "agent.log"), errors="replace") as f:
        return f.read()


def _every_worker_sees(client: Client, value: str) -> None:
    def arrived() -> bool:
        values = [v for _, v in client.run(getenv, "SESSION_VALUE").values()]
        return values == [value, value]

    wait_until(f"SESSION_VALUE={value} on both workers", arrived, timeout=60)


def test_a_session_key_is_in_no_file_and_the_plugin_from_the_publisher_carries_it(
    world: dict[str, Any], seal_key_dir: str
) -> None:
    broker, client = world["broker"], world["client"]
    publisher = _publisher(world, VALUE_A)
    assert publisher.sealed
    assert publisher.seal_key_id is not None
    assert publisher.seal_key_file is None
    assert "in memory only" in publisher.sealing, publisher.sealing
    line = publisher._session_seal_key()
    assert line is not None
    assert line.startswith(f"credstream-seal-v1:{CLUSTER}:")
    assert line not in publisher.sealing
    assert line not in repr(publisher)
    # In no key file (nor any other file of the session's config directory).
    for root, _, files in os.walk(seal_key_dir):
        for name in files:
            with open(os.path.join(root, name), errors="replace") as f:
                assert line not in f.read(), os.path.join(root, name)
    world["key_a"] = (line, publisher.seal_key_id)

    plugin = CredstreamPlugin.from_publisher(publisher, broker.agent_token)
    assert plugin.sealed
    assert plugin.seal_key_id == publisher.seal_key_id
    assert plugin.broker == broker.url
    assert plugin.cluster == CLUSTER
    assert line not in repr(plugin)
    assert broker.agent_token not in repr(plugin)
    client.register_plugin(plugin)
    _every_worker_sees(client, VALUE_A)
    log = _agent_log(_host_agent(world))
    assert f"only sealed updates are accepted key_id={publisher.seal_key_id}" in log, log


def test_a_task_finds_neither_the_agent_token_nor_the_seal_key_in_the_worker_plugin(
    world: dict[str, Any],
) -> None:
    broker, client = world["broker"], world["client"]
    line, key_id = world["key_a"]
    secret = line.rsplit(":", 1)[1]
    workers = list(client.scheduler_info()["workers"])
    assert len(workers) == 2
    for address in workers:
        state = client.submit(plugin_state, "credstream", workers=[address], pure=False).result(
            timeout=60
        )
        seen = repr(state["vars"]) + state["repr"]
        assert broker.agent_token not in seen, "the agent token left the worker's plugin"
        assert secret not in seen, "the seal key left the worker's plugin"
        assert broker.agent_token.encode() not in state["pickle"]
        assert secret.encode() not in state["pickle"]
        # What is left says what it was, not what it held.
        assert repr(key_id) in state["vars"]["seal_key_id"]
    # The scheduler keeps the registered plugin, pickled, for workers that
    # join later: another client of the cluster reads both from there (the
    # documented limit; the session key and a short token bound its worth).
    copies = client.run_on_scheduler(_scheduler_plugins)
    assert broker.agent_token.encode() in copies["credstream"]
    assert secret.encode() in copies["credstream"]


def _scheduler_plugins(dask_scheduler: Any) -> dict[str, bytes]:
    plugins: dict[str, bytes] = dask_scheduler.worker_plugins
    return dict(plugins)


def test_a_task_of_the_same_user_cannot_read_the_supervisors_or_the_agents_memory(
    world: dict[str, Any],
) -> None:
    client = world["client"]
    info = _host_agent(world)
    pids = {"supervisor": int(info["supervisor_pid"]), "agent": int(info["agent_pid"])}
    workers = list(client.scheduler_info()["workers"])
    # Every worker on the host, the supervisor's parent (the first to
    # attach) among them.
    for address in workers:
        found = client.submit(probe_memory, pids, workers=[address], pure=False).result(timeout=90)
        # The probe can read the memory of a dumpable process of its user...
        assert found["control"] == {"mem": "read", "environ": "read"}, found
        # ...and not theirs. (`environ` is closed too for an ordinary user:
        # a non-dumpable process's /proc files belong to root. Root without
        # CAP_SYS_PTRACE, as here, passes that check and reads `environ`,
        # which holds no secret: test_dask checks.)
        for label in ("supervisor", "agent"):
            assert found[label]["mem"] == "PermissionError", (label, found)
            if os.geteuid() != 0:
                assert found[label]["environ"] == "PermissionError", (label, found)


def test_a_second_session_of_the_same_cluster_has_another_key_which_the_first_agents_refuse(
    world: dict[str, Any],
) -> None:
    broker, client = world["broker"], world["client"]
    line_a, key_a = world["key_a"]
    first = world["publishers"][0]
    first.close()
    agent_a = _host_agent(world)
    second = _publisher(world, VALUE_B)
    line_b = second._session_seal_key()
    assert second.seal_key_id != key_a
    assert line_b is not None
    assert line_b != line_a

    def refused() -> str | None:
        lines = [
            entry
            for entry in _agent_log(agent_a).splitlines()
            if "refused an update" in entry and "another key" in entry
        ]
        return lines[-1] if lines else None

    line = wait_until("session A's agent to refuse session B's env", refused, timeout=60)
    assert re.search(rf"key id {second.seal_key_id}\b", line), line
    assert VALUE_B not in _agent_log(agent_a)
    # It keeps serving the last good value, session A's.
    values = [v for _, v in client.run(getenv, "SESSION_VALUE").values()]
    assert values == [VALUE_A, VALUE_A]

    # Session B's plugin (same name: A's is torn down) serves B.
    client.register_plugin(CredstreamPlugin.from_publisher(second, broker.agent_token))
    _every_worker_sees(client, VALUE_B)
    agent_b = _host_agent(world)
    assert agent_b["agent_pid"] != agent_a["agent_pid"]
    log = _agent_log(agent_b)
    assert f"only sealed updates are accepted key_id={second.seal_key_id}" in log


def test_a_session_key_with_a_key_file_or_without_sealing_is_refused(
    world: dict[str, Any],
) -> None:
    broker = world["broker"]
    for extra in ({"seal": False}, {"seal_key_file": "/nonexistent/secrets.key"}):
        with pytest.raises(credstream.ConfigurationError, match='seal_key="session"'):
            credstream.Publisher(
                broker=broker.url,
                cluster=CLUSTER,
                token=broker.publisher_token,
                aws=False,
                gcp=False,
                env={"A": "b"},
                seal_key="session",
                **extra,
            )
    with pytest.raises(credstream.ConfigurationError, match=r'"file" .* or "session"'):
        credstream.Publisher(
            broker=broker.url,
            cluster=CLUSTER,
            token=broker.publisher_token,
            aws=False,
            gcp=False,
            env={"A": "b"},
            seal_key="cluster",  # type: ignore[arg-type]
        )
