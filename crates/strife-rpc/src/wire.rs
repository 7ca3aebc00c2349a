//! Conversions between the domain's types (`strife-core`) and the gateway
//! API's messages, in one place for the gateway and the client.

use strife_core::{DeclineReason, UserRef};
use strife_proto::gateway::v1 as pb;

/// A customer as the API names one.
pub fn account(who: &UserRef) -> pb::Account {
    pb::Account { user: who.user.clone(), bank: who.bank.clone() }
}

/// The API's decline reason for the domain's.
pub fn decline_reason(reason: DeclineReason) -> pb::DeclineReason {
    match reason {
        DeclineReason::InsufficientFunds => pb::DeclineReason::InsufficientFunds,
        DeclineReason::UnknownPayee => pb::DeclineReason::UnknownPayee,
        DeclineReason::UnknownBank => pb::DeclineReason::UnknownBank,
        DeclineReason::BankUnavailable => pb::DeclineReason::BankUnavailable,
        DeclineReason::BalanceLimit => pb::DeclineReason::BalanceLimit,
        DeclineReason::Timeout => pb::DeclineReason::Timeout,
        DeclineReason::UnknownPayer => pb::DeclineReason::UnknownPayer,
    }
}

/// The domain's decline reason for the API's; None for UNSPECIFIED (and
/// for values this build does not know).
pub fn decline_reason_from(reason: pb::DeclineReason) -> Option<DeclineReason> {
    DeclineReason::ALL.into_iter().find(|r| decline_reason(*r) == reason)
}

/// A protobuf timestamp for Unix milliseconds.
pub fn timestamp(unix_ms: i64) -> prost_types::Timestamp {
    let nanos = i32::try_from(unix_ms.rem_euclid(1000) * 1_000_000).unwrap_or(0);
    prost_types::Timestamp { seconds: unix_ms.div_euclid(1000), nanos }
}

/// RFC 3339 text of a protobuf timestamp, to the second (empty if unset or
/// out of range).
pub fn rfc3339(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t.seconds).ok())
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_and_times_round_trip() {
        for r in DeclineReason::ALL {
            assert_eq!(decline_reason_from(decline_reason(r)), Some(r));
        }
        assert_eq!(decline_reason_from(pb::DeclineReason::Unspecified), None);
        assert_eq!(timestamp(1_500), prost_types::Timestamp { seconds: 1, nanos: 500_000_000 });
        assert_eq!(timestamp(-1), prost_types::Timestamp { seconds: -1, nanos: 999_000_000 });
        assert_eq!(rfc3339(Some(&timestamp(0))), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(None), "");
    }
}
