//! Protects the websocket reader's size limit (`subscription_gateway::socket::Inbound`): a frame
//! whose header declares more than the limit is refused as soon as the header is in, never
//! waited for (actix-http's parser alone would keep buffering toward 2^63 bytes); memory held
//! never follows a declared length; reassembled text stays within the limit; nothing panics.
//!
//! Each input is also fed in two pieces (cut where its last byte says), as two reads would
//! deliver it: the messages, and the error if any, must be exactly those of the whole input, so
//! frames and fragmented messages split across reads are reassembled the same way.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use subscription_gateway::socket::{Inbound, Incoming};

const MAX: usize = 1024;
/// Longest frame header (RFC 6455 §5.2): 2 bytes, a 64-bit length, a mask key.
const MAX_HEADER: usize = 14;

fuzz_target!(|data: &[u8]| {
    whole_input(data);
    let whole = messages(&mut Inbound::new(MAX, BytesMut::from(data)));
    let cut = data.len() * usize::from(data.last().copied().unwrap_or(0)) / 256;
    let mut inbound = Inbound::new(MAX, BytesMut::from(&data[..cut]));
    let mut pieces = messages(&mut inbound);
    if !pieces.last().is_some_and(|last| last.starts_with("error")) {
        inbound.push_bytes(&data[cut..]);
        pieces.extend(messages(&mut inbound));
    }
    assert_eq!(pieces, whole, "cut at {cut} of {}", data.len());
});

/// What the reader makes of the bytes it has, until it waits for more or refuses them.
fn messages(inbound: &mut Inbound) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        match inbound.next_message() {
            Ok(Some(Incoming::Text(text))) => seen.push(format!("text {text:?}")),
            Ok(Some(other)) => seen.push(format!("{other:?}")),
            Ok(None) => return seen,
            Err(err) => {
                seen.push(format!("error {err}"));
                return seen;
            }
        }
    }
}

fn whole_input(data: &[u8]) {
    let mut inbound = Inbound::new(MAX, BytesMut::from(data));
    // The input buffer itself (the allocator may double it once, when the parser reserves room
    // for the next frame: at most MAX + MAX_HEADER), and a reassembly buffer of at most MAX
    // bytes grown by doubling: never anything a header declares.
    let bound = 2 * data.len() + 3 * MAX + 64;
    loop {
        let result = inbound.next_message();
        let held = inbound.held_bytes();
        assert!(
            held <= bound,
            "holds {held} bytes for a {}-byte input",
            data.len()
        );
        match result {
            Ok(Some(Incoming::Text(text))) => assert!(text.len() <= MAX, "text of {}", text.len()),
            Ok(Some(_)) => {}
            Ok(None) => {
                // Every complete frame was taken; it waits only for a frame it could accept.
                let (tail, declared) = after_complete_frames(data);
                if let Some(declared) = declared {
                    assert!(
                        declared <= MAX as u64,
                        "waits for a frame declaring {declared}"
                    );
                }
                assert!(
                    tail.len() < MAX_HEADER + MAX,
                    "waits with {} bytes",
                    tail.len()
                );
                if tail.is_empty() {
                    // Idle: no read buffer, at most a message being reassembled.
                    assert!(held <= 2 * MAX + 64, "idle reader holds {held}");
                }
                return;
            }
            Err(_) => return,
        }
    }
}

/// The bytes after the last complete frame, and the payload length the incomplete frame there
/// declares once its length bytes are in. Written from the RFC, not from socket.rs.
fn after_complete_frames(mut data: &[u8]) -> (&[u8], Option<u64>) {
    loop {
        let Some(&second) = data.get(1) else {
            return (data, None);
        };
        let (declared, len_bytes) = match second & 0x7F {
            126 => match data.get(2..4) {
                Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 2),
                None => return (data, None),
            },
            127 => match data.get(2..10) {
                Some(b) => (u64::from_be_bytes(b.try_into().unwrap_or_default()), 8),
                None => return (data, None),
            },
            short => (u64::from(short), 0),
        };
        let mask = if second & 0x80 != 0 { 4 } else { 0 };
        let frame_len = declared.saturating_add(2 + len_bytes + mask);
        if (data.len() as u64) < frame_len {
            return (data, Some(declared));
        }
        data = &data[frame_len as usize..];
    }
}
