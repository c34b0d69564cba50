//! Protects the subprotocol message parser (`subscription_gateway::protocol::parse`) of both
//! protocols: arbitrary text never panics (deep JSON included), a message that names an
//! operation has a non-empty id and an object payload, and each protocol accepts only its own
//! message types.
#![no_main]

use libfuzzer_sys::fuzz_target;
use subscription_gateway::protocol::{parse, ClientMessage, Protocol};

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let protocol = if first & 1 == 0 {
        Protocol::TransportWs
    } else {
        Protocol::LegacyWs
    };
    let text = String::from_utf8_lossy(rest);
    match parse(protocol, &text) {
        Ok(ClientMessage::Subscribe { id, payload }) => {
            assert!(!id.is_empty());
            assert!(payload.is_object());
        }
        Ok(ClientMessage::Stop { id }) => assert!(!id.is_empty()),
        Ok(ClientMessage::Ping { .. } | ClientMessage::Pong) => {
            assert_eq!(protocol, Protocol::TransportWs)
        }
        Ok(ClientMessage::Terminate) => assert_eq!(protocol, Protocol::LegacyWs),
        Ok(ClientMessage::Init { .. }) | Err(_) => {}
    }
});
