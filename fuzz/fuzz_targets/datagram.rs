//! Every gossip datagram decoder, and the SWIM state machine behind it: bytes from a member's
//! connection must never panic the agent or corrupt its member table.
#![no_main]

use blx_membership::meta::NodeMeta;
use blx_membership::wire;
use blx_membership::{NodeId, NodeIdentity, Swim, SwimConfig};
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;

fuzz_target!(|data: &[u8]| {
    let _ = wire::decode_datagram(data);
    let _ = wire::decode_meta_broadcast(data);
    let now = tokio::time::Instant::now();
    let me = NodeIdentity { id: NodeId([1; 8]), addr: "127.0.0.1:7946".parse().unwrap(), generation: 1 };
    let meta = NodeMeta { name: "fuzz".into(), ..Default::default() };
    let mut swim = Swim::new(me, meta, SwimConfig::lan(), rand::rngs::StdRng::seed_from_u64(0), now);
    // The sender id comes from a certificate, so try both a plausible one and the claimed one.
    let _ = swim.handle_packet(NodeId([2; 8]), data, now);
    let _ = swim.handle_packet(NodeId(*data.get(..8).and_then(|s| <&[u8; 8]>::try_from(s).ok()).unwrap_or(&[0; 8])), data, now);
    swim.handle_deadline(now + std::time::Duration::from_secs(5));
    while swim.poll_transmit().is_some() {}
    assert!(swim.members().contains_key(&NodeId([1; 8])));
});
