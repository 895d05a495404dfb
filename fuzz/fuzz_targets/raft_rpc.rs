//! The Raft RPC decoder: what a member's control stream may carry to openraft. A command that
//! decodes is also validated and applied, to a fresh state and to one with nodes and VMs, and
//! the leader's scheduling pass runs on the result: none of it may panic, whatever the bytes.
#![no_main]

use blx_consensus::state::{ClusterState, Command};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blx_consensus::network::decode_request(data);
    let _ = blx_consensus::machine::MachineData::decode(data);
    let _ = blx_consensus::machine::decode::<(String, u64)>(data);
    if let Ok(cmd) = blx_consensus::machine::decode::<Command>(data) {
        let mut state = ClusterState::default();
        let before = state.clone();
        if state.apply(1, &cmd).is_err() {
            assert_eq!(state, before, "a refused command changed the state");
        }
        let _ = blx_consensus::workload::plan_schedule(&state, 1_000, 7);
        let _ = blx_consensus::workload::node_changes(&state, &[]);
    }
});
