//! Why a payment was declined: a stable snake_case code customers and
//! scripts can match on.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeclineReason {
    /// The payer's available balance is below the amount.
    InsufficientFunds,
    /// The payee has no account at the named bank.
    UnknownPayee,
    /// The payee's bank is not registered with the gateway.
    UnknownBank,
    /// A bank did not answer in time or could not be reached.
    BankUnavailable,
    /// The payee's balance would exceed the maximum balance.
    BalanceLimit,
    /// The payment's deadline passed before every bank voted.
    Timeout,
    /// The payer's account does not exist (any more).
    UnknownPayer,
}

impl DeclineReason {
    pub const ALL: [DeclineReason; 7] = [
        DeclineReason::InsufficientFunds,
        DeclineReason::UnknownPayee,
        DeclineReason::UnknownBank,
        DeclineReason::BankUnavailable,
        DeclineReason::BalanceLimit,
        DeclineReason::Timeout,
        DeclineReason::UnknownPayer,
    ];

    pub fn code(self) -> &'static str {
        match self {
            DeclineReason::InsufficientFunds => "insufficient_funds",
            DeclineReason::UnknownPayee => "unknown_payee",
            DeclineReason::UnknownBank => "unknown_bank",
            DeclineReason::BankUnavailable => "bank_unavailable",
            DeclineReason::BalanceLimit => "balance_limit",
            DeclineReason::Timeout => "timeout",
            DeclineReason::UnknownPayer => "unknown_payer",
        }
    }

    pub fn from_code(code: &str) -> Option<DeclineReason> {
        DeclineReason::ALL.into_iter().find(|r| r.code() == code)
    }

    /// A sentence for a person.
    pub fn explain(self) -> &'static str {
        match self {
            DeclineReason::InsufficientFunds => "the available balance is lower than the amount",
            DeclineReason::UnknownPayee => "the payee has no account at that bank",
            DeclineReason::UnknownBank => "no bank of that name is connected to the gateway",
            DeclineReason::BankUnavailable => "a bank could not be reached in time",
            DeclineReason::BalanceLimit => "the payee's balance would exceed the maximum",
            DeclineReason::Timeout => "the banks did not all answer before the deadline",
            DeclineReason::UnknownPayer => "the payer's account does not exist",
        }
    }
}

impl fmt::Display for DeclineReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for r in DeclineReason::ALL {
            assert_eq!(DeclineReason::from_code(r.code()), Some(r));
        }
        assert_eq!(DeclineReason::from_code("nope"), None);
    }
}
