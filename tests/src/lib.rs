//! Test harness for credstream's integration and end-to-end tests.
//!
//! - [`tools`] — where the external peers (the project's Python venv, grpcurl,
//!   buf, Node modules) are, as provided by `scripts/test.sh`; tests that need
//!   one and do not find it print that they were skipped.
//! - [`broker`] — an in-process broker on port 0, tokens, raw protocol clients
//!   and credential builders.
//! - [`minter`] — a counting fake minter for refresh tests.
//! - [`moto`] — a real moto server (STS, IAM, S3), seeded through boto3.
//! - [`aws_login`] — temporary credentials moto issued, and an AWS SSO login
//!   (profile, token cache, portal) that hands them out.
//! - [`fake_http`] — a recording HTTP server for endpoints the client calls.
//! - [`recording_proxy`] — a recording HTTP proxy in front of a real server
//!   (moto), to count the calls the client made.
//! - [`hostile_relay`] — a gRPC relay between agents and the broker that
//!   records and tampers with what agents receive (sealed delivery).
//! - [`sealed_agent`] — a real agent process with or without a seal key,
//!   read through its env file, its AWS endpoint and boto3.
//! - [`child`] — a test body re-run in a child process with its own
//!   environment.
//! - [`shard_proxy`] — a real HAProxy or nginx sharding brokers by cluster.
//! - [`publish`] — the address of a broker on this machine for the client
//!   and agent libraries, and a started publish session.
//! - [`pki`] — a throwaway CA for TLS and mutual-TLS tests.
//! - [`gcp_key`] — a new RSA service account key, made in Rust.
//! - [`wait`] — `eventually(what, check)`, the one poll-until-true wait.
//! - [`doc_blocks`] — the shell blocks of a marked README section.
//! - [`bins`] — paths of the workspace binaries, building them once if a test
//!   runs before `cargo build`.

pub mod aws_login;
pub mod bins;
pub mod broker;
pub mod child;
pub mod doc_blocks;
pub mod fake_http;
pub mod gcp_key;
pub mod hostile_relay;
pub mod http1;
pub mod minter;
pub mod moto;
pub mod pki;
pub mod processes;
pub mod publish;
pub mod recording_proxy;
pub mod sealed_agent;
pub mod shard_proxy;
pub mod tools;
pub mod wait;
