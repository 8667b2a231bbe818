//! Generates the tonic/prost code for `drover.v1` and a file descriptor set for reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("drover_descriptor.bin"))
        .compile_protos(
            &[
                "drover/v1/run.proto",
                "drover/v1/run_service.proto",
                "drover/v1/agent_service.proto",
                "drover/v1/admin_service.proto",
            ],
            &["."],
        )?;
    println!("cargo:rerun-if-changed=drover");
    Ok(())
}
