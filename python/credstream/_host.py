"""One ``credstream-agent run`` per host, shared by the Dask workers there.

Layout of a host's agent directory (mode 0700, under ``$XDG_RUNTIME_DIR`` or
the temp dir, one per user, broker, cluster, agent token and seal key)::

    lock          flock'd while a worker attaches or detaches
    users/<pid>   one per attached worker, flock'd by it while it lives
    agent.json    the running agent: pids, address, env file (no secrets)
    env-<pid>     the agent's env file (0600, rewritten atomically), per
                  supervisor pid
    agent-<pid>.out  the agent's stdout: its address and pointer variables
    agent.log     the agents' log (an agent never logs a secret)

The first worker starts a small supervisor (``python -m credstream._host``)
in its own session; the supervisor starts the agent, writes
``agent.json``, and stops the agent once no worker holds a ``users/`` lock
(the last one detached, or every worker was killed). The agent token and
the cluster's seal key reach the supervisor on a pipe (its stdin), and the
agent on pipes too: the token on its stdin (``--token-file /dev/stdin``,
which the agent moves into an anonymous memory file), the key on a pipe
the agent inherits (``--seal-key-file /dev/fd/N``, read once at start).
Neither is ever in an environment variable, an argument or a file.

Both processes are non-dumpable (``prctl(PR_SET_DUMPABLE, 0)``): the
supervisor marks itself so before it reads its stdin (:func:`forbid_inspection`),
the agent first thing in its ``main``. A task of the same user (a worker
is the supervisor's parent, which Yama's ``ptrace_scope=1`` would let in)
can then neither ``ptrace`` them nor read their ``/proc/PID/mem`` or
``environ``; only a process with ``CAP_SYS_PTRACE`` (root) can.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


class AgentError(RuntimeError):
    """The host's agent could not be started or did not become ready."""


#: ``<linux/prctl.h>``.
_PR_SET_DUMPABLE = 4


def forbid_inspection() -> None:
    """Marks this process non-dumpable (``prctl(PR_SET_DUMPABLE, 0)``, as
    the agent's ``hardening::forbid_inspection``): processes of the same
    user may no longer ``ptrace`` it or read its ``/proc/PID/mem`` and
    ``environ``, and it leaves no core dump. Linux only; raises
    :class:`OSError` if the kernel refuses."""
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, "prctl(PR_SET_DUMPABLE) is Linux-only")
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    zero = ctypes.c_ulong(0)
    if libc.prctl(_PR_SET_DUMPABLE, zero, zero, zero, zero) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl(PR_SET_DUMPABLE, 0): {os.strerror(code)}")


def _runtime_root() -> str:
    for candidate in (os.environ.get("XDG_RUNTIME_DIR"), tempfile.gettempdir()):
        if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK):
            return candidate
    raise AgentError("no writable directory for the agent (XDG_RUNTIME_DIR or the temp dir)")


def _private_dir(path: str) -> str:
    """Creates ``path`` mode 0700, or checks that it is ours and private."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path) or info.st_uid != os.getuid():
        raise AgentError(f"{path} exists and is not a directory owned by this user")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def host_dir(
    broker: str, cluster: str, agent_token: str, options: str, seal_key: str | None = None
) -> str:
    """The agent directory for this user, broker, cluster, token, agent
    options and seal key (a different token, option or key, or none, means a
    different agent). The name is a digest: it reveals neither secret."""
    parts = [broker, cluster, agent_token, options]
    if seal_key is not None:
        parts.append("seal:" + seal_key)
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    base = _private_dir(os.path.join(_runtime_root(), f"credstream-dask-{os.getuid()}"))
    return _private_dir(os.path.join(base, key[:20]))


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _live_users(directory: str) -> list[str]:
    users = os.path.join(directory, "users")
    alive = []
    for name in os.listdir(users) if os.path.isdir(users) else []:
        path = os.path.join(users, name)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.EACCES):
                alive.append(name)
                continue
            raise
        else:
            # Nobody holds it: its worker is gone without detaching.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        finally:
            os.close(fd)
    return alive


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_info(directory: str) -> dict[str, object] | None:
    try:
        with open(os.path.join(directory, "agent.json")) as f:
            info: dict[str, Any] = json.load(f)
    except (FileNotFoundError, ValueError):
        return None
    if _alive(int(info["agent_pid"])) and _alive(int(info["supervisor_pid"])):
        return info
    return None


def _write_atomic(path: str, text: str) -> None:
    fd, temp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".agent.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


@dataclass
class HostAgent:
    """A worker's attachment to its host's agent."""

    directory: str
    address: str
    env_file: str
    agent_pid: int
    supervisor_pid: int
    _user_fd: int
    _user_path: str

    def detach(self, stop_timeout: float = 10.0) -> bool:
        """Releases this worker's hold; the last worker out stops the agent
        (and waits for it, up to ``stop_timeout``). Returns True if it did."""
        with _locked(os.path.join(self.directory, "lock")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._user_path)
            os.close(self._user_fd)
            if _live_users(self.directory):
                return False
            # A worker attaching from now on starts a new agent rather than
            # joining this stopping one.
            _forget(self.directory, self.supervisor_pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.supervisor_pid, signal.SIGTERM)
        # Outside the lock, which the supervisor takes on its way out.
        deadline = time.monotonic() + stop_timeout
        while time.monotonic() < deadline and (
            _alive(self.agent_pid) or _alive(self.supervisor_pid)
        ):
            _reap(self.supervisor_pid)
            time.sleep(0.05)
        return not _alive(self.agent_pid)


def _forget(directory: str, supervisor_pid: int) -> None:
    """Removes agent.json if it still describes ``supervisor_pid``'s agent
    (call with the lock held)."""
    path = os.path.join(directory, "agent.json")
    try:
        with open(path) as f:
            info = json.load(f)
    except (FileNotFoundError, ValueError):
        return
    if int(info.get("supervisor_pid", -1)) == supervisor_pid:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def attach(
    *,
    agent_binary: str,
    broker: str,
    cluster: str,
    agent_token: str,
    agent_args: list[str],
    agent_id: str,
    start_timeout: float,
    seal_key: str | None = None,
) -> HostAgent:
    """Attaches this process to the host's agent, starting it if none runs.
    With ``seal_key`` (the key file's line), the agent accepts only what the
    publisher sealed with it."""
    directory = host_dir(broker, cluster, agent_token, "\0".join(agent_args), seal_key)
    users = _private_dir(os.path.join(directory, "users"))
    with _locked(os.path.join(directory, "lock")):
        user_path = os.path.join(users, str(os.getpid()))
        user_fd = os.open(user_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(user_fd, fcntl.LOCK_EX)
        try:
            info = _read_info(directory)
            if info is None:
                info = _start(
                    directory,
                    agent_binary,
                    broker,
                    cluster,
                    agent_token,
                    agent_args,
                    agent_id,
                    start_timeout,
                    seal_key,
                )
        except BaseException:
            os.close(user_fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(user_path)
            raise
    return HostAgent(
        directory=directory,
        address=str(info["address"]),
        env_file=str(info["env_file"]),
        agent_pid=int(str(info["agent_pid"])),
        supervisor_pid=int(str(info["supervisor_pid"])),
        _user_fd=user_fd,
        _user_path=user_path,
    )


def _start(
    directory: str,
    agent_binary: str,
    broker: str,
    cluster: str,
    agent_token: str,
    agent_args: list[str],
    agent_id: str,
    start_timeout: float,
    seal_key: str | None,
) -> dict[str, object]:
    config = json.dumps(
        {
            "agent_binary": agent_binary,
            "broker": broker,
            "cluster": cluster,
            "agent_id": agent_id,
            "agent_args": agent_args,
        }
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDSTREAM_")}
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "credstream._host", directory, config],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
        close_fds=True,
    )
    assert supervisor.stdin is not None
    supervisor.stdin.write(json.dumps({"token": agent_token, "seal_key": seal_key}).encode())
    supervisor.stdin.close()
    deadline = time.monotonic() + start_timeout
    while time.monotonic() < deadline:
        info = _read_info(directory)
        if info is not None:
            return info
        if supervisor.poll() is not None:
            break
        time.sleep(0.05)
    else:
        supervisor.terminate()
    log = _tail(os.path.join(directory, "agent.log"))
    raise AgentError(
        f"credstream-agent did not start within {start_timeout:g}s"
        + (f"; its log ends with:\n{log}" if log else "")
    )


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except FileNotFoundError:
        return ""


_LISTENING = re.compile(r"^listening on (\S+)$")


def _launch(
    directory: str, config: dict[str, Any], env_file: str, out_path: str
) -> subprocess.Popen[bytes]:
    """Reads the agent token and seal key from stdin and starts the agent
    with them (on its stdin and on a pipe); they live only in this frame."""
    secrets = json.loads(sys.stdin.buffer.read())
    sys.stdin.close()
    token = str(secrets["token"]).encode()
    seal_key = secrets.get("seal_key")
    del secrets
    argv = [
        config["agent_binary"],
        "run",
        "--broker",
        config["broker"],
        "--cluster",
        config["cluster"],
        "--agent-id",
        config["agent_id"],
        "--token-file",
        "/dev/stdin",
        "--env-file",
        env_file,
        *config["agent_args"],
    ]
    pass_fds: tuple[int, ...] = ()
    if seal_key is not None:
        # The key goes into a pipe before the agent starts (a key line is far
        # below the pipe's buffer), and the write end is closed: the agent
        # reads it, to its end, from the one descriptor it inherits. No file,
        # and only the descriptor's number in its arguments.
        key_read, key_write = os.pipe()
        try:
            os.write(key_write, str(seal_key).encode() + b"\n")
        finally:
            os.close(key_write)
        del seal_key
        argv += ["--seal-key-file", f"/dev/fd/{key_read}"]
        pass_fds = (key_read,)
    # Its stdout (the address and the pointer variables, no secret) goes to
    # a file: a pipe nobody reads would block the agent, one closed early
    # would end it.
    log_path = os.path.join(directory, "agent.log")
    with open(log_path, "ab", buffering=0) as log, open(out_path, "wb", buffering=0) as out:
        os.chmod(log_path, 0o600)
        os.chmod(out_path, 0o600)
        try:
            agent = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=log,
                close_fds=True,
                pass_fds=pass_fds,
            )
        finally:
            for fd in pass_fds:
                os.close(fd)
    assert agent.stdin is not None
    agent.stdin.write(token)
    agent.stdin.close()
    del token
    return agent


def _listening_address(out_path: str) -> str | None:
    """The address the agent printed on its stdout, if it did yet."""
    address = None
    with open(out_path, errors="replace") as f:
        for line in f:
            match = _LISTENING.match(line.strip())
            if match:
                address = match.group(1)
    return address


def _supervise(directory: str, config_json: str) -> int:
    """The supervisor's main: start the agent, publish agent.json, stop the
    agent when no worker holds on to it any more."""
    # Handlers first: a SIGTERM from the last worker must stop the agent
    # too, never leave it behind.
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    config = json.loads(config_json)
    # Files of this supervisor's agent only: a successor started while this
    # one stops must not lose its env file when this agent removes its own.
    env_file = os.path.join(directory, f"env-{os.getpid()}")
    out_path = os.path.join(directory, f"agent-{os.getpid()}.out")
    agent = _launch(directory, config, env_file, out_path)

    address = None
    while address is None and not stopping and agent.poll() is None:
        address = _listening_address(out_path)
        time.sleep(0.02)
    if address is None:
        if agent.poll() is None:
            agent.terminate()
        return agent.wait()
    _write_atomic(
        os.path.join(directory, "agent.json"),
        json.dumps(
            {
                "agent_pid": agent.pid,
                "supervisor_pid": os.getpid(),
                "address": address,
                "env_file": env_file,
            }
        ),
    )
    try:
        while not stopping and agent.poll() is None:
            with _locked(os.path.join(directory, "lock")):
                if not _live_users(directory):
                    break
            time.sleep(0.2)
    finally:
        with _locked(os.path.join(directory, "lock")):
            _forget(directory, os.getpid())
        if agent.poll() is None:
            agent.terminate()
            try:
                agent.wait(timeout=10)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out_path)
    return 0


def _main(directory: str, config_json: str) -> int:
    # Before the secrets are read from stdin: nothing of this user may read
    # this process's memory from now on. Without that, no agent.
    try:
        forbid_inspection()
    except OSError as error:
        with open(os.path.join(directory, "agent.log"), "a") as log:
            log.write(
                f"credstream supervisor: cannot mark itself non-dumpable ({error}); the agent "
                "token and seal key would be readable by every process of this user, so no "
                "agent is started\n"
            )
        return 1
    return _supervise(directory, config_json)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1], sys.argv[2]))
