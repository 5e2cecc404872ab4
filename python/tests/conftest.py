"""Real peers for the Python package's tests, run from the installed wheel.

- ``moto``: a real ``moto.server`` (S3, STS, IAM) from the project's venv
  (``CREDSTREAM_TEST_PYTHON``), seeded and then enforcing authentication,
  so only credentials its STS issued are accepted;
- an OAuth2 token endpoint on loopback and a service-account key whose
  ``token_uri`` points at it (the GCP source, as tests/tests/e2e_gcp.rs);
- ``credstream-broker --dev`` (``CREDSTREAM_TEST_BROKER``);
- ``dask scheduler`` and ``dask worker`` processes from this venv, whose
  environment has no AWS or Google credentials of their own.

Seal keys (sealing is on by default) go to a config directory of the
session's own (``CREDSTREAM_CONFIG_DIR``), never the user's.

Every wait is on an event with a deadline (``wait_until``).
"""

from __future__ import annotations

import http.server
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import moto_seed
import pytest

T = TypeVar("T")

VENV_BIN = os.path.dirname(sys.executable)
#: For the scheduler and workers: dask_tasks.py (not the source package).
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def wait_until(
    what: str, check: Callable[[], T | None], timeout: float = 60.0, interval: float = 0.1
) -> T:
    """Polls ``check`` until it returns something truthy, or fails saying
    what was awaited and the last value seen."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = check()
        # Any error: the condition may fail while things start; the last one
        # is in the timeout's message.
        except Exception as error:  # noqa: BLE001
            last = error
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def free_port() -> int:
    # Below the ephemeral range, so a just-closed client port is not reused.
    while True:
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def require_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"{name} is not set: run these tests through python/tests/run.sh")
    return value


class Proc:
    """A child process whose output goes to a log file, killed at close."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: str) -> None:
        self.name = name
        # One file per process, even for a second broker in one session.
        self.log_path = os.path.join(log_dir, f"{name}.log")
        number = 1
        while os.path.exists(self.log_path):
            number += 1
            self.log_path = os.path.join(log_dir, f"{name}-{number}.log")
        # Open as long as the child runs (it writes to it); stop() closes it.
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.popen = subprocess.Popen(
            argv,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def output(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_for_line(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        regex = re.compile(pattern, re.MULTILINE)

        def found() -> re.Match[str] | None:
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited {self.popen.returncode}:\n{self.output()}"
                )
            return regex.search(self.output())

        return wait_until(f"{self.name} to print {pattern!r}", found, timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()
        return self.popen.returncode


@dataclass
class Moto:
    proc: Proc
    url: str
    access_key_id: str = ""
    secret_access_key: str = ""
    role_arn: str = ""
    bucket: str = moto_seed.BUCKET
    key: str = moto_seed.KEY
    body: bytes = moto_seed.BODY

    def assumed_role_keys(self) -> list[str]:
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/moto-api/data.json") as response:
            data = json.load(response)
        keys: list[str] = []

        def walk(value: object) -> None:
            if isinstance(value, dict):
                for name, inner in value.items():
                    if name == "access_key_id" and isinstance(inner, str):
                        keys.append(inner)
                    else:
                        walk(inner)
            elif isinstance(value, list):
                for item in value:
                    walk(item)

        walk(data.get("sts", {}))
        return keys


def start_moto(log_dir: str) -> Moto:
    python = require_env("CREDSTREAM_TEST_PYTHON")
    for _ in range(5):
        port = free_port()
        proc = Proc(
            "moto",
            [python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": log_dir},
            log_dir,
        )
        try:
            proc.wait_for_line(r"Running on", timeout=60)
        except AssertionError:
            proc.stop()
            continue
        return Moto(proc=proc, url=f"http://127.0.0.1:{port}")
    raise RuntimeError("moto did not start after 5 attempts")


def seed_moto(moto: Moto, auth: bool = True) -> None:
    """The user, role, bucket and object of ``moto_seed.py`` (IAM user
    `laptop-user`, which may call STS only; role `cluster-reader`, which may
    read seed-data); then auth on, unless
    `auth` is False: under auth moto rejects the fixed keys its own
    GetSessionToken returns (docs/facts.md, 15), so a publisher that mints
    without a role needs auth off."""
    import urllib.request

    seeded = moto_seed.seed(moto.url)
    moto.access_key_id = seeded["access_key_id"]
    moto.secret_access_key = seeded["secret_access_key"]
    moto.role_arn = seeded["role_arn"]
    if not auth:
        return
    # The body is the number of requests still allowed without auth; a form
    # content type (urllib's default) would hide it from moto.
    request = urllib.request.Request(
        f"{moto.url}/moto-api/reset-auth",
        data=b"0",
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    with urllib.request.urlopen(request) as response:
        assert response.status == 200


class TokenEndpoint:
    """An OAuth2 token endpoint: every POST gets a new token, an hour long."""

    def __init__(self) -> None:
        self.issued: list[str] = []
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                self.rfile.read(length)
                token = f"ya29.dask-{len(endpoint.issued) + 1}"
                endpoint.issued.append(token)
                body = json.dumps(
                    {"access_token": token, "expires_in": 3600, "token_type": "Bearer"}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


GCP_EMAIL = "pipeline@credstream-dask.iam.gserviceaccount.com"
GCP_PROJECT = "credstream-dask"


def service_account_key(directory: str, token_uri: str) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    path = os.path.join(directory, "service-account.json")
    with open(path, "w") as f:
        json.dump(
            {
                "type": "service_account",
                "project_id": GCP_PROJECT,
                "private_key_id": "0123456789abcdef",
                "private_key": pem,
                "client_email": GCP_EMAIL,
                "client_id": "100000000000000000003",
                "auth_uri": "https://accounts.google.com/o/oauth2/auth",
                "token_uri": token_uri,
            },
            f,
        )
    return path


@dataclass
class Broker:
    proc: Proc
    url: str
    publisher_token: str
    agent_token: str
    admin_token: str


def start_broker(log_dir: str, *args: str) -> Broker:
    binary = require_env("CREDSTREAM_TEST_BROKER")
    proc = Proc(
        "broker",
        [binary, "--listen", "127.0.0.1:0", "--dev", *args],
        {"PATH": "/usr/bin:/bin", "RUST_LOG": "info"},
        log_dir,
    )
    listening = proc.wait_for_line(r"^listening on (\S+)$").group(1)
    tokens = {
        name: proc.wait_for_line(rf"^{name}=(\S+)$").group(1)
        for name in (
            "CREDSTREAM_PUBLISHER_TOKEN",
            "CREDSTREAM_AGENT_TOKEN",
            "CREDSTREAM_ADMIN_TOKEN",
        )
    }
    return Broker(
        proc=proc,
        url=f"http://{listening}",
        publisher_token=tokens["CREDSTREAM_PUBLISHER_TOKEN"],
        agent_token=tokens["CREDSTREAM_AGENT_TOKEN"],
        admin_token=tokens["CREDSTREAM_ADMIN_TOKEN"],
    )


@dataclass
class DaskCluster:
    scheduler: Proc
    scheduler_file: str
    log_dir: str
    moto_url: str
    workers: list[Proc] = field(default_factory=list)

    def worker_env(self, host: str) -> dict[str, str]:
        """A worker with no credentials of its own; ``host`` names its
        private runtime dir, so workers with the same name share an agent
        as workers on one machine do."""
        home = os.path.join(self.log_dir, f"home-{host}")
        runtime = os.path.join(self.log_dir, f"runtime-{host}")
        for d in (home, runtime, os.path.join(home, "gcloud")):
            os.makedirs(d, mode=0o700, exist_ok=True)
        empty = os.path.join(home, "empty-aws-file")
        open(empty, "w").close()
        return {
            # Not the venv's bin: the plugin must find the packaged agent
            # beside its own Python, as on a worker where nothing put it on PATH.
            "PATH": "/usr/bin:/bin",
            "HOME": home,
            "XDG_RUNTIME_DIR": runtime,
            "AWS_ENDPOINT_URL": self.moto_url,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": empty,
            "AWS_SHARED_CREDENTIALS_FILE": empty,
            "CLOUDSDK_CONFIG": os.path.join(home, "gcloud"),
            "DASK_DISTRIBUTED__WORKER__DAEMON": "False",
            "PYTHONPATH": TESTS_DIR,
        }

    def add_worker(self, host: str, name: str, prefix: tuple[str, ...] = ()) -> Proc:
        """A worker; ``prefix`` runs it under another command (``setpriv``)."""
        proc = Proc(
            f"worker-{name}",
            [
                *prefix,
                os.path.join(VENV_BIN, "dask"),
                "worker",
                "--scheduler-file",
                self.scheduler_file,
                "--name",
                name,
                "--nthreads",
                "2",
                "--host",
                "127.0.0.1",
                "--no-dashboard",
            ],
            self.worker_env(host),
            self.log_dir,
        )
        self.workers.append(proc)
        return proc

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.scheduler.stop()


def start_scheduler(log_dir: str, moto_url: str) -> DaskCluster:
    scheduler_file = os.path.join(log_dir, "scheduler.json")
    proc = Proc(
        "scheduler",
        [
            os.path.join(VENV_BIN, "dask"),
            "scheduler",
            "--scheduler-file",
            scheduler_file,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
        ],
        {"PATH": "/usr/bin:/bin", "HOME": log_dir, "PYTHONPATH": TESTS_DIR},
        log_dir,
    )
    wait_until("the scheduler file", lambda: os.path.exists(scheduler_file), timeout=60)
    proc.wait_for_line(r"Scheduler at:")
    return DaskCluster(
        scheduler=proc, scheduler_file=scheduler_file, log_dir=log_dir, moto_url=moto_url
    )


@pytest.fixture(scope="session")
def log_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="credstream-pytest-")
    print(f"\nlogs: {path}")
    yield path
    if os.environ.get("CREDSTREAM_TEST_KEEP_LOGS") != "1":
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def seal_key_dir(log_dir: str) -> str:
    """Where ``Publisher`` and ``CredstreamPlugin`` keep the clusters' seal
    keys in this session (``$CREDSTREAM_CONFIG_DIR``, which wins over
    ``HOME``): the tests never write to the user's config directory."""
    path = os.path.join(log_dir, "config")
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.environ["CREDSTREAM_CONFIG_DIR"] = path
    return path


def read_seal_key(path: str) -> str:
    """The secret part (base64) of a seal key file's line."""
    with open(path) as f:
        line = f.read().strip()
    assert line.startswith("credstream-seal-v1:"), "a seal key file"
    secret = line.rsplit(":", 1)[1]
    assert len(secret) == 44, "32 bytes in base64"
    return secret


def agent_infos(runtime_dir: str) -> list[dict[str, Any]]:
    """The running agents' ``agent.json`` under a worker's runtime dir, each
    with the ``directory`` it is in."""
    infos: list[dict[str, Any]] = []
    for root, _, files in os.walk(runtime_dir):
        if "agent.json" in files:
            with open(os.path.join(root, "agent.json")) as f:
                info = json.load(f)
            info["directory"] = root
            infos.append(info)
    return infos


def laptop_env(moto: Moto, home: str, key_file: str | None) -> dict[str, str]:
    """What the "laptop" (this test process) mints from: the seeded user's
    long-term keys, STS at moto, and the service-account key."""
    empty = os.path.join(home, "empty-aws-file")
    open(empty, "w").close()
    env = {
        "HOME": home,
        "USER": "laptop-user",
        "AWS_ACCESS_KEY_ID": moto.access_key_id,
        "AWS_SECRET_ACCESS_KEY": moto.secret_access_key,
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_STS": moto.url,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": empty,
        "AWS_SHARED_CREDENTIALS_FILE": empty,
        "CLOUDSDK_CONFIG": os.path.join(home, "gcloud"),
    }
    if key_file:
        env["GOOGLE_APPLICATION_CREDENTIALS"] = key_file
    return env


def pytest_sessionstart(session: pytest.Session) -> None:
    import credstream

    # The tests must exercise the installed wheel, not the source tree.
    if not credstream.__file__.startswith(sys.prefix):
        raise pytest.UsageError(
            f"credstream is imported from {credstream.__file__}, not from this venv ({sys.prefix})"
        )
