//! moto as the AWS peer: a real `moto.server` process on a free loopback
//! port, seeded with an IAM user, a role and an S3 object through boto3,
//! then switched to enforcing authentication (docs/facts.md, fact 15) so that only
//! credentials moto itself issued are accepted.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::processes::{Process, clean_command, free_low_port};

/// A running moto server, killed (by PID) when dropped.
pub struct Moto {
    /// The server process.
    pub process: Process,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    addr: SocketAddr,
}

impl Moto {
    /// Starts moto's server (`MOTO_SERVER`) on a free low port and waits
    /// until it answers `/moto-api/`. Authentication is off until
    /// [`Moto::require_auth`].
    pub async fn start(python: &Path) -> Moto {
        Self::start_with_env(python, &[]).await
    }

    /// Like [`Moto::start`], with `env` added to the server's environment
    /// (`INITIAL_NO_AUTH_ACTION_COUNT=0` turns authentication on from the
    /// first request, docs/facts.md, fact 15).
    pub async fn start_with_env(python: &Path, env: &[(&str, &str)]) -> Moto {
        for _attempt in 0..5 {
            let port = free_low_port();
            let mut command = clean_command(python);
            command.args([
                "-c",
                MOTO_SERVER,
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ]);
            command.envs(env.iter().copied());
            let mut process = Process::spawn("moto", command);
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            // Werkzeug says `Running on http://…` on stderr once it listens,
            // or exits if the port was taken meanwhile.
            let ready = process
                .stderr_line_or_end(|l| l.contains("Running on"))
                .await;
            if ready.is_none() {
                continue;
            }
            let (status, body) = http(addr, "GET", "/moto-api/", "")
                .await
                .unwrap_or_else(|e| panic!("moto on {addr}: {e}\n{}", process.output()));
            assert_eq!(status, 200, "moto on {addr}: {body}");
            return Moto {
                process,
                url: format!("http://{addr}"),
                addr,
            };
        }
        panic!("moto did not start after 5 attempts");
    }

    /// From now on moto authenticates and authorizes every request: only
    /// keys of IAM users it holds and credentials its STS issued, signed
    /// correctly and allowed by IAM policy (`POST /moto-api/reset-auth`).
    pub async fn require_auth(&self) {
        let (status, body) = http(self.addr, "POST", "/moto-api/reset-auth", "0")
            .await
            .expect("reset-auth");
        assert_eq!(status, 200, "reset-auth: {body}");
    }

    /// moto's record of every model it holds (`/moto-api/data.json`).
    pub async fn data(&self) -> serde_json::Value {
        let (status, body) = http(self.addr, "GET", "/moto-api/data.json", "")
            .await
            .expect("moto data");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("moto data is JSON")
    }

    /// The STS models of one kind (`Token` for GetSessionToken calls,
    /// `AssumedRole` for AssumeRole calls).
    pub async fn sts_records(&self, model: &str) -> Vec<serde_json::Value> {
        self.data().await["sts"][model]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

/// `python -m moto.server`, except that the errors of moto's
/// authentication layer (`InvalidClientTokenId`, `AccessDenied`,
/// `SignatureDoesNotMatch`) come as AWS's query protocol sends them,
/// `<ErrorResponse><Error>…`, instead of moto's `<ErrorResponse><Errors>
/// <Error>…`, which the Rust SDK's parser does not read (it then reports no
/// error code). Real STS and IAM use the former; botocore reads both. EC2's
/// `AuthFailure` keeps moto's shape.
const MOTO_SERVER: &str = r#"
import moto.core.exceptions as exceptions
from xmltodict import unparse
from moto.server import main

moto_init = exceptions._RESTError.__init__

def query_protocol_error(self, error_type, message, *args, **kwargs):
    moto_init(self, error_type, message, *args, **kwargs)
    if self.content_type == exceptions.APP_XML and not isinstance(self, exceptions.AuthFailureError):
        error = {"Type": "Sender"} if self.include_type_sender else {}
        error.update({"Code": error_type, "Message": message})
        self.description = unparse({"ErrorResponse": {"Error": error, "RequestId": "moto"}}, full_document=True)

exceptions._RESTError.__init__ = query_protocol_error
main()
"#;

/// What [`seed`] created.
#[derive(Clone, Debug)]
pub struct Seeded {
    /// The IAM user's long-term access key id (the "laptop" identity).
    pub access_key_id: String,
    /// Its secret access key.
    pub secret_access_key: String,
    /// `arn:aws:iam::123456789012:user/laptop-user`.
    pub user_arn: String,
    /// A role the user may assume, allowed to read the bucket.
    pub role_arn: String,
    /// The bucket.
    pub bucket: String,
    /// The object's key.
    pub key: String,
    /// The object's content.
    pub body: String,
}

/// The seeding script the Python package's tests import too.
const SEED_SCRIPT: &str = include_str!("../../python/tests/moto_seed.py");

/// Creates, with auth still off (`python/tests/moto_seed.py`): IAM user
/// `laptop-user` (long-term keys, allowed to call STS only), role
/// `cluster-reader` (allowed to list and read bucket `seed-data`), bucket
/// `seed-data` and object `reports/hello.txt`.
pub async fn seed(python: &Path, moto: &Moto) -> Seeded {
    let mut command = clean_command(python);
    command.args(["-c", SEED_SCRIPT, &moto.url]);
    let mut process = Process::spawn("moto seed", command);
    let status = process.exit().await;
    assert!(
        status.success(),
        "seeding moto failed\n{}",
        process.output()
    );
    let json: serde_json::Value =
        serde_json::from_str(process.stdout().trim()).expect("the seed script prints JSON");
    let text = |name: &str| json[name].as_str().expect(name).to_owned();
    Seeded {
        access_key_id: text("access_key_id"),
        secret_access_key: text("secret_access_key"),
        user_arn: text("user_arn"),
        role_arn: text("role_arn"),
        bucket: "seed-data".into(),
        key: "reports/hello.txt".into(),
        body: "hello from moto s3".into(),
    }
}

/// The environment of the "laptop": the seeded user's long-term keys, STS
/// at moto, no config files, no instance metadata. `home` is an empty
/// directory.
pub fn laptop_env(moto: &Moto, seeded: &Seeded, home: &Path) -> Vec<(String, String)> {
    let empty = empty_file(home, "empty-aws-file");
    vec![
        ("HOME".into(), home.display().to_string()),
        ("USER".into(), "laptop-user".into()),
        ("AWS_ACCESS_KEY_ID".into(), seeded.access_key_id.clone()),
        (
            "AWS_SECRET_ACCESS_KEY".into(),
            seeded.secret_access_key.clone(),
        ),
        ("AWS_REGION".into(), "us-east-1".into()),
        ("AWS_ENDPOINT_URL_STS".into(), moto.url.clone()),
        ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ("AWS_CONFIG_FILE".into(), empty.display().to_string()),
        (
            "AWS_SHARED_CREDENTIALS_FILE".into(),
            empty.display().to_string(),
        ),
    ]
}

/// The environment of a "worker": no AWS credentials of its own (empty
/// config and credentials files, no keys, no instance metadata), only
/// `AWS_ENDPOINT_URL` so that S3 calls reach moto. `home` is an empty
/// directory.
pub fn worker_env(moto: &Moto, home: &Path) -> Vec<(String, String)> {
    let empty = empty_file(home, "empty-aws-file");
    vec![
        ("HOME".into(), home.display().to_string()),
        ("AWS_ENDPOINT_URL".into(), moto.url.clone()),
        ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ("AWS_CONFIG_FILE".into(), empty.display().to_string()),
        (
            "AWS_SHARED_CREDENTIALS_FILE".into(),
            empty.display().to_string(),
        ),
    ]
}

fn empty_file(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, "").expect("write an empty file");
    path
}

/// One request to moto: status and body.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    crate::http1::request(&addr.to_string(), method, path, &[], body).await
}
