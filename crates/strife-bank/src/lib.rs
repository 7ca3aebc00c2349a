//! A Strife bank: keeps customers' accounts and is a participant in the
//! gateway's two-phase commit. See ARCHITECTURE.md for the protocol.

pub mod accounts;
#[cfg(test)]
mod conformance;
pub mod error;
pub mod ledger;
pub mod postgres;
pub mod server;
pub mod service;
pub mod store;

pub use server::{BankOptions, run};
