#!/usr/bin/env python3
"""Publish an AWS credential and a private environment variable to a
credstream broker from Python, with stubs generated from proto/.

    pip install grpcio-tools
    python -m grpc_tools.protoc -I proto --python_out=gen --grpc_python_out=gen \
        proto/credstream/v1/credstream.proto
    CREDSTREAM_PUBLISHER_TOKEN=... python client/examples/python/publish_example.py \
        --broker 127.0.0.1:50051 --cluster dev --env AUTH_TOKEN_FOR_CUSTOM_DATABASE=s3cr3t

(If --stubs names a folder without stubs, they are generated there first.)

The credential here is a made-up example; a real publisher mints it with STS
(boto3.client("sts").get_session_token()), keeps the stream open, and
answers each RefreshRequest with a fresh one, as the `credstream` CLI does.
"""

import argparse
import datetime
import os
import pathlib
import queue
import sys
import threading


def load_stubs(folder):
    """Imports the generated stubs from `folder`, generating them first if
    they are not there."""
    if not (folder / "credstream" / "v1" / "credstream_pb2_grpc.py").exists():
        from grpc_tools import protoc

        proto = pathlib.Path(__file__).resolve().parents[3] / "proto"
        folder.mkdir(parents=True, exist_ok=True)
        status = protoc.main(
            [
                "protoc",
                f"-I{proto}",
                f"-I{pathlib.Path(protoc.__file__).parent / '_proto'}",  # google/protobuf/*.proto
                f"--python_out={folder}",
                f"--grpc_python_out={folder}",
                str(proto / "credstream" / "v1" / "credstream.proto"),
            ]
        )
        if status != 0:
            sys.exit(f"protoc failed ({status})")
    sys.path.insert(0, str(folder))
    from credstream.v1 import credstream_pb2, credstream_pb2_grpc

    return credstream_pb2, credstream_pb2_grpc


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", default=os.environ.get("CREDSTREAM_ADDR", "127.0.0.1:50051"),
                        help="host:port of a plaintext loopback broker (env CREDSTREAM_ADDR)")
    parser.add_argument("--cluster", default=os.environ.get("CREDSTREAM_CLUSTER", "dev"))
    parser.add_argument("--token", default=os.environ.get("CREDSTREAM_PUBLISHER_TOKEN"),
                        help="a publisher token for the cluster (env CREDSTREAM_PUBLISHER_TOKEN)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="a private environment variable to publish (repeatable)")
    parser.add_argument("--stubs", type=pathlib.Path, default=pathlib.Path("gen"),
                        help="folder of the generated stubs (default: gen)")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for each answer")
    args = parser.parse_args()
    if not args.token:
        sys.exit("set CREDSTREAM_PUBLISHER_TOKEN or pass --token")

    pb, pb_grpc = load_stubs(args.stubs)
    import grpc
    from google.protobuf.timestamp_pb2 import Timestamp

    now = datetime.datetime.now(datetime.timezone.utc)
    issued_at, expires_at = Timestamp(), Timestamp()
    issued_at.FromDatetime(now)
    expires_at.FromDatetime(now + datetime.timedelta(hours=1))
    credential = pb.CredentialUpdate(
        aws=pb.AwsCredential(
            access_key_id="ASIAEXAMPLEEXAMPLE00",
            secret_access_key="example-secret-access-key",
            session_token="example-session-token",
            region="us-east-1",
        ),
        issued_at=issued_at,
        expires_at=expires_at,
    )
    env = pb.PrivateEnv(set=[pb.EnvVar(name=n, value=v) for n, v in (e.split("=", 1) for e in args.env)])

    # A bidirectional stream: requests go in through a queue; responses are
    # read by a thread so that every wait has a timeout.
    requests, responses = queue.Queue(), queue.Queue()
    channel = grpc.insecure_channel(args.broker)
    call = pb_grpc.PublisherServiceStub(channel).Publish(
        iter(requests.get, None),
        metadata=[("authorization", f"Bearer {args.token}"), ("x-credstream-cluster", args.cluster)],
    )

    def read():
        try:
            for response in call:
                responses.put(response)
        except grpc.RpcError as error:
            responses.put(error)
        responses.put(None)

    threading.Thread(target=read, daemon=True).start()

    def next_response(what, accept=lambda r: True):
        while True:
            try:
                response = responses.get(timeout=args.timeout)
            except queue.Empty:
                sys.exit(f"no {what} from the broker within {args.timeout:.0f}s")
            if response is None:
                sys.exit(f"the broker ended the stream before the {what}")
            if isinstance(response, grpc.RpcError):
                sys.exit(f"Publish failed: {response.code().name}: {response.details()}")
            if accept(response):
                return response

    kinds = [pb.CREDENTIAL_KIND_AWS]
    requests.put(pb.PublishRequest(hello=pb.PublisherHello(
        cluster_id=args.cluster, kinds=kinds, private_env=bool(args.env), publisher_name="publish_example.py")))
    version = next_response("welcome").welcome.version

    # Each accepted change bumps the cluster's version; the broker's
    # update_ack reports the latest one.
    changes = [pb.PublishRequest(credential=credential)]
    if args.env:
        changes.append(pb.PublishRequest(private_env=env))
    for change in changes:
        requests.put(change)
        ack = next_response("update_ack", lambda r: r.HasField("update_ack") and r.update_ack.version > version)
        version = ack.update_ack.version

    print(f"published an AWS credential and {len(env.set)} env var(s) to cluster {args.cluster}: "
          f"version {version}, {ack.update_ack.agents_current} of {ack.update_ack.agents_connected} agents current")
    requests.put(None)  # half-close: we are done publishing
    call.cancel()
    channel.close()


if __name__ == "__main__":
    main()
