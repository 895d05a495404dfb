//! A client's watch: the request a server decodes, and the answer a client decodes and then
//! follows (entries applied to its copy of the state). None of it may panic, whatever the
//! bytes; a feed that does not follow on is refused and changes nothing.
#![no_main]

use blx_consensus::machine::{Feed, MachineCell, decode};
use blx_consensus::node::{WatchAnswer, WatchRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode::<WatchRequest>(data);
    if let Ok(answer) = decode::<WatchAnswer>(data) {
        let cell = MachineCell::default();
        if let Some(feed) = answer.feed {
            let before = cell.indexed_state();
            let gap = matches!(&feed, Feed::Entries(e) if e.first().is_some_and(|f| f.log_id.index != 1));
            let outcome = cell.follow(feed);
            if gap {
                assert!(outcome.is_err());
                assert_eq!(cell.indexed_state(), before);
            }
        }
    }
});
