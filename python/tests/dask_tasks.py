"""What the Dask tests run on the workers. A module of its own, on the
scheduler's and workers' PYTHONPATH (the tests directory, not the source
package), because distributed pickles task functions by reference."""

from __future__ import annotations

import os
import time
from typing import Any


# Unannotated, as user code is: the calls below say so to mypy.
def read_object(bucket, key):  # type: ignore[no-untyped-def]
    # The seed's function, verbatim.
    import boto3

    s3 = boto3.client("s3")
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def _signing_key(request: Any) -> str:
    """The access key that signed a botocore request."""
    auth: str | bytes = request.headers.get("Authorization", b"")
    if isinstance(auth, bytes):
        auth = auth.decode()
    return auth.split("Credential=", 1)[1].split("/", 1)[0]


def read_both(bucket: str, key: str) -> dict[str, object]:
    """boto3 (the seed's read_object) and s3fs, each with the key that
    signed its request; plus what the worker's environment holds."""
    import boto3
    import s3fs

    seen: list[str] = []
    boto3.setup_default_session()
    boto3.DEFAULT_SESSION.events.register(
        "before-send.s3.GetObject", lambda request, **kw: seen.append(_signing_key(request))
    )
    body = read_object(bucket, key)  # type: ignore[no-untyped-call]
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs_body = fs.cat(f"{bucket}/{key}")
    return {
        "pid": os.getpid(),
        "boto3": body.decode(),
        "boto3_key": seen[-1],
        "s3fs": fs_body.decode(),
        "env": {
            k: os.environ.get(k)
            for k in (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                "AWS_CONTAINER_AUTHORIZATION_TOKEN",
                "CLOUDSDK_AUTH_ACCESS_TOKEN",
                "GCE_METADATA_HOST",
                "GCE_METADATA_IP",
                "AWS_DEFAULT_REGION",
                "AWS_ACCESS_KEY_ID",
                "AUTH_TOKEN_FOR_CUSTOM_DATABASE",
            )
        },
        "environ_values": list(os.environ.values()),
    }


def try_read(bucket: str, key: str) -> str:
    """The error class a fresh boto3 read raises, or "ok"."""
    import boto3

    boto3.setup_default_session()
    try:
        read_object(bucket, key)  # type: ignore[no-untyped-call]
        return "ok"
    # Any error: its class is the answer the tests check (botocore's
    # NoCredentialsError once the publisher revoked).
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__module__}.{type(error).__name__}: {error}"


def getenv(name: str) -> tuple[int, str | None]:
    return os.getpid(), os.environ.get(name)


def google_default() -> dict[str, str | None]:
    import google.auth
    from google.auth.transport.requests import Request

    credentials, project = google.auth.default()
    credentials.refresh(Request())  # type: ignore[no-untyped-call]
    return {
        "class": f"{type(credentials).__module__}.{type(credentials).__name__}",
        "project": str(project),
        "email": str(getattr(credentials, "service_account_email", None)),
        "token": credentials.token,
    }


def read_through_rotation(bucket: str, key: str, timeout: float) -> dict[str, object]:
    """One boto3 client and one s3fs filesystem, made once, read in a loop
    until both have signed with a second access key (or ``timeout``)."""
    import boto3
    import s3fs

    session = boto3.session.Session()
    client = session.client("s3")
    boto_keys: list[str] = []
    client.meta.events.register(
        "before-send.s3.GetObject", lambda request, **kw: boto_keys.append(_signing_key(request))
    )
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs_keys: list[str] = []

    def fs_key() -> str:
        # The key s3fs's (aiobotocore's) signer holds now; refreshed from
        # the agent as botocore's is.
        from fsspec.asyn import sync

        credentials = fs.s3._request_signer._credentials
        access_key: str = sync(fs.loop, credentials.get_frozen_credentials).access_key
        return access_key

    failures: list[str] = []
    reads = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            assert body == b"hello from moto s3", body
            fs_body = fs.cat(f"{bucket}/{key}")
            assert fs_body == b"hello from moto s3", fs_body
            fs_keys.append(fs_key())
            reads += 1
        # Any error is a failed read through the rotation; the test asserts
        # there were none, and shows them.
        except Exception as error:  # noqa: BLE001
            failures.append(f"{type(error).__name__}: {error}")
        if len(set(boto_keys)) >= 2 and len(set(fs_keys)) >= 2:
            break
        time.sleep(0.5)
    return {
        "boto3": list(dict.fromkeys(boto_keys)),
        "s3fs": list(dict.fromkeys(fs_keys)),
        "reads": reads,
        "failures": failures,
    }


def environ_values() -> list[str]:
    """Every value in the worker's ``os.environ``."""
    return list(os.environ.values())


def plugin_state(name: str) -> dict[str, object]:
    """What a task can read of the worker's copy of a plugin: its
    attributes (``vars()``), its repr and its pickle."""
    import pickle

    from distributed import get_worker

    plugin = get_worker().plugins[name]
    return {
        "vars": {key: repr(value) for key, value in vars(plugin).items()},
        "repr": repr(plugin),
        "pickle": pickle.dumps(plugin),
    }


def _open_proc(pid: int, name: str) -> str:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            if name == "environ":
                f.read(1)
        return "read"
    except OSError as error:
        return type(error).__name__


def probe_memory(pids: dict[str, int]) -> dict[str, dict[str, str]]:
    """From the task's own process (the worker: same user, same
    capabilities as the processes it started), tries to open
    ``/proc/PID/mem`` and read ``/proc/PID/environ`` of each pid, and of a
    control: a dumpable process this task starts. ``"read"``, or the
    error's class."""
    import subprocess

    control = subprocess.Popen(["sleep", "60"])
    try:
        found = {"control": {n: _open_proc(control.pid, n) for n in ("mem", "environ")}}
    finally:
        control.kill()
        control.wait()
    for label, pid in pids.items():
        found[label] = {n: _open_proc(pid, n) for n in ("mem", "environ")}
    return found
