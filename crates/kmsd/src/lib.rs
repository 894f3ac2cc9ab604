//! The `kmsd` node daemon: KMS listeners, the durable state engine and the admin surface.
//! The binary (`main.rs`) only parses the configuration and calls [`node::run`].

pub mod admin;
pub mod config;
pub mod engine;
pub mod kms_server;
pub mod node;
pub mod telemetry;
