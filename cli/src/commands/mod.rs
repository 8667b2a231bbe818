//! One module per `drover` subcommand.

pub mod agents;
pub mod artifacts;
pub mod cancel;
pub mod dev;
pub mod dlq;
pub mod get;
pub mod list;
pub mod logs;
pub mod secrets;
pub mod stats;
pub mod submit;
pub mod watch;
