//! `credstream whoami`, and the identity flags' minters for `publish`
//! ([`credstream_client::identity`]).

use std::process::ExitCode;

use anyhow::{Result, bail};
use credstream_client::whoami::whoami as look_up;

pub use credstream_client::identity::{AwsAudit, IdentityOptions, usable};

/// `credstream whoami`.
pub async fn whoami(options: &IdentityOptions) -> Result<ExitCode> {
    if !options.aws && !options.gcp {
        bail!("nothing to look up: both --no-aws and --no-gcp were given");
    }
    let minters = options.minters().await?;
    let answer = look_up(minters.aws.as_ref(), minters.gcp.as_ref()).await;
    for line in answer.lines() {
        println!("{line}");
    }
    Ok(if answer.all_found() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
