//! Fuzz what a migration receiver parses from the wire: request headers, memory range tables,
//! and the State payload's snapshot tree with the clock section inside.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vm_migration::protocol::{MemoryRangeTable, Request};

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    if let Ok(req) = Request::read_from(&mut r) {
        let _ = MemoryRangeTable::read_from(&mut r, req.length());
    }
    if let Ok(snap) = serde_json::from_slice::<vm_migration::Snapshot>(data) {
        // The receiver's path: the "clock" child, versionize-wrapped frame, decode + validate.
        let _ = guest_clock::clock_state_from_snapshot(&snap);
    }
});
