//! The Raft RPC decoder: what a member's control stream may carry to openraft, and the
//! forwarded-write envelope. A command that
//! decodes is also validated and applied, to a fresh state and to one with nodes and VMs, and
//! the leader's scheduling pass runs on the result: none of it may panic, whatever the bytes.
#![no_main]

use blx_consensus::state::{ClusterState, Command};
use libfuzzer_sys::fuzz_target;

fn with_authority() -> ClusterState {
    use blx_consensus::authority::{AdmittedNode, AuthorityCommand, AuthorityState};
    use blx_membership::token::{TokenId, TokenRecord};
    let token = TokenRecord {
        id: TokenId([1; 8]),
        secret_hash: [1; 32],
        created_unix: 0,
        expires_unix: u64::MAX,
        revoked: false,
    };
    let node = AdmittedNode {
        admitted_unix: 0,
        token: None,
        revoked: false,
    };
    let init = AuthorityState {
        ca_cert_pem: "cert".into(),
        ca_key_pem: "key".into(),
        tokens: [(token.id, token)].into(),
        nodes: [(blx_membership::NodeId([2; 8]), node)].into(),
        api_tokens: [(
            TokenId([3; 8]),
            blx_consensus::access::ApiTokenRecord {
                id: TokenId([3; 8]),
                name: "ci".into(),
                scope: blx_consensus::access::Scope::Write,
                secret_hash: [3; 32],
                created_unix: 0,
                expires_unix: u64::MAX,
                revoked: false,
            },
        )]
        .into(),
    };
    let mut state = ClusterState::default();
    state
        .apply(1, &Command::Authority(AuthorityCommand::Init(init)))
        .expect("a valid init");
    state
}

fuzz_target!(|data: &[u8]| {
    let _ = blx_consensus::network::decode_request(data);
    let _ = blx_consensus::machine::MachineData::decode(data);
    let _ = blx_consensus::machine::decode::<(String, u64)>(data);
    // A forwarded write: who it is for, the command, and the caller's trace context.
    if let Ok((caller, cmd, _trace)) = blx_consensus::machine::decode::<(
        blx_consensus::access::Caller,
        Command,
        Option<String>,
    )>(data)
    {
        let state = with_authority();
        if let (blx_consensus::access::Caller::Token(id), Some(a)) = (caller, &state.authority) {
            let _ = a.authorize(id, 1, cmd.scope());
        }
    }
    if let Ok(cmd) = blx_consensus::machine::decode::<Command>(data) {
        let mut state = ClusterState::default();
        let before = state.clone();
        if state.apply(1, &cmd).is_err() {
            assert_eq!(state, before, "a refused command changed the state");
        }
        let _ = blx_consensus::workload::plan_schedule(&state, 1_000, 7);
        let _ = blx_consensus::workload::node_changes(&state, &[]);
        // Once more against a state that holds a CA, a token and an admitted node, so the
        // admission and revocation commands get past "no authority".
        let mut state = with_authority();
        let before = state.clone();
        if state.apply(2, &cmd).is_err() {
            assert_eq!(state, before, "a refused command changed the state");
        }
    }
});
