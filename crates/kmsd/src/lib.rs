//! The `kmsd` node daemon: KMS listeners, the durable state engine and the admin surface.
//! The binary (`main.rs`) only parses the configuration and calls [`node::run`].

pub mod admin;
pub mod admin_backend;
pub mod catalog;
pub mod config;
pub mod dns;
pub mod edge;
pub mod engine;
pub mod hardening;
pub mod join;
pub mod kms_server;
pub mod memory;
pub mod node;
pub mod pki;
pub mod telemetry;
