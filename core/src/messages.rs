//! What travels over RabbitMQ, as versioned JSON. Messages carry ids and fencing numbers only,
//! never the spec or secrets: receivers load the truth from Postgres (or the API), so a
//! duplicate or stale message is recognised and dropped.

use serde::{Deserialize, Serialize};

use crate::ids::{LeaseEpoch, RunId, TenantId};

pub const CONTENT_TYPE: &str = "application/json";

/// "This attempt of this run is ready to dispatch", published to `drover.runs` by pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunMessage {
    pub v: u8,
    pub run_id: RunId,
    pub tenant_id: TenantId,
    pub attempt: i32,
}

/// A command for one agent, published to `drover.agents` by agent id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AgentCommand {
    /// Run this attempt under this lease.
    Execute {
        run_id: RunId,
        tenant_id: TenantId,
        attempt: i32,
        lease_epoch: LeaseEpoch,
    },
    /// A client cancelled the run held under this lease: SIGTERM, `grace_secs`, SIGKILL,
    /// then report CANCELLED.
    Cancel {
        run_id: RunId,
        lease_epoch: LeaseEpoch,
        grace_secs: u32,
    },
    /// An operator asked the agent to drain (as on SIGTERM).
    Drain,
}

/// Published to `drover.dlx` when a run exhausts its attempts, so `drover.dead` holds a
/// record of it beside the messages the broker dead-lettered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadRunRecord {
    pub v: u8,
    pub kind: String,
    pub run_id: RunId,
    pub tenant_id: TenantId,
    pub attempt: i32,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
#[error("unparseable message: {0}")]
pub struct BadMessage(#[from] serde_json::Error);

pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Our message types are plain data; serialisation cannot fail.
    serde_json::to_vec(msg).unwrap_or_default()
}

pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, BadMessage> {
    Ok(serde_json::from_slice(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_reject_garbage() {
        let cmd = AgentCommand::Execute {
            run_id: RunId::new(),
            tenant_id: crate::ids::DEFAULT_TENANT,
            attempt: 1,
            lease_epoch: LeaseEpoch(3),
        };
        assert_eq!(decode::<AgentCommand>(&encode(&cmd)).unwrap(), cmd);
        assert!(decode::<RunMessage>(b"{not json").is_err());
        assert!(decode::<RunMessage>(br#"{"v":1}"#).is_err());
    }
}
