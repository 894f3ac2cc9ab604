//! `kmsctl`: the operator CLI. The library part holds what tests reuse: an async KMS client
//! ([`client`]) over the sans-IO codec, product selection ([`products`]), the load
//! generator ([`bench`]), the admin API client ([`admin_client`]) and the path checks of
//! `kmsctl diagnose` ([`diagnose`]).

pub mod admin_client;
pub mod bench;
pub mod client;
pub mod diagnose;
pub mod discover;
pub mod products;
