//! Decoding the runtime options containerd sends (`runtimeoptions.v1.Options`, the
//! `ConfigPath` of a runtime entry or `ctr run --runtime-config-path`).
//!
//! The message is three strings; its .proto is not part of containerd-shim-protos, so it is
//! decoded here with protobuf's wire reader rather than generated code.

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::CodedInputStream;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct RuntimeOptions {
    pub type_url: String,
    pub config_path: String,
    pub config_body: String,
}

const TYPE: &str = "runtimeoptions.v1.Options";

/// Returns the options if `any` holds a `runtimeoptions.v1.Options`; other option types
/// (runc's, for one) carry nothing for Janus and yield `Ok(None)`.
pub fn decode(any: &Any) -> Result<Option<RuntimeOptions>, String> {
    if any.type_url.is_empty() || !any.type_url.ends_with(TYPE) {
        return Ok(None);
    }
    decode_bytes(&any.value).map(Some)
}

pub fn decode_bytes(b: &[u8]) -> Result<RuntimeOptions, String> {
    let mut o = RuntimeOptions::default();
    let mut is = CodedInputStream::from_bytes(b);
    let err = |e: containerd_shim_protos::protobuf::Error| format!("decode {TYPE}: {e}");
    while let Some(tag) = is.read_raw_tag_or_eof().map_err(err)? {
        let (field, wire) = (tag >> 3, tag & 7);
        match (field, wire) {
            (1, 2) => o.type_url = is.read_string().map_err(err)?,
            (2, 2) => o.config_path = is.read_string().map_err(err)?,
            (3, 2) => o.config_body = is.read_string().map_err(err)?,
            (_, w) => {
                let wt = containerd_shim_protos::protobuf::rt::WireType::new(w)
                    .ok_or_else(|| format!("decode {TYPE}: bad wire type {w}"))?;
                is.skip_field(wt).map_err(err)?;
            }
        }
    }
    Ok(o)
}

#[cfg(test)]
pub fn encode(o: &RuntimeOptions) -> Vec<u8> {
    let mut out = Vec::new();
    for (field, s) in [(1u8, &o.type_url), (2, &o.config_path), (3, &o.config_body)] {
        if s.is_empty() {
            continue;
        }
        out.push(field << 3 | 2);
        let mut n = s.len();
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        }
        out.extend_from_slice(s.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let o = RuntimeOptions {
            type_url: "io.containerd.janus.v2".into(),
            config_path: "/etc/janus/config.toml".into(),
            config_body: String::new(),
        };
        let any = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: encode(&o),
            ..Default::default()
        };
        assert_eq!(decode(&any).unwrap().unwrap(), o);
    }

    #[test]
    fn other_types_are_ignored_and_garbage_is_an_error() {
        let any = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: vec![1, 2, 3],
            ..Default::default()
        };
        assert_eq!(decode(&any).unwrap(), None);
        assert!(decode_bytes(&[0x12, 0x05, b'a']).is_err());
    }

    #[test]
    fn long_path_and_unknown_field() {
        let o = RuntimeOptions {
            config_path: "/x".repeat(100),
            ..Default::default()
        };
        let mut b = encode(&o);
        b.extend_from_slice(&[0x28, 0x01]); // field 5, varint 1
        assert_eq!(decode_bytes(&b).unwrap().config_path, o.config_path);
    }
}
