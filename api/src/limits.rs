//! Input limits the gRPC server enforces before a handler runs. Spec fields have their own
//! bounds (core/src/spec.rs: argv, env, labels, metadata, inline inputs, secrets), checked at
//! submit with INVALID_ARGUMENT naming the field and the bound.
//!
//! Message sizes: the largest legitimate RunService request is a SubmitRun with 3 MiB of
//! inline inputs plus a bounded spec; AgentService's PushLogs batches stay under 2 MiB and
//! artifacts stream in 1 MiB chunks; AdminService carries at most a 16 KiB secret. A larger
//! message is refused while it is decoded. tonic reports that as OUT_OF_RANGE; [`remap`] turns
//! it into RESOURCE_EXHAUSTED (what gRPC's own implementations answer for an oversized
//! message) and keeps tonic's text, which names the size and the limit.

use http::HeaderValue;

pub const RUN_SERVICE_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
pub const AGENT_SERVICE_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
pub const ADMIN_SERVICE_MAX_MESSAGE_BYTES: usize = 256 * 1024;

const OUT_OF_RANGE: &str = "11";
const RESOURCE_EXHAUSTED: &str = "8";

/// Rewrites a trailers-only "message length too large" answer to RESOURCE_EXHAUSTED.
pub fn remap<B>(mut resp: http::Response<B>) -> http::Response<B> {
    let headers = resp.headers_mut();
    let too_large = headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == OUT_OF_RANGE.as_bytes())
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| {
                m.contains("message%20length%20too%20large")
                    || m.contains("message length too large")
            });
    if too_large {
        headers.insert("grpc-status", HeaderValue::from_static(RESOURCE_EXHAUSTED));
    }
    resp
}
