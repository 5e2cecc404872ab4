#!/usr/bin/env python3
"""Drives the credstream.v1 API from Python stubs generated with grpcio-tools.

A client in another language, as a developer would write one from the proto
alone: it publishes an AWS credential (answering the broker's RefreshRequest)
and a private environment, subscribes as an agent (snapshot, then an update),
and inspects the cluster through AdminService. It prints one JSON object with
what it saw; tests/tests/api_product.rs asserts on it.

Usage:
    python -m grpc_tools.protoc -I proto --python_out=GEN --grpc_python_out=GEN \
        proto/credstream/v1/credstream.proto
    CREDSTREAM_PUBLISHER_TOKEN=... CREDSTREAM_AGENT_TOKEN=... \
    CREDSTREAM_ADMIN_TOKEN=... \
        python tests/python/api_scenario.py --stubs GEN --target 127.0.0.1:50051 \
        --cluster dev

The tokens must be scoped to the cluster given (the admin token to any).
Every wait is bounded by --timeout seconds; the script never sleeps to
synchronise.
"""

import argparse
import datetime
import json
import os
import queue
import sys
import threading
import time

# Distinctive secret values: the admin answers must not contain any of them.
AWS_KEY_1 = "ASIAPYTHONSCENARIO01"
AWS_KEY_2 = "ASIAPYTHONSCENARIO02"
AWS_SECRET = "py-secret-access-key-do-not-leak"
AWS_SESSION = "py-session-token-do-not-leak"
ENV_NAME = "PY_SCENARIO_DB_TOKEN"
ENV_VALUE = "py-env-value-do-not-leak"
SECRETS = [AWS_SECRET, AWS_SESSION, ENV_VALUE]

_CLOSE = object()
_END = object()


class ScenarioError(Exception):
    """A step did not see what the API contract promises."""


class BidiStream:
    """A bidirectional call fed from a queue, read by a thread into a queue,
    so that every receive can wait with a timeout."""

    def __init__(self, method, metadata):
        self._requests = queue.Queue()
        self._responses = queue.Queue()
        self.call = method(iter(self._requests.get, _CLOSE), metadata=metadata)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        try:
            for response in self.call:
                self._responses.put(response)
            self._responses.put(_END)
        except Exception as error:  # grpc.RpcError, including cancellation
            self._responses.put(error)

    def send(self, request):
        self._requests.put(request)

    def recv(self, what, timeout):
        try:
            item = self._responses.get(timeout=timeout)
        except queue.Empty:
            raise ScenarioError(f"no {what} within {timeout:.0f}s") from None
        if item is _END:
            raise ScenarioError(f"stream ended while waiting for {what}")
        if isinstance(item, Exception):
            code = item.code().name if hasattr(item, "code") else "?"
            details = item.details() if hasattr(item, "details") else str(item)
            raise ScenarioError(f"stream failed with {code} ({details}) while waiting for {what}")
        return item

    def recv_until(self, field, what, timeout, accept=lambda message: True):
        """Receives until a message whose oneof is `field` and that `accept`s;
        other messages (acks, cluster info) are skipped."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ScenarioError(f"no {what} within {timeout:.0f}s")
            message = self.recv(what, remaining)
            if message.WhichOneof("message") == field and accept(getattr(message, field)):
                return getattr(message, field)

    def close(self):
        self._requests.put(_CLOSE)
        self.call.cancel()


def rpc_code(call):
    """Runs a unary call and returns its status code name ("OK" on success)."""
    import grpc

    try:
        call()
        return "OK"
    except grpc.RpcError as error:
        return error.code().name


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stubs", required=True, help="folder with the generated credstream/v1/*_pb2*.py")
    parser.add_argument("--target", required=True, help="broker host:port (plaintext)")
    parser.add_argument("--cluster", default="python-scenario")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for each message")
    args = parser.parse_args()

    sys.path.insert(0, args.stubs)
    import grpc
    from credstream.v1 import credstream_pb2 as pb
    from credstream.v1 import credstream_pb2_grpc as pb_grpc
    from google.protobuf import json_format
    from google.protobuf.timestamp_pb2 import Timestamp

    publisher_token = os.environ["CREDSTREAM_PUBLISHER_TOKEN"]
    agent_token = os.environ["CREDSTREAM_AGENT_TOKEN"]
    admin_token = os.environ["CREDSTREAM_ADMIN_TOKEN"]
    cluster = args.cluster
    timeout = args.timeout

    def metadata(token, routed=True):
        entries = [("authorization", f"Bearer {token}")]
        if routed:
            entries.append(("x-credstream-cluster", cluster))
        return entries

    def timestamp(delta_seconds):
        ts = Timestamp()
        ts.FromDatetime(datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=delta_seconds))
        return ts

    def aws_credential(access_key_id, refresh_request_id=""):
        return pb.CredentialUpdate(
            aws=pb.AwsCredential(
                access_key_id=access_key_id,
                secret_access_key=AWS_SECRET,
                session_token=AWS_SESSION,
                principal_arn="arn:aws:sts::123456789012:assumed-role/scenario/python",
                account_id="123456789012",
                region="eu-west-1",
            ),
            issued_at=timestamp(0),
            expires_at=timestamp(3600),
            refresh_request_id=refresh_request_id,
        )

    def to_dict(message):
        return json_format.MessageToDict(message, preserving_proto_field_name=True)

    results = {"cluster": cluster}
    channel = grpc.insecure_channel(args.target)
    grpc.channel_ready_future(channel).result(timeout=timeout)
    publisher_stub = pb_grpc.PublisherServiceStub(channel)
    agent_stub = pb_grpc.AgentServiceStub(channel)
    admin_stub = pb_grpc.AdminServiceStub(channel)
    streams = []
    try:
        # 1. Publisher: hello, welcome, then the broker asks for the missing
        # AWS credential and we answer that RefreshRequest.
        publisher = BidiStream(publisher_stub.Publish, metadata(publisher_token))
        streams.append(publisher)
        publisher.send(
            pb.PublishRequest(
                hello=pb.PublisherHello(
                    cluster_id=cluster,
                    kinds=[pb.CREDENTIAL_KIND_AWS],
                    private_env=True,
                    publisher_name="python-scenario",
                )
            )
        )
        first = publisher.recv("welcome", timeout)
        if first.WhichOneof("message") != "welcome":
            raise ScenarioError(f"first Publish response is {first.WhichOneof('message')}, not welcome")
        results["welcome"] = {
            "missing": [pb.CredentialKind.Name(k) for k in first.welcome.missing],
            "private_env_missing": first.welcome.private_env_missing,
        }

        refresh = publisher.recv_until("refresh_request", "refresh_request for the missing AWS credential", timeout)
        results["refresh_request"] = {
            "id": refresh.id,
            "kind": pb.CredentialKind.Name(refresh.kind),
            "reason": pb.RefreshReason.Name(refresh.reason),
            "has_deadline": refresh.HasField("deadline"),
        }
        publisher.send(pb.PublishRequest(credential=aws_credential(AWS_KEY_1, refresh.id)))
        welcome_version = first.welcome.version
        ack = publisher.recv_until(
            "update_ack", "update_ack for the credential", timeout, lambda a: a.version > welcome_version
        )
        credential_version = ack.version

        publisher.send(
            pb.PublishRequest(private_env=pb.PrivateEnv(set=[pb.EnvVar(name=ENV_NAME, value=ENV_VALUE)]))
        )
        ack = publisher.recv_until(
            "update_ack", "update_ack for the private env", timeout, lambda a: a.version > credential_version
        )
        results["versions"] = {"credential": credential_version, "private_env": ack.version}

        # 2. Agent: hello, the snapshot holds both, then a new credential
        # arrives as an update.
        agent = BidiStream(agent_stub.Subscribe, metadata(agent_token))
        streams.append(agent)
        agent.send(pb.SubscribeRequest(hello=pb.AgentHello(cluster_id=cluster, agent_id="python-agent-1")))
        first = agent.recv("snapshot", timeout)
        if first.WhichOneof("message") != "snapshot":
            raise ScenarioError(f"first Subscribe response is {first.WhichOneof('message')}, not snapshot")
        snapshot = first.snapshot
        env = {var.name: var.value for var in snapshot.private_env.set}
        results["snapshot"] = {
            "version": snapshot.version,
            "aws_access_key_ids": [c.aws.access_key_id for c in snapshot.credentials if c.WhichOneof("credential") == "aws"],
            "secrets_intact": all(
                c.aws.secret_access_key == AWS_SECRET and c.aws.session_token == AWS_SESSION
                for c in snapshot.credentials
                if c.WhichOneof("credential") == "aws"
            ),
            "refresh_request_ids": [c.refresh_request_id for c in snapshot.credentials],
            "env_names": sorted(env),
            "env_value_intact": env.get(ENV_NAME) == ENV_VALUE,
            "env_replace_all": snapshot.private_env.replace_all,
            "info_kinds": [pb.CredentialKind.Name(k) for k in snapshot.info.kinds],
            "info_private_env": snapshot.info.private_env,
        }
        agent.send(pb.SubscribeRequest(ack=pb.AgentAck(version=snapshot.version)))

        publisher.send(pb.PublishRequest(credential=aws_credential(AWS_KEY_2)))
        update = agent.recv_until(
            "credential",
            "the credential update",
            timeout,
            lambda c: c.aws.access_key_id == AWS_KEY_2,
        )
        agent.send(pb.SubscribeRequest(ack=pb.AgentAck(version=update.version)))
        results["update"] = {
            "version": update.version,
            "access_key_id": update.aws.access_key_id,
            "newer_than_snapshot": update.version > snapshot.version,
        }

        # 3. Admin: metadata only, never a secret value.
        admin_md = [("authorization", f"Bearer {admin_token}")]
        listed = admin_stub.ListClusters(pb.ListClustersRequest(), metadata=admin_md, timeout=timeout)
        got = admin_stub.GetCluster(pb.GetClusterRequest(cluster_id=cluster), metadata=admin_md, timeout=timeout)
        admin_text = json.dumps(to_dict(listed)) + json.dumps(to_dict(got)) + str(listed) + str(got)
        results["list_clusters"] = [c.cluster_id for c in listed.clusters]
        results["get_cluster"] = to_dict(got.cluster)
        results["admin_leaks"] = [s for s in SECRETS if s in admin_text]

        # 4. The auth contract, seen from another language.
        results["errors"] = {
            "admin_without_token": rpc_code(
                lambda: admin_stub.ListClusters(pb.ListClustersRequest(), timeout=timeout)
            ),
            "admin_with_bad_token": rpc_code(
                lambda: admin_stub.ListClusters(
                    pb.ListClustersRequest(), metadata=[("authorization", "Bearer not-a-token")], timeout=timeout
                )
            ),
            "admin_with_agent_token": rpc_code(
                lambda: admin_stub.GetCluster(
                    pb.GetClusterRequest(cluster_id=cluster), metadata=metadata(agent_token, False), timeout=timeout
                )
            ),
            "get_unknown_cluster": rpc_code(
                lambda: admin_stub.GetCluster(
                    pb.GetClusterRequest(cluster_id="no-such-cluster"), metadata=admin_md, timeout=timeout
                )
            ),
        }
        results["ok"] = True
    except ScenarioError as error:
        results["ok"] = False
        results["error"] = str(error)
    finally:
        for stream in streams:
            stream.close()
        channel.close()

    print(json.dumps(results, indent=2, sort_keys=True))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
