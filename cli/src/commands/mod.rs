//! One module per `drover` subcommand.

pub mod dev;
pub mod get;
pub mod list;
pub mod submit;
pub mod watch;
