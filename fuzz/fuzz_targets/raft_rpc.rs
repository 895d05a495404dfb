//! The Raft RPC decoder: what a member's control stream may carry to openraft.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blx_consensus::network::decode_request(data);
    let _ = blx_consensus::machine::decode::<blx_consensus::state::Command>(data);
    let _ = blx_consensus::machine::MachineData::decode(data);
});
