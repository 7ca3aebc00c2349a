//! Real network partitions (see `common/netns.rs`).

mod common;

use common::netns;

#[test]
fn the_private_network_cuts_and_heals() {
    netns::self_check();
}
