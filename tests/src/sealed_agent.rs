//! A real `credstream-agent run` process for the sealed-delivery tests:
//! started with or without a seal key, read through its env file (written
//! once it is ready) and its AWS container endpoint, as boto3 reads it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::bins::binary;
use crate::processes::{Process, clean_command};

/// `credstream-agent run` with an env file in `dir`.
pub struct AgentProcess {
    /// The process (its stderr holds the refusal log lines).
    pub process: Process,
    /// The agent's `--env-file`.
    pub env_file: PathBuf,
}

impl AgentProcess {
    /// Starts an agent of `cluster` against `broker`, with `token_file`
    /// and, if given, `--seal-key-file key_file`.
    pub fn spawn(
        broker: &str,
        cluster: &str,
        agent_id: &str,
        token_file: &Path,
        key_file: Option<&Path>,
        dir: &Path,
    ) -> AgentProcess {
        let env_file = dir.join(format!("{agent_id}.env"));
        let mut command = clean_command(binary("credstream-agent"));
        command
            .args(["run", "--broker", broker, "--cluster", cluster])
            .args(["--agent-id", agent_id, "--listen", "127.0.0.1:0"])
            .arg("--token-file")
            .arg(token_file)
            .arg("--env-file")
            .arg(&env_file)
            .env("RUST_LOG", "credstream_agent=info");
        if let Some(key) = key_file {
            command.arg("--seal-key-file").arg(key);
        }
        AgentProcess {
            process: Process::spawn(&format!("credstream-agent {agent_id}"), command),
            env_file,
        }
    }

    /// The env file's variables once the agent is ready (polled until the
    /// file exists, within the process wait).
    pub async fn ready_env(&mut self) -> HashMap<String, String> {
        let deadline = tokio::time::Instant::now() + crate::broker::WAIT;
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.env_file) {
                return parse_env_file(&text);
            }
            assert!(
                tokio::time::Instant::now() < deadline && !self.process.has_exited(),
                "the agent never became ready\n{}",
                self.process.output()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// `GET /aws/credentials` as an SDK does: status and JSON body.
    pub async fn aws_credentials(&mut self) -> (u16, serde_json::Value) {
        let env = self.ready_env().await;
        let uri = &env["AWS_CONTAINER_CREDENTIALS_FULL_URI"];
        let token = &env["AWS_CONTAINER_AUTHORIZATION_TOKEN"];
        aws_credentials_at(uri, token).await
    }

    /// Waits for the agent's refusal of the item at broker `version` and
    /// returns the log line.
    pub async fn refusal(&mut self, version: u64) -> String {
        let needle = format!("version={version}");
        self.process
            .stderr_line(|l| l.contains("refused an update") && l.contains(&needle))
            .await
    }
}

/// The variables of an env file (`NAME='value'` lines, `'"'"'` for `'`).
pub fn parse_env_file(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| {
            let value = value
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .unwrap_or(value)
                .replace("'\"'\"'", "'");
            (name.to_owned(), value)
        })
        .collect()
}

/// What boto3 on the worker sees: the access key and session token of
/// `boto3.Session().get_credentials()` with the agent's variables only.
pub async fn boto3_credentials(python: &Path, env: &HashMap<String, String>) -> (String, String) {
    let mut command = clean_command(python);
    command
        .envs(env.iter().filter(|(k, _)| k.starts_with("AWS_")))
        .env("HOME", "/nonexistent")
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .arg("-c")
        .arg(
            "import boto3\nc = boto3.Session().get_credentials().get_frozen_credentials()\nprint(c.access_key)\nprint(c.token)",
        );
    let mut process = Process::spawn("python boto3", command);
    let status = process.exit().await;
    assert!(status.success(), "{}", process.output());
    let out = process.stdout();
    let mut lines = out.lines();
    (
        lines.next().unwrap_or_default().to_owned(),
        lines.next().unwrap_or_default().to_owned(),
    )
}

/// `credstream seal-key --cluster CLUSTER` on the laptop (its environment:
/// `HOME` decides where the key is), its stdout written to a 0600 file in
/// `dir` for a worker's `--seal-key-file`, as a user would copy it.
pub async fn worker_seal_key(
    laptop: &[(String, String)],
    cluster: &str,
    dir: &Path,
) -> (PathBuf, credstream_proto::seal::SealKey) {
    let mut command = clean_command(binary("credstream"));
    command
        .envs(laptop.iter().map(|(k, v)| (k, v)))
        .args(["seal-key", "--cluster", cluster]);
    let mut process = Process::spawn("credstream seal-key", command);
    assert!(process.exit().await.success(), "{}", process.output());
    let line = process.stdout();
    let key = credstream_proto::seal::SealKey::parse_for(&line, cluster)
        .unwrap_or_else(|e| panic!("{e}\n{}", process.output()));
    let path = dir.join(format!("{cluster}.worker.seal-key"));
    std::fs::write(&path, format!("{}\n", line.trim())).expect("write the key file");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod the key file");
    (path, key)
}

/// `GET` of an agent's AWS container credential URI with its authorization
/// token, as an SDK sends it: status and JSON body.
pub async fn aws_credentials_at(uri: &str, token: &str) -> (u16, serde_json::Value) {
    let rest = uri.trim_start_matches("http://");
    let (host, path) = rest.split_once('/').expect("uri has a path");
    let (status, body) = crate::http1::request(
        host,
        "GET",
        &format!("/{path}"),
        &[("Authorization", token)],
        "",
    )
    .await
    .expect("GET from the agent");
    (status, serde_json::from_str(&body).unwrap_or_default())
}
