//! Generates the `credstream.v1` types and stubs with a pure-Rust protobuf
//! compiler (protox), so building needs no system `protoc`.

use std::path::PathBuf;

/// Messages that carry secret material: their generated `Debug` is replaced
/// by a hand-written one in `src/secret.rs` that prints no secret.
const SECRET_BEARING: &[&str] = &[
    ".credstream.v1.AwsCredential",
    ".credstream.v1.GcpCredential",
    ".credstream.v1.EnvVar",
    ".credstream.v1.CreateAgentTokenResponse",
    ".credstream.v1.TokenRenewal",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let proto_file = root.join("credstream/v1/credstream.proto");
    println!("cargo:rerun-if-changed={}", proto_file.display());

    let fds = protox::compile([&proto_file], [&root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("credstream_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;

    // `ProtoCodec` answers INVALID_ARGUMENT for undecodable messages (see
    // src/codec.rs).
    let mut builder = tonic_prost_build::configure().codec_path("crate::codec::ProtoCodec");
    for path in SECRET_BEARING {
        builder = builder.skip_debug([*path]);
    }
    builder.compile_fds(fds)?;
    Ok(())
}
