//! Interop from the docs alone (`docs/sealing.md`): a Python program that
//! knows only the documented construction and uses only `cryptography`
//! (ChaCha20Poly1305) and a few lines of protobuf decoding opens the
//! sealed AWS credential and the sealed private env that the Rust publisher
//! sent through a real broker, and sees a changed clear expiry fail.

use std::time::Duration;

use credstream_client::session::PublishSession;
use credstream_proto::seal::SealKey;
use credstream_proto::v1::subscribe_response::Message;
use credstream_tests::broker::{aws_update, open_agent};
use credstream_tests::processes::{BrokerProcess, Process, clean_command, write_file};
use credstream_tests::publish::local_address;
use credstream_tests::tools;
use tonic::transport::Channel;

/// Written from docs/sealing.md, not from the Rust code.
const OPEN_SEALED: &str = r#"import base64, hashlib, json, struct, sys
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

def key_from_file(text):
    prefix, cluster, b64 = text.strip().split(":", 2)
    assert prefix == "credstream-seal-v1"
    key = base64.b64decode(b64, validate=True)
    assert len(key) == 32
    return cluster, key

def s(text):
    raw = text.encode()
    return struct.pack(">H", len(raw)) + raw

def t(ts):
    if ts is None:
        return b"\0" * 12
    return struct.pack(">qI", ts["seconds"], ts["nanos"])

def aad(slot, cluster, seq, issued, expires, principal, account):
    return (b"credstream.v1.seal" + bytes([1, slot]) + s(cluster) + struct.pack(">Q", seq)
            + t(issued) + t(expires) + s(principal) + s(account))

def fields(buf):
    # Minimal protobuf: varints and length-delimited fields.
    out, i = [], 0
    def varint():
        nonlocal i
        shift = value = 0
        while True:
            b = buf[i]; i += 1
            value |= (b & 0x7F) << shift; shift += 7
            if b < 0x80:
                return value
    while i < len(buf):
        tag = varint(); number, wire = tag >> 3, tag & 7
        if wire == 0:
            out.append((number, varint()))
        elif wire == 2:
            n = varint(); out.append((number, bytes(buf[i:i + n]))); i += n
        else:
            raise ValueError("wire type %d" % wire)
    return out

def open_payload(key, slot, cluster, item, issued, expires, principal, account):
    p = item["sealed"]
    assert p["format"] == 1 and p["cluster_id"] == cluster
    assert bytes.fromhex(p["key_id"]) == hashlib.sha256(key).digest()[:8]
    nonce, ct = bytes.fromhex(p["nonce"]), bytes.fromhex(p["ciphertext"])
    ad = aad(slot, cluster, p["sequence"], issued, expires, principal, account)
    return ChaCha20Poly1305(key).decrypt(nonce, ct, ad)

data = json.load(open(sys.argv[1]))
cluster, key = key_from_file(open(sys.argv[2]).read())
aws = data["aws"]
plain = open_payload(key, 1, cluster, aws, aws["issued_at"], aws["expires_at"],
                     aws["principal_arn"], aws["account_id"])
names = {1: "access_key_id", 2: "secret_access_key", 3: "session_token",
         4: "principal_arn", 5: "account_id", 6: "region"}
opened = {names[n]: v.decode() for n, v in fields(plain)}
env_plain = open_payload(key, 3, cluster, data["env"], None, None, "", "")
env = {}
for number, value in fields(env_plain):
    if number == 1:  # repeated EnvVar set
        var = dict(fields(value))
        env[var[1].decode()] = var[2].decode()
moved = dict(aws["expires_at"]); moved["seconds"] += 1
try:
    open_payload(key, 1, cluster, aws, aws["issued_at"], moved, aws["principal_arn"], aws["account_id"])
    tampered = "opened"
except InvalidTag:
    tampered = "InvalidTag"
print(json.dumps({"aws": opened, "env": env, "moved_expiry": tampered}))
"#;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn payload_json(p: &credstream_proto::v1::SealedPayload) -> serde_json::Value {
    serde_json::json!({
        "format": p.format, "cluster_id": p.cluster_id, "sequence": p.sequence,
        "key_id": hex(&p.key_id), "nonce": hex(&p.nonce), "ciphertext": hex(&p.ciphertext),
    })
}

fn ts(t: &Option<prost_types::Timestamp>) -> serde_json::Value {
    let t = t.as_ref().expect("a time");
    serde_json::json!({"seconds": t.seconds, "nanos": t.nanos})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(tool_python),
    ignore = "needs the project's Python venv: set CREDSTREAM_TEST_PYTHON (scripts/test.sh does)"
)]
async fn python_opens_what_the_rust_publisher_sealed_from_the_docs_alone() {
    let test = "python_opens_what_the_rust_publisher_sealed_from_the_docs_alone";
    let Some(python) = tools::python(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start_dev().await;
    let key = SealKey::generate("dev");
    let key_file = write_file(dir.path(), "dev.seal-key", &key.encode());
    let session =
        PublishSession::builder(local_address(&broker.url, &broker.publisher_token, "dev"))
            .private_env([("AUTH_TOKEN_FOR_CUSTOM_DATABASE", "it's s3cret")])
            .seal(key)
            .start()
            .unwrap();
    session
        .publish_credential(aws_update("interop", Duration::from_secs(3600)))
        .await
        .unwrap();

    // What an agent receives from the broker.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let snapshot = loop {
        let channel = Channel::from_shared(broker.url.clone())
            .unwrap()
            .connect_lazy();
        let mut agent = open_agent(channel, &broker.agent_token, "dev", "py")
            .await
            .unwrap();
        if let Message::Snapshot(s) = agent.expect().await
            && !s.credentials.is_empty()
            && s.private_env.is_some()
        {
            break s;
        }
        assert!(tokio::time::Instant::now() < deadline, "nothing published");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let aws = &snapshot.credentials[0];
    let Some(credstream_proto::v1::credential_update::Credential::Aws(clear)) = &aws.credential
    else {
        panic!("an AWS credential")
    };
    assert!(clear.secret_access_key.is_empty() && clear.access_key_id.is_empty());
    let env = snapshot.private_env.as_ref().unwrap();
    assert!(env.set.is_empty());
    let data = serde_json::json!({
        "aws": {
            "sealed": payload_json(aws.sealed.as_ref().unwrap()),
            "issued_at": ts(&aws.issued_at), "expires_at": ts(&aws.expires_at),
            "principal_arn": clear.principal_arn, "account_id": clear.account_id,
        },
        "env": {"sealed": payload_json(env.sealed.as_ref().unwrap())},
    });
    let data_file = write_file(dir.path(), "sealed.json", &data.to_string());
    let script = write_file(dir.path(), "open_sealed.py", OPEN_SEALED);

    let mut command = clean_command(&python);
    command.arg(&script).arg(&data_file).arg(&key_file);
    let mut run = Process::spawn("python open_sealed.py", command);
    assert!(run.exit().await.success(), "{}", run.output());
    let opened: serde_json::Value = serde_json::from_str(&run.stdout()).unwrap();
    assert_eq!(opened["aws"]["access_key_id"], "ASIAinterop");
    assert_eq!(opened["aws"]["secret_access_key"], "SECRETKEY-interop");
    assert_eq!(opened["aws"]["session_token"], "SESSIONTOKEN-interop");
    assert_eq!(opened["aws"]["region"], "eu-west-1");
    assert_eq!(
        opened["env"]["AUTH_TOKEN_FOR_CUSTOM_DATABASE"],
        "it's s3cret"
    );
    assert_eq!(opened["moved_expiry"], "InvalidTag");
    session.shutdown().await.unwrap();
}
