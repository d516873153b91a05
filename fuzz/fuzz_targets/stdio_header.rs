//! The stdio channel's frame header (host <-> agent): whatever the other side wrote decodes
//! to a frame that encodes back to the same bytes, or is refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocols::stdio_frame::{decode_header, encode_header, HEADER};

fuzz_target!(|data: &[u8]| {
    let Ok(h) = <[u8; HEADER]>::try_from(data.get(..HEADER).unwrap_or(&[])) else {
        return;
    };
    if let Some((stream, flags, len)) = decode_header(&h) {
        assert_eq!(encode_header(stream, flags, len), h);
    }
});
