//! The Strife gateway: authenticates customers, keeps the registry of live
//! banks, and coordinates every payment with two-phase commit.
//! See ARCHITECTURE.md for the protocol and what is forced to disk when.

pub mod admin_access;
pub mod audit;
pub mod auth;
pub mod backend;
pub mod cluster;
#[cfg(test)]
mod conformance;
pub mod coordinator;
pub mod dashboard;
pub mod error;
mod hex;
pub mod history;
pub mod link;
pub mod live;
pub mod page_token;
mod pg_batch;
pub mod postgres;
pub mod registry;
pub mod server;
pub mod service;
pub mod store;
pub mod throttle;
pub mod tokens;
pub mod validate;

pub use server::{GatewayOptions, run};
