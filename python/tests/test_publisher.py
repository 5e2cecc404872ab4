"""``credstream.Publisher`` against a real ``credstream-broker --dev``: the
errors a caller sees (with the CLI's ``fix:``), and that bad input loses
nothing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import credstream

from conftest import Broker, read_seal_key, start_broker


@pytest.fixture(scope="module")
def broker(log_dir: str) -> Iterator[Broker]:
    broker = start_broker(log_dir)
    yield broker
    broker.proc.stop()


@pytest.fixture
def no_local_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A laptop with no AWS or Google credentials at all."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "GOOGLE_", "CLOUDSDK_")):
            monkeypatch.delenv(name)
    empty = tmp_path / "empty"
    empty.write_text("")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))


def env_only(broker: Broker, **kwargs: Any) -> credstream.Publisher:
    options: dict[str, Any] = dict(
        broker=broker.url,
        cluster="dev",
        token=broker.publisher_token,
        aws=False,
        gcp=False,
        env={"AUTH_TOKEN_FOR_CUSTOM_DATABASE": "s3cret-1"},
    )
    options.update(kwargs)
    return credstream.Publisher(**options)


def test_a_rejected_token_says_how_to_get_a_new_one(broker: Broker) -> None:
    with pytest.raises(credstream.AuthenticationError) as raised:
        env_only(broker, token="not-a-token")
    message = str(raised.value)
    assert message.startswith("the broker rejected the token")
    assert "fix:" in message
    assert "credstream-broker token" in message
    assert isinstance(raised.value, credstream.CredstreamError)


def test_a_token_for_another_cluster_is_permission_denied(broker: Broker) -> None:
    with pytest.raises(credstream.PermissionDeniedError) as raised:
        env_only(broker, cluster="other")
    assert 'fix: use a publisher token issued for cluster "other"' in str(raised.value)


def test_an_unreachable_broker_names_the_address_and_the_fix() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(credstream.BrokerUnreachableError) as raised:
        credstream.Publisher(
            broker=f"http://127.0.0.1:{port}",
            cluster="dev",
            token="t",
            aws=False,
            gcp=False,
            env={"A": "b"},
        )
    message = str(raised.value)
    assert f"cannot reach the broker at http://127.0.0.1:{port}" in message
    assert "fix: check the host and port" in message


def test_plaintext_to_a_remote_broker_is_refused_before_connecting() -> None:
    with pytest.raises(credstream.TLSError) as raised:
        credstream.Publisher(
            broker="http://broker.invalid:50051",
            cluster="dev",
            token="t",
            aws=False,
            gcp=False,
            env={"A": "b"},
        )
    assert "refusing to send a token in plaintext" in str(raised.value)


def test_no_local_credentials_and_no_env_is_nothing_to_publish(
    broker: Broker, no_local_credentials: None
) -> None:
    with pytest.raises(credstream.NoCredentialsError) as raised:
        credstream.Publisher(
            broker=broker.url, cluster="dev", token=broker.publisher_token, gcp=False
        )
    message = str(raised.value)
    assert message.startswith("nothing to publish")
    assert "aws: not publishing AWS credentials" in message


def test_a_kind_without_local_credentials_is_skipped_with_a_warning(
    broker: Broker, no_local_credentials: None
) -> None:
    with pytest.warns(credstream.CredstreamWarning, match="aws: not publishing AWS credentials"):
        publisher = credstream.Publisher(
            broker=broker.url,
            cluster="dev",
            token=broker.publisher_token,
            gcp=False,
            env={"A": "b"},
        )
    try:
        assert publisher.kinds == []
        publisher.wait_delivered(timeout=30)
    finally:
        publisher.close()


@pytest.mark.parametrize("seal", [True, False], ids=["sealed", "unsealed"])
def test_a_bad_variable_is_refused_and_the_publisher_keeps_what_it_had(
    broker: Broker, seal: bool
) -> None:
    with env_only(broker, seal=seal) as publisher:
        assert publisher.sealed is seal
        publisher.wait_delivered(timeout=30)
        before = publisher.status()
        with pytest.raises(credstream.ConfigurationError) as raised:
            publisher.send_private_envs({"1BAD-NAME": "s3cret-2"})
        assert "1BAD-NAME" in str(raised.value)
        assert "s3cret-2" not in str(raised.value)
        with pytest.raises(credstream.ConfigurationError):
            publisher.send_private_envs({"OK": 42})  # type: ignore[dict-item]
        assert publisher.running
        publisher.send_private_envs({"SECOND": "s3cret-3"})
        publisher.wait_delivered(timeout=30)
        after = publisher.status()
        if seal:
            # The broker cannot read a sealed env's names.
            assert before["private_env"]["names"] == after["private_env"]["names"] == []
        else:
            assert before["private_env"]["names"] == ["AUTH_TOKEN_FOR_CUSTOM_DATABASE"]
            assert after["private_env"]["names"] == ["AUTH_TOKEN_FOR_CUSTOM_DATABASE", "SECOND"]
        assert after["private_env"]["sealed"] is seal
        assert after["sealed"] is seal
        assert after["private_env"]["version"] > before["private_env"]["version"]
        assert "s3cret" not in repr(after)
    assert not publisher.running
    with pytest.raises(credstream.PublisherClosedError):
        publisher.status()


def test_a_second_publisher_takes_over_and_the_first_says_so(broker: Broker) -> None:
    first = env_only(broker)
    try:
        first.wait_delivered(timeout=30)
        with env_only(broker, env={"B": "c"}) as second:
            second.wait_delivered(timeout=30)

            def ended() -> bool | None:
                return None if first.running else True

            from conftest import wait_until

            wait_until("the first publisher to end", ended, timeout=30)
            with pytest.raises(credstream.TakenOverError) as raised:
                first.send_private_envs({"X": "y"})
            assert "only one publisher per cluster" in str(raised.value)
    finally:
        first.close()


def test_wait_delivered_times_out_saying_how_far_it_got(broker: Broker) -> None:
    with env_only(broker) as publisher:
        with pytest.raises(credstream.DeliveryTimeoutError) as raised:
            publisher.wait_delivered(timeout=0.5, min_agents=1)
        assert "0/0 agents hold version" in str(raised.value)
        assert "fix:" in str(raised.value)


def _processes_mentioning(text: str) -> list[tuple[int, str]]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append((int(pid), cmdline))
    return found


def test_the_plugin_gives_up_after_ready_timeout_saying_what_it_waited_for(
    log_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from credstream.dask import AgentNotReadyError, CredstreamPlugin

    # A broker no publisher ever connected to.
    lonely = start_broker(log_dir)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    try:
        plugin = CredstreamPlugin(
            broker=lonely.url, cluster="dev", agent_token=lonely.agent_token, ready_timeout=2
        )
        with pytest.raises(AgentNotReadyError) as raised:
            plugin.attach()
        message = str(raised.value)
        assert (
            "was not ready within 2s: not ready: waiting for a publisher to connect" in message
        ), message
        assert "fix: start the publisher" in message
        assert lonely.agent_token not in message
        # The agent it started is gone again, and nothing was left in os.environ.
        from conftest import wait_until

        wait_until(
            "the agent to exit", lambda: not _processes_mentioning(str(tmp_path)), timeout=15
        )
        assert "AWS_CONTAINER_CREDENTIALS_FULL_URI" not in os.environ
    finally:
        lonely.proc.stop()


# --- sealing -------------------------------------------------------------------


def _broker_holds_nothing(broker: Broker) -> str:
    """``credstream status`` (the wheel's command): what the broker holds."""
    done = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "credstream"),
            "status",
            "--broker",
            broker.url,
            "--cluster",
            "dev",
            "--token",
            broker.publisher_token,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        # Its words are the answer, whatever its exit status.
        check=False,
    )
    return done.stdout + done.stderr


def test_the_publisher_seals_with_the_key_in_the_config_dir_created_once(
    broker: Broker, seal_key_dir: str
) -> None:
    path = os.path.join(seal_key_dir, "seal-keys", "dev.key")
    with env_only(broker) as first:
        assert first.sealed
        assert first.seal_key_file == path
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        assert first.sealing.startswith(
            f"sealing every credential and env change for cluster dev (key {first.seal_key_id} "
            f"in {path}"
        )
        assert "credstream seal-key --cluster dev" in first.sealing
        first.wait_delivered(timeout=30)
        assert first.status()["sealed"] is True
    secret = read_seal_key(path)
    with env_only(broker) as second:
        # The same key, not a new one.
        assert second.seal_key_id == first.seal_key_id
        assert "created now" not in second.sealing
    assert read_seal_key(path) == secret
    assert secret not in first.sealing + repr(first)
    # The CLI finds the same key.
    done = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "credstream"),
            "seal-key",
            "--cluster",
            "dev",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(secret)


def _key_file(tmp_path: Path, name: str, text: str, mode: int = 0o600) -> str:
    path = tmp_path / name
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def _contents(path: str) -> str | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read()


@pytest.mark.parametrize(
    "case", ["readable-by-others", "another-cluster", "not-a-key", "unwritable-dir"]
)
def test_a_bad_seal_key_file_is_a_configuration_error_and_nothing_starts(
    log_dir: str, tmp_path: Path, case: str
) -> None:
    from credstream.dask import CredstreamPlugin

    other = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "credstream"),
            "seal-key",
            "--cluster",
            "other",
            "--seal-key-file",
            str(tmp_path / "made.key"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert other.startswith("credstream-seal-v1:other:"), other
    if case == "readable-by-others":
        path = _key_file(tmp_path, "dev.key", other.replace(":other:", ":dev:"), 0o644)
        expected = "run `chmod 600"
    elif case == "another-cluster":
        path, expected = _key_file(tmp_path, "other.key", other), "for cluster other, not dev"
    elif case == "not-a-key":
        path, expected = _key_file(tmp_path, "junk.key", "not a key\n"), "junk.key"
    else:  # a regular file where the key's directory would be created
        (tmp_path / "file-not-dir").write_text("")
        path, expected = str(tmp_path / "file-not-dir" / "dev.key"), "file-not-dir"
    before = _contents(path)
    lonely = start_broker(log_dir)
    try:
        with pytest.raises(credstream.ConfigurationError) as raised:
            env_only(lonely, seal_key_file=path)
        message = str(raised.value)
        assert message.startswith(
            "cannot use the seal key (or pass seal=False to publish unsealed)"
        ), message
        assert expected in message, message
        assert "--no-seal" not in message
        # Nothing was published, nothing runs, and the file is as it was.
        assert 'holds nothing for cluster "dev"' in _broker_holds_nothing(lonely)
        assert not [p for p in credstream._live if p.running]
        # The plugin reads the key as the publisher does: the same error,
        # when it is made, before anything is registered.
        with pytest.raises(credstream.ConfigurationError) as plugin_raised:
            CredstreamPlugin(
                broker=lonely.url, cluster="dev", agent_token=lonely.agent_token, seal_key_file=path
            )
        assert str(plugin_raised.value) == message
        after = _contents(path)
        assert after == before
        if before is not None:
            assert before.strip().rsplit(":", 1)[-1] not in message
    finally:
        lonely.proc.stop()


def test_seal_false_and_a_seal_key_file_together_are_refused(
    broker: Broker, tmp_path: Path
) -> None:
    from credstream.dask import CredstreamPlugin

    with pytest.raises(credstream.ConfigurationError, match="seal=False and seal_key_file"):
        env_only(broker, seal=False, seal_key_file=str(tmp_path / "dev.key"))
    with pytest.raises(credstream.ConfigurationError, match="seal=False and seal_key_file"):
        CredstreamPlugin(
            broker=broker.url,
            cluster="dev",
            agent_token=broker.agent_token,
            seal=False,
            seal_key_file=str(tmp_path / "dev.key"),
        )
    assert not (tmp_path / "dev.key").exists()


def test_the_cloudtrail_options_reach_the_minter_and_are_checked_as_the_cli_checks_them(
    broker: Broker,
) -> None:
    role = "arn:aws:iam::123456789012:role/r"

    def refused(**kwargs: Any) -> str:
        with pytest.raises(credstream.ConfigurationError) as raised:
            credstream.Publisher(
                broker=broker.url, cluster="dev", token=broker.publisher_token, gcp=False, **kwargs
            )
        return str(raised.value)

    assert 'source identity "aws:me" must be 2 to 64 characters' in refused(
        aws_role_arn=role, aws_source_identity="aws:me"
    )
    # The cluster's own tag is set from `cluster`, as `credstream publish` sets it.
    assert "(credstream sets it to the cluster id)" in refused(
        aws_role_arn=role, aws_tags={"credstream-cluster": "other"}
    )
    assert 'session tag key "aws:team" must not start with "aws:"' in refused(
        aws_role_arn=role, aws_tags={"aws:team": "x"}
    )
    assert "need a role ARN" in refused(aws_tags={"team": "data"})
    with pytest.raises(credstream.ConfigurationError, match="aws_tags must be a mapping"):
        env_only(broker, aws_tags=["team=data"])  # a list: the wrong type on purpose
