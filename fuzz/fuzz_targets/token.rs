//! Join token text and token ids, as typed by operators or pasted from elsewhere.
#![no_main]

use blx_membership::token::{JoinToken, TokenId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(t) = s.parse::<JoinToken>() {
            assert_eq!(t.to_string().parse::<JoinToken>().unwrap(), t);
        }
        let _ = s.parse::<TokenId>();
    }
});
