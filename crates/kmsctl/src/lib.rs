//! `kmsctl`: the operator CLI. The library part holds what tests reuse: an async KMS client
//! ([`client`]) over the sans-IO codec, product selection ([`products`]) and the load
//! generator ([`bench`]).

pub mod bench;
pub mod client;
pub mod products;
