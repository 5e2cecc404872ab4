"""Dask integration: every worker served by the packaged ``credstream-agent``.

Register once, from the client; every worker, including those that join
later, is served without a restart::

    from distributed import Client
    import credstream
    from credstream.dask import CredstreamPlugin, send_private_envs

    pub = credstream.Publisher(broker=BROKER, cluster="analysis", token=PUBLISHER_TOKEN)
    client = Client(SCHEDULER)
    client.register_plugin(CredstreamPlugin(broker=BROKER, cluster="analysis",
                                            agent_token=AGENT_TOKEN))
    send_private_envs(pub, {"AUTH_TOKEN_FOR_CUSTOM_DATABASE": "some-token"})

On each worker the plugin starts ``credstream-agent run`` (one per host when
several workers share a host, stopped when the last of them stops), waits
until it holds every credential the publisher declared, and sets in the
worker's ``os.environ`` only *pointers*: ``AWS_CONTAINER_CREDENTIALS_FULL_URI``
and ``AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`` (boto3, s3fs and every AWS SDK),
``GCE_METADATA_HOST``/``GCE_METADATA_IP`` (google-auth, gcsfs), the
publisher's region, plus the private env. Credentials themselves stay in the
agent and are fetched by the SDKs when they need them. The agent token rides
in the plugin (it is the worker's proof that it belongs to the cluster) but
is never put in ``os.environ``; no credential and no private env value goes
through the Dask scheduler: private env sent later reaches the workers'
``os.environ`` from the broker, through each host's agent.

Sealing: by default the plugin reads the cluster's seal key on the client,
from the file :class:`credstream.Publisher` and ``credstream publish`` use
(creating it there, as they would, if there is none yet), and carries it
to every worker's agent with the agent token, so the agents accept only what
the publisher sealed and the broker relays credentials it cannot read. Pass
``seal_key_file=`` for another file, or ``seal=False`` for a publisher with
``seal=False``. On the worker the key reaches the agent on a pipe: never in
``os.environ``, an argument or a file. The key, like the agent token, passes
through the Dask scheduler inside the plugin; it never reaches the broker.

A key per session: with ``Publisher(..., seal_key="session")`` the publisher
seals with a key made for it alone, in memory, and
:meth:`CredstreamPlugin.from_publisher` carries that key (or the
publisher's key file, or none, as it seals); the next session of the same
cluster name has another key, which the old session's agents refuse.

What stays where: on each worker the plugin object drops the agent token
and the seal key once the agent holds them, so a task reading
``get_worker().plugins[...]`` finds neither; the agent and its supervisor
are non-dumpable, so a task of the same user cannot read their memory. The
scheduler keeps the registered plugin, pickled, to set up workers that join
later: any client of the cluster can read the token and the key there
(``run_on_scheduler``). A short agent token and a session key limit what
that copy is worth (README "Who on the cluster can read what").

fsspec caches filesystem instances: an ``s3fs.S3FileSystem()`` (or gcsfs)
created in a worker *before* the plugin ran keeps the session it found then
(none), and ``fsspec.filesystem("s3")`` hands that same instance back. Create
filesystems inside tasks, after registration, or pass
``skip_instance_cache=True`` (or call ``s3fs.S3FileSystem.clear_instance_cache()``
once after registering).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Union

from distributed.diagnostics.plugin import WorkerPlugin

from . import _credstream, _host
from ._credstream import ConfigurationError

if TYPE_CHECKING:
    import credstream

PathLike = Union[str, "os.PathLike[str]"]

logger = logging.getLogger("credstream.dask")

__all__ = ["AgentNotReadyError", "CredstreamPlugin", "agent_binary", "send_private_envs"]

#: Variables of the agent's env file that carry a secret value: the local
#: authorization token (the worker reads it from the token file instead)
#: and the Google access token (served by the metadata emulation).
_SECRET_VALUES = {"AWS_CONTAINER_AUTHORIZATION_TOKEN", "CLOUDSDK_AUTH_ACCESS_TOKEN"}
_AWS_POINTERS = ("AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
_GCE_POINTERS = ("GCE_METADATA_HOST", "GCE_METADATA_IP")
_FOLLOW_INTERVAL = 0.25


class AgentNotReadyError(RuntimeError):
    """The worker's agent did not become ready in time; the message says
    what it was waiting for (a publisher, a credential, the private env)."""


def agent_binary() -> str:
    """The ``credstream-agent`` installed with this package (the wheel puts
    it in the environment's ``bin/``), else the one on ``PATH``."""
    name = "credstream-agent"
    scripts = sysconfig.get_path("scripts")
    for directory in (scripts, os.path.dirname(sys.executable)):
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(
        f"{name} is not installed beside this Python ({scripts}) nor on PATH; "
        "install the credstream wheel on the workers (`pip install credstream`)"
    )


def parse_env_file(text: str) -> dict[str, str]:
    """Reads the agent's env file: ``NAME='value'`` lines, each ``'`` in a
    value written as ``'"'"'``; values may span lines."""
    env: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        if text[i] == "\n":
            i += 1
            continue
        eq = text.index("=", i)
        name = text[i:eq]
        i = eq + 1
        value = []
        while i < n and text[i] != "\n":
            quote = text[i]
            if quote not in "'\"":
                raise ValueError(f"unquoted value for {name}")
            end = text.index(quote, i + 1)
            value.append(text[i + 1 : end])
            i = end + 1
        env[name] = "".join(value)
    return env


def _agent_id(directory: str) -> str:
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()) or "host"
    suffix = hashlib.sha256(directory.encode()).hexdigest()[:8]
    return f"{host[:100]}-{suffix}"


class _Follower:
    """Keeps a worker's ``os.environ`` in step with its agent's env file."""

    def __init__(self, agent: _host.HostAgent) -> None:
        self.agent = agent
        self.applied: dict[str, str] = {}
        self._seen: tuple[int, int, int] | None = None
        self._desired: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._token_file: str | None = None

    def _probe(self, path: str, headers: Mapping[str, str]) -> bool:
        """HEAD on the agent: is a live credential there? (No body, so no
        secret, crosses the socket.)"""
        request = urllib.request.Request(
            f"http://{self.agent.address}{path}", method="HEAD", headers=dict(headers)
        )
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                status: int = response.status
                return status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _aws_live(self) -> bool:
        if not self._token_file:
            return False
        try:
            with open(self._token_file) as f:
                token = f.read()
        except OSError:
            return False
        return self._probe("/aws/credentials", {"Authorization": token})

    def _gcp_live(self) -> bool:
        return self._probe(
            "/computeMetadata/v1/instance/service-accounts/default/token",
            {"Metadata-Flavor": "Google"},
        )

    def refresh(self) -> None:
        """Reads the env file if it changed and applies what it says."""
        try:
            stat = os.stat(self.agent.env_file)
        except FileNotFoundError:
            return
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if key != self._seen:
            with open(self.agent.env_file) as f:
                text = f.read()
            self._desired = {
                k: v for k, v in parse_env_file(text).items() if k not in _SECRET_VALUES
            }
            self._seen = key
            self._token_file = self._desired.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
        desired = dict(self._desired)
        # A kind the publisher revoked (or let expire) gets no pointers, so
        # SDKs then behave as on a machine without credentials (boto3's
        # NoCredentialsError) instead of asking an agent that has none.
        if "AWS_CONTAINER_CREDENTIALS_FULL_URI" in desired and not self._aws_live():
            for name in _AWS_POINTERS:
                desired.pop(name, None)
        if "GCE_METADATA_HOST" in desired and not self._gcp_live():
            for name in _GCE_POINTERS:
                desired.pop(name, None)
        self.apply(desired)

    def apply(self, desired: dict[str, str]) -> None:
        for name in list(self.applied):
            if name not in desired:
                if os.environ.get(name) == self.applied[name]:
                    del os.environ[name]
                del self.applied[name]
        for name, value in desired.items():
            if self.applied.get(name) != value or os.environ.get(name) != value:
                os.environ[name] = value
                self.applied[name] = value

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name="credstream-env-follower", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(_FOLLOW_INTERVAL):
            try:
                self.refresh()
            except Exception:  # keep following; the next change may parse
                logger.exception("credstream: cannot apply the agent's env file")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.apply({})


def _ready(address: str) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(f"http://{address}/readyz", timeout=2) as response:
            return response.status == 200, "ready"
    except urllib.error.HTTPError as error:
        body = error.read().decode(errors="replace")
        # Not JSON, or not an object: the body as it is.
        with contextlib.suppress(ValueError, AttributeError):
            body = json.loads(body).get("message", body)
        return False, str(body)
    except (urllib.error.URLError, OSError) as error:
        return False, f"the agent at {address} does not answer: {error}"


def _last_refusal(log: str) -> str | None:
    """The agent's last "refused an update" line (a reason, never content):
    a publisher that seals while the plugin does not, or the other way."""
    try:
        with open(log, errors="replace") as f:
            lines = [line.strip() for line in f if "refused an update" in line]
    except OSError:
        return None
    return lines[-1] if lines else None


class CredstreamPlugin(WorkerPlugin):
    """Serves every Dask worker the credentials and private env published
    to ``cluster`` (a :class:`credstream.Publisher` or ``credstream
    publish``), through the packaged ``credstream-agent``.

    Register it once, from the client; workers that join later run it too::

        client.register_plugin(CredstreamPlugin(broker="https://broker:50051",
                                                cluster="analysis",
                                                agent_token=AGENT_TOKEN))

    :param broker: the broker URL, as the workers reach it.
    :param cluster: the cluster id.
    :param agent_token: an agent token for the cluster (it travels inside
        the plugin to the workers: it proves a worker belongs to the
        cluster, and lets it read the cluster's credentials). A worker's
        copy of the plugin drops it, and the seal key, once its agent holds
        them; the scheduler's copy keeps both.
    :param ready_timeout: seconds to wait on each worker for the agent to
        hold every declared credential (and the private env); then setup
        fails with :class:`AgentNotReadyError` saying what was missing.
    :param gce_metadata: serve the GCE metadata emulation (google-auth).
    :param ca_cert: on the workers, a PEM CA bundle for the broker.
    :param tls_client_cert: on the workers, a client certificate (mutual TLS).
    :param tls_client_key: its key.
    :param insecure: allow ``http://`` to a broker not on the worker's host.
    :param seal: give every agent the cluster's seal key (the default), so
        it accepts only what the publisher sealed; ``False`` for a publisher
        with ``seal=False`` (an agent with the key refuses unsealed updates,
        one without it refuses sealed ones).
    :param seal_key_file: on the client, the seal key file the publisher
        uses (``Publisher.seal_key_file``), when it is not the default
        ``<config>/credstream/seal-keys/<cluster>.key``. Read, or created
        (mode 0600) as the publisher would, when the plugin is made; a file
        that cannot be used raises :class:`credstream.ConfigurationError`
        then, before anything is registered or started.
    """

    name = "credstream"

    def __init__(
        self,
        broker: str,
        cluster: str,
        agent_token: str,
        *,
        ready_timeout: float = 60.0,
        gce_metadata: bool = True,
        ca_cert: str | None = None,
        tls_client_cert: str | None = None,
        tls_client_key: str | None = None,
        insecure: bool = False,
        name: str | None = None,
        seal: bool = True,
        seal_key_file: PathLike | None = None,
    ) -> None:
        if not agent_token or not isinstance(agent_token, str):
            raise ValueError("agent_token must be the cluster's agent token")
        # The two secrets: on a worker, dropped once its agent holds them
        # (see `attach`).
        self._agent_token: str | None = agent_token
        self._seal_key: str | None = None
        self.seal_key_id: str | None = None
        if seal:
            path = None if seal_key_file is None else os.path.expanduser(os.fspath(seal_key_file))
            # The publisher's own lookup (Rust, `credstream publish`'s): the
            # same file, created there if missing, the same errors.
            self._seal_key, self.seal_key_id, _ = _credstream.seal_key(cluster, path)
        elif seal_key_file is not None:
            raise ConfigurationError(
                "seal=False and seal_key_file go against each other: give one or neither"
            )
        self.broker = broker
        self.cluster = cluster
        self.ready_timeout = float(ready_timeout)
        self.gce_metadata = gce_metadata
        self.ca_cert = ca_cert
        self.tls_client_cert = tls_client_cert
        self.tls_client_key = tls_client_key
        self.insecure = insecure
        if name is not None:
            self.name = name
        self._agent: _host.HostAgent | None = None
        self._follower: _Follower | None = None

    @property
    def sealed(self) -> bool:
        """True if the plugin gives the agents a seal key."""
        return self.seal_key_id is not None

    @classmethod
    def from_publisher(
        cls,
        publisher: credstream.Publisher,
        agent_token: str,
        *,
        broker: str | None = None,
        ready_timeout: float = 60.0,
        gce_metadata: bool = True,
        ca_cert: str | None = None,
        tls_client_cert: str | None = None,
        tls_client_key: str | None = None,
        insecure: bool = False,
        name: str | None = None,
    ) -> CredstreamPlugin:
        """The plugin for the workers of ``publisher``'s cluster, sealed as
        the publisher seals: with its session key
        (``Publisher(seal_key="session")``: a key made for that publisher
        alone, in memory, that this call takes from it), its key file, or
        not at all (``seal=False``). Call it in the publisher's process::

            pub = credstream.Publisher(broker=BROKER, cluster="analysis",
                                       token=PUBLISHER_TOKEN, seal_key="session")
            client.register_plugin(CredstreamPlugin.from_publisher(pub, AGENT_TOKEN))

        :param broker: the broker URL as the workers reach it, when not the
            publisher's.

        The other parameters are the constructor's.
        """
        plugin = cls(
            broker if broker is not None else publisher.broker,
            publisher.cluster,
            agent_token,
            ready_timeout=ready_timeout,
            gce_metadata=gce_metadata,
            ca_cert=ca_cert,
            tls_client_cert=tls_client_cert,
            tls_client_key=tls_client_key,
            insecure=insecure,
            name=name,
            seal=False,
        )
        if publisher.sealed:
            line = publisher._session_seal_key()
            key_id = publisher.seal_key_id
            if line is None:
                # The cluster's key file, read as the constructor reads it.
                line, key_id, _ = _credstream.seal_key(publisher.cluster, publisher.seal_key_file)
            plugin._seal_key, plugin.seal_key_id = line, key_id
        return plugin

    def __repr__(self) -> str:  # neither the token nor the key is shown
        sealed = f"seal_key_id={self.seal_key_id!r}" if self.sealed else "seal=False"
        return f"CredstreamPlugin(broker={self.broker!r}, cluster={self.cluster!r}, {sealed})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_agent"] = None
        state["_follower"] = None
        return state

    def _agent_args(self) -> list[str]:
        args: list[str] = []
        if not self.gce_metadata:
            args.append("--no-gce-metadata")
        if self.ca_cert:
            args += ["--ca-cert", os.path.expanduser(self.ca_cert)]
        if self.tls_client_cert:
            args += ["--tls-client-cert", os.path.expanduser(self.tls_client_cert)]
        if self.tls_client_key:
            args += ["--tls-client-key", os.path.expanduser(self.tls_client_key)]
        if self.insecure:
            args.append("--insecure")
        return args

    def attach(self) -> None:
        """Starts (or joins) the host's agent, waits until it is ready and
        points ``os.environ`` at it. Blocking; ``setup`` runs it in a thread.

        The agent token and the seal key leave this object here, whatever
        happens: the agent holds them (or could not start), and tasks on the
        worker reach this object as ``get_worker().plugins[name]``. Python
        frees the strings but does not wipe them; the scheduler's pickled
        copy keeps both (it sets up workers that join later)."""
        deadline = time.monotonic() + self.ready_timeout
        args = self._agent_args()
        token, seal_key = self._agent_token, self._seal_key
        self._agent_token = self._seal_key = None
        if token is None:
            raise AgentNotReadyError(
                f"this CredstreamPlugin for cluster {self.cluster!r} already handed its agent "
                "token and seal key to an agent, and kept neither\n  fix: register a new "
                "CredstreamPlugin (client.register_plugin) to attach again"
            )
        directory = _host.host_dir(self.broker, self.cluster, token, "\0".join(args), seal_key)
        try:
            agent = _host.attach(
                agent_binary=agent_binary(),
                broker=self.broker,
                cluster=self.cluster,
                agent_token=token,
                agent_args=args,
                agent_id=_agent_id(directory),
                start_timeout=self.ready_timeout,
                seal_key=seal_key,
            )
        except _host.AgentError as error:
            raise AgentNotReadyError(str(error)) from None
        finally:
            del token, seal_key
        try:
            reason = "not asked yet"
            while True:
                ready, reason = _ready(agent.address)
                if ready:
                    break
                if time.monotonic() >= deadline:
                    refused = _last_refusal(os.path.join(agent.directory, "agent.log"))
                    if refused:
                        reason += f"; the agent refused what the broker sent: {refused}"
                    raise AgentNotReadyError(
                        f"credstream-agent for cluster {self.cluster!r} at {self.broker} was not "
                        f"ready within {self.ready_timeout:g}s: {reason}\n  fix: start the "
                        f"publisher (credstream.Publisher or `credstream publish`) for cluster "
                        f"{self.cluster!r}; check that this worker reaches the broker; "
                        f"the agent's log is {os.path.join(agent.directory, 'agent.log')}"
                    )
                time.sleep(0.05)
            follower = _Follower(agent)
            # The agent writes its env file once ready; apply it before
            # returning, so the first task already sees it.
            while True:
                follower.refresh()
                if follower.applied or time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
        except BaseException:
            agent.detach()
            raise
        follower.start()
        self._agent, self._follower = agent, follower

    def detach(self) -> None:
        """Removes what the plugin set from ``os.environ`` and lets go of
        the agent (the last worker on the host stops it)."""
        follower, agent = self._follower, self._agent
        self._follower = self._agent = None
        if follower is not None:
            follower.stop()
        if agent is not None:
            agent.detach()

    async def setup(self, worker: Any) -> None:
        """Called by distributed on every worker (and each one that joins)."""
        await asyncio.get_running_loop().run_in_executor(None, self.attach)

    async def teardown(self, worker: Any) -> None:
        """Called by distributed when the worker closes or the plugin is removed."""
        await asyncio.get_running_loop().run_in_executor(None, self.detach)


def send_private_envs(target: Any, env: Mapping[str, str]) -> None:
    """Sends private environment variables to every worker, like Coiled's
    ``cluster.send_private_envs(env)``, but through the broker, never the
    Dask scheduler.

    ``target`` is the :class:`credstream.Publisher` publishing to the
    cluster, or a Dask ``Client`` or cluster object: then the publisher is
    the one live :class:`credstream.Publisher` of this process (an error if
    there is none or several). Running workers see the variables in
    ``os.environ`` within a moment, without a restart; use
    ``Publisher.wait_delivered()`` to wait for every agent.
    """
    import credstream

    if isinstance(target, credstream.Publisher):
        publisher = target
    else:
        live = [p for p in list(credstream._live) if p.running]
        if len(live) != 1:
            raise credstream.ConfigurationError(
                f"send_private_envs needs the credstream.Publisher to send through: {len(live)} "
                "are running in this process; pass the publisher itself as the first argument"
            )
        publisher = live[0]
    publisher.send_private_envs(env)
