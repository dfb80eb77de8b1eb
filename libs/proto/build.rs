//! Compiles proto/ with protox, a protobuf compiler written in Rust, so that
//! building Rapport never needs a system `protoc`.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "rapport/common/v1/common.proto",
        "rapport/events/v1/events.proto",
        "rapport/contacts/v1/contacts.proto",
        "rapport/ingestion/v1/ingestion.proto",
        "rapport/segmentation/v1/segmentation.proto",
        "rapport/automation/v1/automation.proto",
        "rapport/messaging/v1/messaging.proto",
        "rapport/reporting/v1/reporting.proto",
    ];
    let file_descriptors = protox::compile(files, [&proto_root])?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("rapport_descriptor.bin"),
        file_descriptors.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_well_known_types(false)
        .compile_fds(file_descriptors)?;

    println!("cargo:rerun-if-changed={}", proto_root.display());
    Ok(())
}
