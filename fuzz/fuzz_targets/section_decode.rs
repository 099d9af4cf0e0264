//! Fuzz the framed clock-section decoder: any input gives Ok (a valid state that re-encodes to
//! the same bytes) or a typed error, never a panic or a huge allocation.
//!
//! The first byte picks the mode: odd = decode the input as it is (frame parsing, CRC), even =
//! wrap the rest in a valid frame (version from the second byte, correct length and CRC) so the
//! fuzzer reaches the payload decoder and validation behind the CRC.
#![no_main]
use guest_clock_format::{decode, encode, CRC, MAGIC};
use libfuzzer_sys::fuzz_target;

fn framed(version: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(payload.len() + 24);
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(payload);
    let crc = CRC.checksum(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

fuzz_target!(|data: &[u8]| {
    let input = match data {
        [mode, v, rest @ ..] if mode % 2 == 0 => framed(u16::from(*v % 4), rest),
        _ => data.to_vec(),
    };
    if let Ok(d) = decode(&input) {
        assert!(d.state.validate().is_ok());
        let again = encode(&d.state, d.version).expect("a decoded state encodes");
        assert_eq!(again, input, "decode/encode must round-trip");
    }
});
