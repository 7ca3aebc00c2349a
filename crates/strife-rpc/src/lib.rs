//! Plumbing shared by every Strife process: the PKI, mutual TLS, who a peer
//! is, configuration, logging of every call, and serving with health and
//! reflection. No business logic lives here.

pub mod config;
pub mod errors;
pub mod etcd;
pub mod etcd_server;
pub mod fault;
pub mod files;
pub mod folds;
pub mod group_commit;
pub mod identity;
pub mod metrics;
pub mod pg_pool;
pub mod pki;
pub mod postgres_server;
pub mod revocation;
pub mod serve;
pub mod sqlite;
pub mod storage;
pub mod store_url;
pub mod telemetry;
pub mod tls;
pub mod trace;
pub mod wire;

pub use config::Config;
pub use identity::{Peer, PeerRole};
