//! drover-cli: the `drover` command for people. Talks gRPC to the API; `drover dev` composes
//! the API, dispatcher and agent libraries into one local process. It holds presentation and
//! argument handling only, never domain rules.

pub mod client;
pub mod commands;
pub mod render;
