//! Join and API token text, token ids and scopes, as typed by operators, pasted from
//! elsewhere, or sent in an HTTP Authorization header.
#![no_main]

use blx_membership::token::{JoinToken, TokenId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(t) = s.parse::<JoinToken>() {
            assert_eq!(t.to_string().parse::<JoinToken>().unwrap(), t);
        }
        let _ = s.parse::<TokenId>();
        if let Ok(t) = s.parse::<blx_consensus::access::ApiToken>() {
            assert_eq!(
                t.to_string()
                    .parse::<blx_consensus::access::ApiToken>()
                    .unwrap(),
                t
            );
        }
        let _ = s.parse::<blx_consensus::access::Scope>();
    }
});
