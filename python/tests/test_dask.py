"""A real Dask cluster served by ``credstream.dask.CredstreamPlugin``.

One world for the module: moto enforcing auth, a local OAuth2 token
endpoint, ``credstream-broker --dev --refresh-at 0.1``, a
``credstream.Publisher`` in this process (the "laptop") minting the
``cluster-reader`` role through moto's STS and a Google token from a
service-account key, and ``dask scheduler`` with two ``dask worker``
processes that share one "host" (one runtime dir) and have no credentials
of their own. The plugin is registered from this process, which is neither
the scheduler nor a worker. Tests run in file order and build on each
other (a late worker joins, then the publisher closes with revoke; then an
unsealed publisher is refused by the sealed agents and served by an
unsealed plugin).

Sealing is on (the default of both ``Publisher`` and ``CredstreamPlugin``):
the key is created in the session's config directory by the publisher and
read from there by the plugin, which carries it to the agents.
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pytest
from distributed import Client

import credstream
from credstream.dask import CredstreamPlugin, send_private_envs

from conftest import (
    GCP_EMAIL,
    GCP_PROJECT,
    TokenEndpoint,
    agent_infos,
    laptop_env,
    read_seal_key,
    seed_moto,
    service_account_key,
    start_broker,
    start_moto,
    start_scheduler,
    wait_until,
)

if TYPE_CHECKING:
    from typing_extensions import Self

from dask_tasks import (
    environ_values,
    getenv,
    google_default,
    read_both,
    read_through_rotation,
    try_read,
)

DB_TOKEN = "custom-db-token-7f3a"
LATE_VALUE = "sent-after-registration-41b2"


# --- the world --------------------------------------------------------------


@pytest.fixture(scope="module")
def world(log_dir: str) -> Iterator[dict[str, Any]]:
    saved = dict(os.environ)
    world: dict[str, Any] = {"publisher": None, "log_dir": log_dir}
    cleanup: list[Callable[[], object]] = []
    try:
        moto = world["moto"] = start_moto(log_dir)
        cleanup.append(moto.proc.stop)
        seed_moto(moto)
        endpoint = world["endpoint"] = TokenEndpoint()
        cleanup.append(endpoint.close)
        laptop_home = os.path.join(log_dir, "laptop")
        os.makedirs(os.path.join(laptop_home, "gcloud"), exist_ok=True)
        key_file = service_account_key(log_dir, f"{endpoint.url}/token")
        audit_log = world["audit_log"] = os.path.join(log_dir, "audit.jsonl")
        broker = world["broker"] = start_broker(
            log_dir, "--refresh-at", "0.1", "--audit-log", audit_log
        )
        cleanup.append(broker.proc.stop)
        cluster = world["cluster"] = start_scheduler(log_dir, moto.url)
        cleanup.append(cluster.close)
        cluster.add_worker("host-a", "a1")
        cluster.add_worker("host-a", "a2")
        client = world["client"] = Client(  # type: ignore[no-untyped-call]
            scheduler_file=cluster.scheduler_file, timeout=60
        )
        cleanup.append(client.close)
        client.wait_for_workers(2, timeout=120)
        os.environ.update(laptop_env(moto, laptop_home, key_file))
        yield world
    finally:
        os.environ.clear()
        os.environ.update(saved)
        if world["publisher"] is not None:
            world["publisher"].close()
        for stop in reversed(cleanup):
            stop()


def test_workers_without_the_plugin_have_no_credentials(world: dict[str, Any]) -> None:
    moto, client = world["moto"], world["client"]
    results = client.run(try_read, moto.bucket, moto.key)
    assert len(results) == 2
    for outcome in results.values():
        assert outcome.startswith("botocore.exceptions.NoCredentialsError"), outcome


def test_every_worker_reads_with_credentials_the_python_publisher_minted(
    world: dict[str, Any],
) -> None:
    moto, broker, client = world["moto"], world["broker"], world["client"]
    with _NoWarning():
        publisher = credstream.Publisher(
            broker=broker.url,
            cluster="dev",
            token=broker.publisher_token,
            aws_role_arn=moto.role_arn,
            aws_duration="15m",
            aws_source_identity="laptop-user",
            aws_tags={"team": "analytics"},
            env={"AUTH_TOKEN_FOR_CUSTOM_DATABASE": DB_TOKEN},
        )
    world["publisher"] = publisher
    assert sorted(publisher.kinds) == ["aws", "gcp"]
    assert publisher.sealed
    assert publisher.seal_key_file is not None
    assert publisher.seal_key_id is not None
    assert publisher.seal_key_id in publisher.sealing, publisher.sealing
    publisher.wait_delivered(timeout=60)

    pids_before = dict(client.run(os.getpid).items())
    plugin = CredstreamPlugin(broker=broker.url, cluster="dev", agent_token=broker.agent_token)
    # The publisher's key, from the same file.
    assert plugin.sealed
    assert plugin.seal_key_id == publisher.seal_key_id
    client.register_plugin(plugin)
    results = client.run(read_both, moto.bucket, moto.key)
    assert set(results) == set(pids_before)
    issued = moto.assumed_role_keys()
    uris = set()
    for addr, result in results.items():
        assert result["pid"] == pids_before[addr], "no worker restarted"
        assert result["boto3"] == moto.body.decode()
        assert result["s3fs"] == moto.body.decode()
        assert result["boto3_key"].startswith("ASIA"), result["boto3_key"]
        assert result["boto3_key"] in issued, "signed with a key moto's AssumeRole issued"
        env = result["env"]
        assert env["AUTH_TOKEN_FOR_CUSTOM_DATABASE"] == DB_TOKEN
        assert env["AWS_CONTAINER_CREDENTIALS_FULL_URI"].startswith("http://127.0.0.1:")
        assert os.path.isfile(env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"])
        assert env["GCE_METADATA_HOST"] == env["GCE_METADATA_IP"]
        assert env["AWS_DEFAULT_REGION"] == "us-east-1"
        # Only pointers: no token value, no credential, not the agent token.
        assert env["AWS_CONTAINER_AUTHORIZATION_TOKEN"] is None
        assert env["CLOUDSDK_AUTH_ACCESS_TOKEN"] is None
        assert env["AWS_ACCESS_KEY_ID"] is None
        assert broker.agent_token not in result["environ_values"]
        uris.add(env["AWS_CONTAINER_CREDENTIALS_FULL_URI"])
    assert len(uris) == 1, f"two workers on one host share one agent: {uris}"
    status = publisher.status()
    assert status["agents_connected"] == 1, status["agents"]
    aws = next(c for c in status["credentials"] if c["kind"] == "aws")
    # The role session is named for the cluster, as by `credstream publish`.
    assert (
        aws["principal"] == "arn:aws:sts::123456789012:assumed-role/cluster-reader/credstream-dev"
    )
    assert aws["expires_at"] is not None
    assert DB_TOKEN not in json.dumps(status, default=str)


def _host_agent(world: dict[str, Any], host: str = "host-a") -> dict[str, Any]:
    runtime = world["cluster"].worker_env(host)["XDG_RUNTIME_DIR"]
    infos = agent_infos(runtime)
    assert len(infos) == 1, infos
    return infos[0]


def _agent_log(info: dict[str, Any]) -> str:
    with open(os.path.join(info["directory"], "agent.log"), errors="replace") as f:
        return f.read()


def test_the_broker_says_the_cluster_is_sealed_while_workers_read(world: dict[str, Any]) -> None:
    moto, client, publisher = world["moto"], world["client"], world["publisher"]
    results = client.run(read_both, moto.bucket, moto.key)
    status = publisher.status()
    assert [r["boto3"] for r in results.values()] == [moto.body.decode()] * 2
    assert [r["s3fs"] for r in results.values()] == [moto.body.decode()] * 2
    assert status["sealed"] is True, status
    assert sorted(c["kind"] for c in status["credentials"]) == ["aws", "gcp"]
    assert all(c["sealed"] for c in status["credentials"]), status["credentials"]
    # The broker cannot read a sealed env, names included.
    assert status["private_env"]["sealed"] is True
    assert status["private_env"]["names"] == []
    # The agent holds the publisher's key, and says so.
    log = _agent_log(_host_agent(world))
    assert (
        f"sealed delivery: only sealed updates are accepted key_id={publisher.seal_key_id}" in log
    ), log
    assert "refused an update" not in log, log


def test_the_seal_key_is_in_no_worker_environ_agent_argv_file_or_broker_log(
    world: dict[str, Any],
) -> None:
    client, broker, publisher = world["client"], world["broker"], world["publisher"]
    secret = read_seal_key(publisher.seal_key_file)
    for values in client.run(environ_values).values():
        assert values
        assert not [v for v in values if secret in v]
    info = _host_agent(world)
    for pid in (info["agent_pid"], info["supervisor_pid"]):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().decode(errors="replace")
        assert secret not in cmdline
    with open(f"/proc/{info['agent_pid']}/cmdline", "rb") as f:
        argv = f.read().decode().split("\0")
    # The agent has the key, from a descriptor: only its number is in argv.
    flag = argv.index("--seal-key-file")
    assert re.fullmatch(r"/dev/fd/\d+", argv[flag + 1]), argv
    # The supervisor is a Python process: its environment (which root, as
    # here, reads though the supervisor is non-dumpable) holds no key.
    with open(f"/proc/{info['supervisor_pid']}/environ", "rb") as f:
        assert secret.encode() not in f.read()
    # Nothing in the agent's directory (env file, logs, agent.json) has it.
    for root, _, files in os.walk(info["directory"]):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert secret.encode() not in f.read(), os.path.join(root, name)
    # The broker never received it: not in its output, not in its audit log
    # (which did record the sealed publications).
    with open(world["audit_log"]) as f:
        audit = f.read()
    assert '"event":"credential_published"' in audit.replace(" ", ""), audit[:2000]
    assert secret not in audit
    assert secret not in broker.proc.output()
    assert secret not in repr(
        CredstreamPlugin(broker=broker.url, cluster="dev", agent_token=broker.agent_token)
    )


class _NoWarning:
    """Fails the block if it raised a :class:`credstream.CredstreamWarning`."""

    def __enter__(self) -> Self:
        self._catch = warnings.catch_warnings(record=True)
        self.caught = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._catch.__exit__(kind, error, traceback)
        if kind is None:
            assert not [
                w for w in self.caught if issubclass(w.category, credstream.CredstreamWarning)
            ], [str(w.message) for w in self.caught]


def test_private_env_sent_after_registration_reaches_running_workers(world: dict[str, Any]) -> None:
    client, publisher = world["client"], world["publisher"]
    before = client.run(getenv, "LATE_VARIABLE")
    assert all(value is None for _, value in before.values()), before
    # The drop-in for Coiled's cluster.send_private_envs, given the client.
    send_private_envs(client, {"LATE_VARIABLE": LATE_VALUE})
    publisher.wait_delivered(timeout=60, min_agents=1)

    def arrived() -> dict[str, tuple[int, str | None]] | None:
        now = client.run(getenv, "LATE_VARIABLE")
        return now if all(value == LATE_VALUE for _, value in now.values()) else None

    after = wait_until("LATE_VARIABLE on every worker", arrived, timeout=30)
    assert {addr: pid for addr, (pid, _) in after.items()} == {
        addr: pid for addr, (pid, _) in before.items()
    }, "same workers, same processes"
    env = publisher.status()["private_env"]
    # Sealed: the broker holds a new version of the whole env, and cannot
    # tell its names.
    assert env["sealed"] is True, env
    assert env["names"] == [], env


def test_a_worker_that_joins_later_is_served(world: dict[str, Any]) -> None:
    moto, client, cluster = world["moto"], world["client"], world["cluster"]
    late = cluster.add_worker("host-b", "b1")
    client.wait_for_workers(3, timeout=120)
    info = client.scheduler_info()["workers"]
    address = next(a for a, w in info.items() if w.get("name") == "b1")

    def served() -> dict[str, Any]:
        result: dict[str, Any] = client.run(read_both, moto.bucket, moto.key, workers=[address])[
            address
        ]
        return result

    result = wait_until("the late worker to be served", served, timeout=60)
    assert result["boto3"] == moto.body.decode()
    assert result["s3fs"] == moto.body.decode()
    assert result["env"]["AUTH_TOKEN_FOR_CUSTOM_DATABASE"] == DB_TOKEN
    assert client.run(getenv, "LATE_VARIABLE", workers=[address])[address][1] == LATE_VALUE
    world["late"] = (late, address)
    # Its own host, its own agent: two agents at the broker now.
    world["publisher"].wait_delivered(timeout=60, min_agents=2)


def test_google_auth_default_in_a_task_gets_the_published_token(world: dict[str, Any]) -> None:
    client, endpoint = world["client"], world["endpoint"]
    results = client.run(google_default)
    published = endpoint.issued[-1]
    for result in results.values():
        assert result["class"] == "google.auth.compute_engine.credentials.Credentials"
        assert result["project"] == GCP_PROJECT
        assert result["email"] == GCP_EMAIL
        assert result["token"] == published
    assert endpoint.issued[-1] == published, "the tasks asked the agent, not the token endpoint"


def test_a_long_running_task_reads_through_a_rotation(world: dict[str, Any]) -> None:
    moto, client, publisher = world["moto"], world["client"], world["publisher"]
    first = next(c for c in publisher.status()["credentials"] if c["kind"] == "aws")
    # --refresh-at 0.1 of a 15-minute credential: the broker asks for a new
    # one about 90 s after the first was minted.
    future = client.submit(read_through_rotation, moto.bucket, moto.key, 240.0, pure=False)
    result = future.result(timeout=300)
    assert result["failures"] == [], result["failures"]
    assert len(result["boto3"]) >= 2, result
    assert len(result["s3fs"]) >= 2, result
    issued = moto.assumed_role_keys()
    for key in result["boto3"] + result["s3fs"]:
        assert key in issued
    now = next(c for c in publisher.status()["credentials"] if c["kind"] == "aws")
    assert now["version"] > first["version"]


def test_the_agent_stops_with_its_last_worker(world: dict[str, Any]) -> None:
    client, cluster = world["client"], world["cluster"]
    late, address = world.pop("late")
    runtime = cluster.worker_env("host-b")["XDG_RUNTIME_DIR"]
    infos = agent_infos(runtime)
    assert len(infos) == 1, infos
    agent_pid = infos[0]["agent_pid"]
    os.kill(agent_pid, 0)
    assert late.stop() == 0, late.output()

    def gone() -> bool:
        try:
            os.kill(agent_pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_until("the late worker's agent to exit", gone, timeout=30)
    wait_until(
        "the scheduler to drop the worker",
        lambda: address not in client.scheduler_info()["workers"],
        timeout=30,
    )
    # The other host's agent still serves its two workers.
    results = client.run(try_read, world["moto"].bucket, world["moto"].key)
    assert list(results.values()) == ["ok", "ok"], results


def test_closing_with_revoke_leaves_tasks_with_the_sdks_no_credentials_error(
    world: dict[str, Any],
) -> None:
    moto, client, publisher = world["moto"], world["client"], world["publisher"]
    assert publisher.close(revoke=True) is True
    assert not publisher.running
    with pytest.raises(credstream.PublisherClosedError):
        publisher.send_private_envs({"A": "b"})

    def refused() -> dict[str, str] | None:
        results: dict[str, str] = client.run(try_read, moto.bucket, moto.key)
        if all(r.startswith("botocore.exceptions.NoCredentialsError") for r in results.values()):
            return results
        return None

    started = time.monotonic()
    results = wait_until("NoCredentialsError on every worker", refused, timeout=30)
    assert len(results) == 2
    assert time.monotonic() - started < 30
    gone = client.run(getenv, "AUTH_TOKEN_FOR_CUSTOM_DATABASE")
    assert all(value is None for _, value in gone.values()), gone


# --- sealing off -------------------------------------------------------------

UNSEALED_TOKEN = "unsealed-db-token-c41e"


def test_agents_holding_the_key_refuse_an_unsealed_publisher(world: dict[str, Any]) -> None:
    moto, broker, client = world["moto"], world["broker"], world["client"]
    sealed_agent = _host_agent(world)
    publisher = credstream.Publisher(
        broker=broker.url,
        cluster="dev",
        token=broker.publisher_token,
        aws_role_arn=moto.role_arn,
        aws_duration="15m",
        seal=False,
        env={"AUTH_TOKEN_FOR_CUSTOM_DATABASE": UNSEALED_TOKEN},
    )
    world["publisher"] = publisher
    assert not publisher.sealed
    assert publisher.seal_key_id is None
    assert publisher.sealing.startswith("not sealing (seal=False)")

    def refused() -> set[str] | None:
        log = _agent_log(sealed_agent)
        found = {
            kind
            for kind in ("aws", "gcp", "private env")
            if re.search(rf'refused an update.*item="?{kind}"?', log)
        }
        return found if found == {"aws", "gcp", "private env"} else None

    wait_until("the sealed agent to refuse the unsealed credentials and env", refused, timeout=60)
    # The broker holds the clear credentials; the sealed agent serves none.
    status = publisher.status()
    assert status["sealed"] is False, status
    assert not any(c["sealed"] for c in status["credentials"])
    results = client.run(try_read, moto.bucket, moto.key)
    assert all(r.startswith("botocore.exceptions.NoCredentialsError") for r in results.values()), (
        results
    )
    assert all(
        value is None for _, value in client.run(getenv, "AUTH_TOKEN_FOR_CUSTOM_DATABASE").values()
    )


def test_an_unsealed_plugin_serves_an_unsealed_publisher_and_status_says_not_sealed(
    world: dict[str, Any],
) -> None:
    moto, broker, client, publisher = (
        world["moto"],
        world["broker"],
        world["client"],
        world["publisher"],
    )
    plugin = CredstreamPlugin(
        broker=broker.url, cluster="dev", agent_token=broker.agent_token, seal=False
    )
    assert not plugin.sealed
    assert plugin.seal_key_id is None
    # Same name: distributed tears the sealed plugin down on every worker
    # (its agent stops) and sets this one up (a new agent, without a key).
    client.register_plugin(plugin)
    results = client.run(read_both, moto.bucket, moto.key)
    issued = moto.assumed_role_keys()
    for result in results.values():
        assert result["boto3"] == moto.body.decode()
        assert result["s3fs"] == moto.body.decode()
        assert result["boto3_key"] in issued
        assert result["env"]["AUTH_TOKEN_FOR_CUSTOM_DATABASE"] == UNSEALED_TOKEN
    publisher.wait_delivered(timeout=60, min_agents=1)
    status = publisher.status()
    assert status["sealed"] is False, status
    assert sorted(c["kind"] for c in status["credentials"]) == ["aws", "gcp"]
    assert not any(c["sealed"] for c in status["credentials"])
    assert status["private_env"] == {
        "version": status["private_env"]["version"],
        "names": ["AUTH_TOKEN_FOR_CUSTOM_DATABASE"],
        "sealed": False,
    }
    agent = _host_agent(world)
    with open(f"/proc/{agent['agent_pid']}/cmdline", "rb") as f:
        assert b"--seal-key-file" not in f.read()
    assert "sealed delivery" not in _agent_log(agent)
