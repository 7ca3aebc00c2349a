//! The Strife client: what the `strife login | logout | balance | pay |
//! history | outbox | shell` commands do. Sessions and the outbox of
//! payments live in SQLite under the client's directory, so a crash or an
//! outage never loses a payment and a retry never doubles one.

pub mod commands;
pub mod connect;
pub mod discovery;
pub mod exit;
pub mod gateways;
pub mod instances;
pub mod shell;
pub mod state;

pub use commands::Client;
pub use exit::{CliError, Exit, Reply};
