//! One module per `drover` subcommand.

pub mod admin;
pub mod agents;
pub mod approve;
pub mod artifacts;
pub mod audit;
pub mod cancel;
pub mod dev;
pub mod dlq;
pub mod get;
pub mod list;
pub mod logs;
pub mod secrets;
pub mod stats;
pub mod submit;
pub mod tokens;
pub mod watch;
