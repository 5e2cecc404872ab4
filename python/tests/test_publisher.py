"""``credstream.Publisher`` against a real ``credstream-broker --dev``: the
errors a caller sees (with the CLI's ``fix:``), and that bad input loses
nothing."""

from __future__ import annotations

import os
import socket

import pytest

import credstream

from conftest import start_broker


@pytest.fixture(scope="module")
def broker(log_dir):
    broker = start_broker(log_dir)
    yield broker
    broker.proc.stop()


@pytest.fixture
def no_local_credentials(tmp_path, monkeypatch):
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


def env_only(broker, **kwargs):
    options = dict(broker=broker.url, cluster="dev", token=broker.publisher_token,
                   aws=False, gcp=False, env={"AUTH_TOKEN_FOR_CUSTOM_DATABASE": "s3cret-1"})
    options.update(kwargs)
    return credstream.Publisher(**options)


def test_a_rejected_token_says_how_to_get_a_new_one(broker):
    with pytest.raises(credstream.AuthenticationError) as raised:
        env_only(broker, token="not-a-token")
    message = str(raised.value)
    assert message.startswith("the broker rejected the token")
    assert "fix:" in message and "credstream-broker token" in message
    assert isinstance(raised.value, credstream.CredstreamError)


def test_a_token_for_another_cluster_is_permission_denied(broker):
    with pytest.raises(credstream.PermissionDeniedError) as raised:
        env_only(broker, cluster="other")
    assert "fix: use a publisher token issued for cluster \"other\"" in str(raised.value)


def test_an_unreachable_broker_names_the_address_and_the_fix():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(credstream.BrokerUnreachableError) as raised:
        credstream.Publisher(broker=f"http://127.0.0.1:{port}", cluster="dev", token="t",
                             aws=False, gcp=False, env={"A": "b"})
    message = str(raised.value)
    assert f"cannot reach the broker at http://127.0.0.1:{port}" in message
    assert "fix: check the host and port" in message


def test_plaintext_to_a_remote_broker_is_refused_before_connecting():
    with pytest.raises(credstream.TLSError) as raised:
        credstream.Publisher(broker="http://broker.invalid:50051", cluster="dev", token="t",
                             aws=False, gcp=False, env={"A": "b"})
    assert "refusing to send a token in plaintext" in str(raised.value)


def test_no_local_credentials_and_no_env_is_nothing_to_publish(broker, no_local_credentials):
    with pytest.raises(credstream.NoCredentialsError) as raised:
        credstream.Publisher(broker=broker.url, cluster="dev", token=broker.publisher_token,
                             gcp=False)
    message = str(raised.value)
    assert message.startswith("nothing to publish")
    assert "aws: not publishing AWS credentials" in message


def test_a_kind_without_local_credentials_is_skipped_with_a_warning(broker, no_local_credentials):
    with pytest.warns(credstream.CredstreamWarning, match="aws: not publishing AWS credentials"):
        publisher = credstream.Publisher(broker=broker.url, cluster="dev",
                                         token=broker.publisher_token, gcp=False,
                                         env={"A": "b"})
    try:
        assert publisher.kinds == []
        publisher.wait_delivered(timeout=30)
    finally:
        publisher.close()


def test_a_bad_variable_is_refused_and_the_publisher_keeps_what_it_had(broker):
    with env_only(broker) as publisher:
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
        assert before["private_env"]["names"] == ["AUTH_TOKEN_FOR_CUSTOM_DATABASE"]
        assert after["private_env"]["names"] == ["AUTH_TOKEN_FOR_CUSTOM_DATABASE", "SECOND"]
        assert after["private_env"]["version"] > before["private_env"]["version"]
        assert "s3cret" not in repr(after)
    assert not publisher.running
    with pytest.raises(credstream.PublisherClosedError):
        publisher.status()


def test_a_second_publisher_takes_over_and_the_first_says_so(broker):
    first = env_only(broker)
    try:
        first.wait_delivered(timeout=30)
        with env_only(broker, env={"B": "c"}) as second:
            second.wait_delivered(timeout=30)

            def ended():
                return None if first.running else True

            from conftest import wait_until
            wait_until("the first publisher to end", ended, timeout=30)
            with pytest.raises(credstream.TakenOverError) as raised:
                first.send_private_envs({"X": "y"})
            assert "only one publisher per cluster" in str(raised.value)
    finally:
        first.close()


def test_wait_delivered_times_out_saying_how_far_it_got(broker):
    with env_only(broker) as publisher:
        with pytest.raises(credstream.DeliveryTimeoutError) as raised:
            publisher.wait_delivered(timeout=0.5, min_agents=1)
        assert "0/0 agents hold version" in str(raised.value)
        assert "fix:" in str(raised.value)


def _processes_mentioning(text: str) -> list:
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
        log_dir, tmp_path, monkeypatch):
    from credstream.dask import AgentNotReadyError, CredstreamPlugin

    # A broker no publisher ever connected to.
    lonely = start_broker(log_dir)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    try:
        plugin = CredstreamPlugin(broker=lonely.url, cluster="dev",
                                  agent_token=lonely.agent_token, ready_timeout=2)
        with pytest.raises(AgentNotReadyError) as raised:
            plugin.attach()
        message = str(raised.value)
        assert "was not ready within 2s: not ready: waiting for a publisher to connect" in message, message
        assert "fix: start the publisher" in message
        assert lonely.agent_token not in message
        # The agent it started is gone again, and nothing was left in os.environ.
        from conftest import wait_until
        wait_until("the agent to exit", lambda: not _processes_mentioning(str(tmp_path)),
                   timeout=15)
        assert "AWS_CONTAINER_CREDENTIALS_FULL_URI" not in os.environ
    finally:
        lonely.proc.stop()
