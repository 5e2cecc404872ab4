"""credstream: your own short-lived cloud credentials on every worker.

Publish from a notebook; every worker of a Dask cluster is served (see
:mod:`credstream.dask`)::

    import credstream
    pub = credstream.Publisher(broker="https://broker:50051", cluster="analysis",
                               token=..., gcp=False)          # starts in the background
    pub.send_private_envs({"AUTH_TOKEN_FOR_CUSTOM_DATABASE": "some-token"})
    pub.wait_delivered(timeout=60)   # every connected agent holds the latest version
    pub.status()                     # agents, versions, expiry: never a secret
    pub.close()                      # also a context manager; optional revoke

:class:`Publisher` is ``credstream publish`` as an object: the same Rust code
mints (from ``aws-config``'s default chain and Google's application default
credentials) and keeps the stream to the broker, on a background runtime that
keeps answering the broker's refresh requests after the cell returns, until
:meth:`Publisher.close` or the interpreter exits.

Like ``credstream publish``, it seals every credential and private env change
for the cluster's agents by default (``docs/sealing.md``), with the cluster's
seal key, created in your config directory on first use; the broker relays
what it cannot read. :class:`credstream.dask.CredstreamPlugin` carries the
same key to every worker's agent.

The wheel also puts the ``credstream`` and ``credstream-agent`` commands on
``PATH``.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import logging
import os
import threading
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Union

from . import _credstream
from ._credstream import (
    AuthenticationError,
    BrokerUnreachableError,
    ConfigurationError,
    CredstreamError,
    DeliveryTimeoutError,
    NoCredentialsError,
    PermissionDeniedError,
    PublisherClosedError,
    TakenOverError,
    TLSError,
)

if TYPE_CHECKING:
    from typing_extensions import Self

__version__: str = _credstream.__version__

__all__ = [
    "AuthenticationError",
    "BrokerUnreachableError",
    "ConfigurationError",
    "CredstreamError",
    "CredstreamWarning",
    "DeliveryTimeoutError",
    "NoCredentialsError",
    "PermissionDeniedError",
    "Publisher",
    "PublisherClosedError",
    "TLSError",
    "TakenOverError",
    "__version__",
]

PathLike = Union[str, "os.PathLike[str]"]

logger = logging.getLogger("credstream")


class CredstreamWarning(UserWarning):
    """A kind asked for is skipped (no local credentials for it); the others
    are still published, as ``credstream publish`` does."""


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _seconds(value: float | str | _dt.timedelta | None, name: str) -> float | None:
    """Seconds from a number, a ``timedelta`` or ``"90s"``/``"15m"``/``"12h"``."""
    if value is None:
        return None
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text and text[-1] in _UNITS:
            try:
                return float(text[:-1]) * _UNITS[text[-1]]
            except ValueError:
                pass
        else:
            try:
                return float(text)
            except ValueError:
                pass
    raise ConfigurationError(
        f"{name} must be seconds, a timedelta or a string like '15m' or '12h', not {value!r}"
    )


def _expand(path: PathLike | None) -> str | None:
    return None if path is None else os.path.expanduser(os.fspath(path))


def _tag_pairs(tags: object) -> list[tuple[str, str]]:
    """``aws_tags`` as the CLI's ``--aws-tag KEY=VALUE`` pairs (the minter
    checks the characters STS allows, and says which). Takes anything: an
    untyped caller's wrong type gets a :class:`ConfigurationError`."""
    if tags is None:
        return []
    if not isinstance(tags, Mapping):
        raise ConfigurationError("aws_tags must be a mapping of session tag keys to values")
    pairs = []
    for key, value in tags.items():
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise ConfigurationError(
                f"aws_tags: every key must be a non-empty string and every value a string, "
                f"not {key!r}: {value!r}"
            )
        pairs.append((key, value))
    return pairs


def _env_pairs(env: object, name: str = "env") -> list[tuple[str, str]]:
    """``env`` as name, value pairs; anything but a mapping of strings to
    strings (an untyped caller's) is a :class:`ConfigurationError`."""
    if env is None:
        return []
    if not isinstance(env, Mapping):
        raise ConfigurationError(f"{name} must be a mapping of variable names to strings")
    pairs = []
    for key, value in env.items():
        if not isinstance(key, str) or not isinstance(value, str):
            # Not echoed: the value may be a secret.
            raise ConfigurationError(
                f"{name}: every name and value must be a string (the value of {key!r} is a "
                f"{type(value).__name__})"
            )
        pairs.append((key, value))
    return pairs


def _timestamp(seconds: float | None) -> _dt.datetime | None:
    if seconds is None:
        return None
    return _dt.datetime.fromtimestamp(seconds, tz=_dt.timezone.utc)


_live: weakref.WeakSet[Publisher] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # At interpreter exit: revoke where asked (revoke_on_close) and end the
    # streams cleanly instead of leaving the broker to notice a dead socket.
    for publisher in list(_live):
        with contextlib.suppress(CredstreamError):
            publisher.close()


class Publisher:
    """Publishes credentials minted from your local identity, and a private
    environment, to every agent of one cluster, and keeps them fresh.

    Takes the options of ``credstream publish``. It checks the broker (the
    URL, TLS and the token) and your local identities at once, raising a
    :class:`CredstreamError` subclass whose message ends with the fix:

    - :class:`AuthenticationError`: the broker rejected the token;
    - :class:`PermissionDeniedError`: a token for another cluster or role;
    - :class:`BrokerUnreachableError`: nothing answers at ``broker``;
    - :class:`TLSError`: the certificate is not trusted (pass ``ca_cert``),
      the broker wants a client certificate, or ``http://`` to a remote host;
    - :class:`NoCredentialsError`: nothing to publish (no local credentials
      for any kind asked for, and no ``env``);
    - :class:`ConfigurationError`: an unreadable file, a bad variable, a
      duration out of range.

    A kind without local credentials is skipped with a
    :class:`CredstreamWarning`, as the CLI skips it with a note.

    Sealing is on by default, as in ``credstream publish``: every credential
    and private env change is sealed for the cluster's agents with the
    cluster's seal key, so the broker relays what it cannot read (and
    :meth:`status` shows no env names, only that the env is sealed). The key
    is ``seal_key_file``, else ``<config>/credstream/seal-keys/<cluster>.key``
    (``<config>``: ``$CREDSTREAM_CONFIG_DIR``, ``$XDG_CONFIG_HOME`` or
    ``~/.config``), created (mode 0600) on first use. Agents need it:
    :class:`credstream.dask.CredstreamPlugin` reads the same file and carries
    it to every worker; for agents started by hand, ``credstream seal-key
    --cluster ID > F`` then ``credstream-agent run --seal-key-file F``. A key
    file that cannot be used (readable by others, another cluster's, not a
    key) raises :class:`ConfigurationError` before anything is sent, and is
    left as it was. ``seal=False`` publishes in clear (agents holding the
    key then refuse it).

    Then it runs in the background: it answers every refresh request of the
    broker (at half each credential's lifetime) until :meth:`close`, or
    until the interpreter exits.

    Example::

        with credstream.Publisher(broker="https://broker:50051", cluster="analysis",
                                  token_file="~/.credstream/analysis.token",
                                  aws_role_arn="arn:aws:iam::123456789012:role/reader",
                                  gcp=False, revoke_on_close=True) as pub:
            pub.send_private_envs({"AUTH_TOKEN_FOR_CUSTOM_DATABASE": "some-token"})
            pub.wait_delivered(timeout=60)
            ...

    :param broker: ``https://HOST:PORT``, or ``http://127.0.0.1:PORT`` for a
        broker on this machine.
    :param cluster: the cluster id.
    :param token: the publisher token (or give ``token_file``).
    :param token_file: a file holding the publisher token.
    :param aws: publish AWS credentials (``--no-aws`` when false).
    :param gcp: publish a Google access token (``--no-gcp`` when false).
    :param aws_profile: the AWS profile to mint from.
    :param aws_role_arn: forward this role's credentials (AssumeRole).
    :param aws_session_policy: down-scope the role with the IAM policy in
        this JSON file.
    :param aws_duration: each AWS credential's lifetime: seconds, a
        ``timedelta`` or ``"15m"``..``"36h"`` (default 12 h; at most 12 h
        with a role).
    :param gcp_scopes: OAuth2 scopes of the Google token.
    :param env: private environment variables for the workers.
    :param env_files: dotenv files of private variables (``env`` wins).
    :param revoke_on_close: revoke everything at :meth:`close` (and at
        interpreter exit) so agents stop serving it at once.
    :param ca_cert: a PEM CA bundle that signed the broker's certificate.
    :param tls_client_cert: a client certificate for a mutual-TLS broker.
    :param tls_client_key: its private key.
    :param insecure: allow ``http://`` to a broker not on this machine.
    :param seal: seal for the cluster's agents (``--no-seal`` when false).
    :param seal_key_file: the cluster's seal key file (``--seal-key-file``;
        created, mode 0600, if missing).
    :param aws_source_identity: with ``aws_role_arn``, the ``SourceIdentity``
        CloudTrail records on every call made with the role's credentials
        (``--aws-source-identity``; default: your own identity's name, from
        ``GetCallerIdentity``). The trust policy must allow
        ``sts:SetSourceIdentity``.
    :param aws_tags: with ``aws_role_arn``, transitive session tags
        (``--aws-tag KEY=VALUE``), besides ``credstream-cluster=<cluster>``,
        which is always set; the trust policy must allow ``sts:TagSession``.
        The role session is named ``credstream-<cluster>``, as by the CLI.
    """

    def __init__(
        self,
        broker: str,
        cluster: str,
        token: str | None = None,
        *,
        token_file: PathLike | None = None,
        aws: bool = True,
        gcp: bool = True,
        aws_profile: str | None = None,
        aws_role_arn: str | None = None,
        aws_session_policy: PathLike | None = None,
        aws_duration: float | str | _dt.timedelta | None = None,
        gcp_scopes: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        env_files: Iterable[PathLike] | None = None,
        revoke_on_close: bool = False,
        ca_cert: PathLike | None = None,
        tls_client_cert: PathLike | None = None,
        tls_client_key: PathLike | None = None,
        insecure: bool = False,
        seal: bool = True,
        seal_key_file: PathLike | None = None,
        aws_source_identity: str | None = None,
        aws_tags: Mapping[str, str] | None = None,
        seal_key: Literal["file", "session"] = "file",
    ) -> None:
        if token is not None and token_file is not None:
            raise ConfigurationError("give the publisher token as token or token_file, not both")
        if token is None and token_file is None:
            raise ConfigurationError(
                "give the publisher token with token_file=... or token=... "
                "(`credstream-broker token --role publisher --cluster ...` issues one)"
            )
        if seal_key not in ("file", "session"):
            raise ConfigurationError(
                f'seal_key must be "file" (the cluster\'s key file) or "session" (a key made '
                f"for this publisher only), not {seal_key!r}"
            )
        self._lock = threading.Lock()
        self._cluster = cluster
        self._broker = broker
        self._native = _credstream.NativePublisher(
            broker,
            cluster,
            token,
            _expand(token_file),
            bool(aws),
            bool(gcp),
            aws_profile,
            aws_role_arn,
            _expand(aws_session_policy),
            _seconds(aws_duration, "aws_duration"),
            list(gcp_scopes or []),
            _env_pairs(env),
            [os.path.expanduser(os.fspath(f)) for f in (env_files or [])],
            bool(revoke_on_close),
            _expand(ca_cert),
            _expand(tls_client_cert),
            _expand(tls_client_key),
            bool(insecure),
            bool(seal),
            _expand(seal_key_file),
            aws_source_identity,
            _tag_pairs(aws_tags),
            session_seal_key=seal_key == "session",
        )
        for line in self._native.identity_lines():
            if ": not publishing " in line:
                warnings.warn(line, CredstreamWarning, stacklevel=2)
        self._sealing, self._seal_key_id, key_file = self._native.seal_info()
        self._seal_key_file = None if key_file is None else os.fspath(key_file)
        logger.info("%s", self._sealing)
        _live.add(self)

    @property
    def cluster(self) -> str:
        """The cluster id."""
        return self._cluster

    @property
    def broker(self) -> str:
        """The broker URL, as given."""
        return self._broker

    @property
    def kinds(self) -> list[str]:
        """The credential kinds being published: ``"aws"``, ``"gcp"``."""
        return list(self._native.kinds())

    @property
    def identities(self) -> list[str]:
        """Who each kind publishes as (or why it is skipped): the lines
        ``credstream publish`` prints first. No secrets."""
        return list(self._native.identity_lines())

    @property
    def sealed(self) -> bool:
        """True if this publisher seals (the default; ``seal=False`` not given)."""
        return self._seal_key_id is not None

    @property
    def seal_key_id(self) -> str | None:
        """The seal key's id (16 hex digits, as agents log it), or ``None``
        when not sealing. Not secret."""
        return self._seal_key_id

    @property
    def seal_key_file(self) -> str | None:
        """The file the seal key is in (pass it to
        ``CredstreamPlugin(seal_key_file=...)`` when it is not the default),
        or ``None`` when not sealing or sealing with a session key
        (``seal_key="session"``), which is in no file."""
        return self._seal_key_file

    def _session_seal_key(self) -> str | None:
        """The session key's line (secret), for
        :meth:`credstream.dask.CredstreamPlugin.from_publisher` only;
        ``None`` unless ``seal_key="session"``."""
        line = self._native.session_seal_key()
        return None if line is None else str(line)

    @property
    def sealing(self) -> str:
        """What ``credstream publish`` prints about sealing: the key's id and
        file and how agents get it, or that it does not seal."""
        return self._sealing

    @property
    def running(self) -> bool:
        """True until :meth:`close` or an error no retry can fix."""
        return bool(self._native.is_running())

    def send_private_envs(self, env: Mapping[str, str]) -> None:
        """Sets (merges) private environment variables on every worker,
        through the broker, never the Dask scheduler. Names are
        ``[A-Za-z_][A-Za-z0-9_]*``; values at most 32 KiB. A bad variable
        raises :class:`ConfigurationError` and nothing is sent.

        Returns once the change is on its way; :meth:`wait_delivered`
        waits until the agents hold it."""
        self._native.send_private_envs(_env_pairs(env))

    def unset_private_envs(self, names: Iterable[str]) -> None:
        """Removes private environment variables from every worker."""
        self._native.unset_private_envs([str(n) for n in names])

    def wait_delivered(self, timeout: float = 60, *, min_agents: int = 0) -> None:
        """Waits until the broker holds a live credential of every kind
        published and the latest private env change, and every connected
        agent (at least ``min_agents`` of them) holds the cluster's latest
        version. Raises :class:`DeliveryTimeoutError` saying how far it got,
        or the mint error when a credential could not be minted."""
        self._native.wait_delivered(float(timeout), int(min_agents))

    def status(self) -> dict[str, Any]:
        """What the broker holds for the cluster: its version, the live
        credentials (kind, principal, version, ``issued_at``/``expires_at``
        as UTC datetimes, ``sealed``), the private env (``version``, its
        *names*, ``sealed``: a sealed env shows no names, the broker cannot
        read them), each agent and the version it acknowledged; ``sealed``:
        whether the cluster is sealed as the broker reports it (``True``
        when every credential and the env it holds are sealed, ``False``
        when any is in clear, ``None`` while it holds none); and this
        publisher's own state (``connected``, ``mint_errors``, ``ended``).
        Never a secret value."""
        status = self._native.status()
        for credential in status["credentials"]:
            credential["issued_at"] = _timestamp(credential["issued_at"])
            credential["expires_at"] = _timestamp(credential["expires_at"])
        for agent in status["agents"]:
            agent["connected_at"] = _timestamp(agent["connected_at"])
        return status

    def close(self, revoke: bool | None = None) -> bool:
        """Stops publishing. With ``revoke=True`` (or ``revoke_on_close``)
        it first revokes everything and waits up to 5 s for the broker to
        confirm, so agents stop serving the credentials and env at once;
        returns whether a revocation was confirmed. Agents otherwise keep
        serving what they hold until it expires. Closing twice is a no-op."""
        with self._lock:
            confirmed = bool(self._native.close(revoke))
        _live.discard(self)
        return confirmed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "closed"
        sealed = "sealed" if self.sealed else "not sealed"
        return f"<credstream.Publisher cluster={self._cluster!r} {state}, {sealed}>"
