//! Every limit a caller can push against, as one named constant each.
//! ARCHITECTURE.md lists them; servers enforce them before touching storage.

/// Largest amount of one payment, in minor units (1,000,000,000.00).
pub const AMOUNT_MAX_MINOR: i64 = 100_000_000_000;
/// Largest balance an account may hold, in minor units. Far below `i64::MAX`
/// so that sums over many accounts cannot overflow.
pub const BALANCE_MAX_MINOR: i64 = 1_000_000_000_000_000;
/// Longest user name, in bytes.
pub const USER_NAME_MAX: usize = 64;
/// Longest bank name, in bytes.
pub const BANK_NAME_MAX: usize = 32;
/// Longest password accepted, in bytes.
pub const PASSWORD_MAX: usize = 256;
/// Longest string accepted in an amount field, in bytes.
pub const AMOUNT_TEXT_MAX: usize = 32;
/// Longest bearer token accepted, in bytes.
pub const TOKEN_MAX: usize = 2048;
/// Longest address string a bank may register, in bytes.
pub const ADDRESS_MAX: usize = 256;
/// Longest ledger id or cluster id a bank may send, in bytes (they are
/// UUIDs, 36).
pub const STORE_ID_MAX: usize = 64;
/// Largest gRPC message any server decodes, in bytes.
pub const MESSAGE_MAX_BYTES: usize = 64 * 1024;
/// Most entries one history page returns.
pub const HISTORY_PAGE_MAX: u32 = 500;
/// History page size when the caller does not ask for one.
pub const HISTORY_PAGE_DEFAULT: u32 = 50;
/// Longest page token accepted, in bytes (the gateway's own are ~140).
pub const PAGE_TOKEN_MAX: usize = 256;
/// Most concurrent HTTP/2 streams on one connection to a server.
pub const STREAMS_PER_CONNECTION_MAX: u32 = 1024;
/// Most banks one gateway keeps in its registry.
pub const BANKS_MAX: usize = 256;
/// Most replicas (processes under one name, at their own addresses) of one
/// bank in a gateway's registry.
pub const REPLICAS_PER_BANK_MAX: usize = 16;
/// Most legs or decisions in one batched call to a bank: 128 of the largest
/// legs (~320 bytes each) stay well inside `MESSAGE_MAX_BYTES`.
pub const BANK_BATCH_MAX: usize = 128;
