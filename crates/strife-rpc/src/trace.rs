//! W3C trace context (`traceparent`): which trace a call belongs to.
//!
//! The client starts a trace per command and sends
//! `traceparent: 00-<32 hex trace id>-<16 hex span id>-01` with every call;
//! the gateway's call-log layer reads it (or starts a trace when it is
//! absent or malformed) and puts `trace_id` in the call's span, so every
//! log line of the call carries it; the gateway passes it on to the banks
//! with each leg. A traceparent is only ever used to correlate logs and
//! exported spans: it is parsed strictly, bounded in length, and never
//! decides anything.

use std::fmt;

/// The metadata key, as W3C Trace Context names the HTTP header.
pub const TRACEPARENT: &str = "traceparent";
/// The length of a version-00 traceparent; anything else is malformed.
pub const TRACEPARENT_LEN: usize = 55;
/// `STRIFE_TRACEPARENT`: the trace a client command joins instead of
/// starting its own (for following one command through the logs).
pub const TRACEPARENT_ENV: &str = "STRIFE_TRACEPARENT";

/// One span of one trace: the trace id every party logs, this party's span
/// id (sent on as the parent of the next hop), and whether it is sampled.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl TraceContext {
    /// A new trace (random ids from the OS's CSPRNG), sampled.
    pub fn new_root() -> TraceContext {
        let mut trace_id = [0u8; 16];
        fill_random(&mut trace_id);
        TraceContext { trace_id, span_id: new_span_id(), sampled: true }
    }

    /// A new span of the same trace.
    pub fn child(&self) -> TraceContext {
        TraceContext { span_id: new_span_id(), ..*self }
    }

    /// Parses a version-00 `traceparent`; `None` for anything else
    /// (another length or version, upper-case or non-hex digits, an
    /// all-zero id).
    pub fn parse(text: &str) -> Option<TraceContext> {
        let bytes = text.as_bytes();
        if bytes.len() != TRACEPARENT_LEN || &bytes[..3] != b"00-" || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        let mut flags = [0u8; 1];
        hex_decode(&bytes[3..35], &mut trace_id)?;
        hex_decode(&bytes[36..52], &mut span_id)?;
        hex_decode(&bytes[53..55], &mut flags)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceContext { trace_id, span_id, sampled: flags[0] & 1 == 1 })
    }

    /// The context in an incoming request's headers, if well formed.
    pub fn from_headers(headers: &http::HeaderMap) -> Option<TraceContext> {
        headers.get(TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(TraceContext::parse)
    }

    /// The trace a client command runs in: [`TRACEPARENT_ENV`] when it
    /// holds a valid traceparent (its span becomes the parent), else a new
    /// one.
    pub fn for_command() -> TraceContext {
        std::env::var(TRACEPARENT_ENV)
            .ok()
            .and_then(|v| TraceContext::parse(v.trim()))
            .map_or_else(TraceContext::new_root, |parent| parent.child())
    }

    /// The trace id as 32 lower-case hex digits (what logs show).
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The `traceparent` value naming this span as the parent.
    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{}",
            hex(&self.trace_id),
            hex(&self.span_id),
            if self.sampled { "01" } else { "00" }
        )
    }

    /// The header as gRPC metadata.
    pub fn metadata(&self) -> tonic::metadata::MetadataValue<tonic::metadata::Ascii> {
        // 55 characters of hex and dashes: always valid ASCII metadata.
        tonic::metadata::MetadataValue::try_from(self.header())
            .unwrap_or_else(|_| tonic::metadata::MetadataValue::from_static("00-invalid"))
    }

    /// Puts this context's `traceparent` into a request's metadata.
    pub fn inject<T>(&self, req: &mut tonic::Request<T>) {
        req.metadata_mut().insert(TRACEPARENT, self.metadata());
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.header())
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.header())
    }
}

fn new_span_id() -> [u8; 8] {
    let mut span_id = [0u8; 8];
    fill_random(&mut span_id);
    span_id
}

/// Random bytes from `rand`'s per-thread generator (seeded from the OS and
/// reseeded by `rand`), never all zero (an invalid id). Asking the OS for
/// every id cost a system call per RPC, which showed at one payment at a time.
fn fill_random(out: &mut [u8]) {
    rand::fill(out);
    while out.iter().all(|b| *b == 0) {
        rand::fill(out);
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// Lower-case hex only, as the W3C format requires.
fn hex_decode(text: &[u8], out: &mut [u8]) -> Option<()> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    if text.len() != out.len() * 2 {
        return None;
    }
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_round_trips_and_a_child_keeps_the_trace() {
        let root = TraceContext::new_root();
        let header = root.header();
        assert_eq!(header.len(), TRACEPARENT_LEN);
        assert_eq!(TraceContext::parse(&header), Some(root));
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
        assert_ne!(TraceContext::new_root().trace_id, root.trace_id);
    }

    #[test]
    fn the_w3c_example_parses() {
        let c =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").expect("valid");
        assert_eq!(c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(c.sampled);
        let c =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").expect("valid");
        assert!(!c.sampled);
    }

    #[test]
    fn anything_malformed_is_refused() {
        for bad in [
            "",
            "garbage",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-é",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad}");
        }
        let long = "0".repeat(100_000);
        assert_eq!(TraceContext::parse(&long), None);
    }
}
