//! Control stream decoders: what a joiner (no certificate) or a member may send.
#![no_main]

use blx_membership::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = wire::decode_control_request(data, wire::MAX_MEMBER_MESSAGE) {
        // What decodes must survive a round trip unchanged (bytes may differ: postcard accepts
        // non-canonical varints).
        assert_eq!(wire::decode_control_request(&wire::encode_control(&req), wire::MAX_MEMBER_MESSAGE).unwrap(), req);
    }
    let _ = wire::decode_control_response(data, wire::MAX_MEMBER_MESSAGE);
});
