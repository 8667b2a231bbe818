//! drover's public gRPC contract, package `drover.v1`, and the code tonic/prost generate from
//! it. Holds nothing else: no behaviour, no conversions (those live in `drover-core`).

#![allow(clippy::all)]

/// `drover.v1`: RunService, AgentService, AdminService and their messages.
pub mod v1 {
    tonic::include_proto!("drover.v1");

    /// Encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("drover_descriptor");
}
