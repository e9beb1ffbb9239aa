//! Interoperability shim for the Workload API socket: some gRPC clients (gRPC core, hence
//! Python's `spiffe` package, and grpc-java) send the socket path, raw or
//! percent-encoded, as the HTTP/2 `:authority` of Unix-socket requests. The HTTP/2 server
//! under tonic rejects such an authority with a stream reset (PROTOCOL_ERROR), so those
//! clients could not talk to the agent at all.
//!
//! [`AuthorityFix`] wraps each accepted connection and rewrites, on the way in, the
//! `:authority` of request headers that is not a valid URI authority to `localhost` (what
//! grpc-go sends for Unix sockets). Only HEADERS/CONTINUATION frames are touched: their
//! header block is decoded with the connection's HPACK state and re-encoded as literals
//! without indexing (so the server's HPACK table stays empty and consistent). Everything
//! else passes through byte for byte. If anything looks wrong the shim stops touching the
//! connection and lets the server judge it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The HTTP/2 default SETTINGS_MAX_FRAME_SIZE, which the server does not raise.
const MAX_FRAME: usize = 16_384;
/// A header block larger than this is not a Workload API request; leave it alone.
const MAX_BLOCK: usize = 64 * 1024;

struct PendingHeaders {
    stream_id: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
    raw: Vec<u8>,
}

/// A server-side connection whose incoming `:authority` headers are made acceptable.
pub struct AuthorityFix<S> {
    inner: S,
    preface_left: usize,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    pending: Option<PendingHeaders>,
    decoder: loona_hpack::Decoder<'static>,
    passthrough: bool,
    eof: bool,
}

impl<S> std::fmt::Debug for AuthorityFix<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityFix")
            .field("passthrough", &self.passthrough)
            .finish_non_exhaustive()
    }
}

fn encode_int(out: &mut Vec<u8>, mut value: usize, prefix_bits: u8, first: u8) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

fn encode_str(out: &mut Vec<u8>, s: &[u8]) {
    encode_int(out, s.len(), 7, 0);
    out.extend_from_slice(s);
}

/// Encodes headers as "literal without indexing, new name" (no dynamic table use).
fn encode_block(headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.push(0x00);
        encode_str(&mut out, name);
        encode_str(&mut out, value);
    }
    out
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream_id: u32, payload: &[u8]) {
    let len = payload.len();
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Whether an `:authority` value is one the HTTP/2 server accepts.
fn authority_ok(v: &[u8]) -> bool {
    http::uri::Authority::try_from(v).is_ok()
}

impl<S> AuthorityFix<S> {
    /// Wraps a freshly accepted connection (nothing read from it yet).
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            preface_left: PREFACE_LEN,
            inbuf: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            pending: None,
            decoder: loona_hpack::Decoder::new(),
            passthrough: false,
            eof: false,
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn give_up(&mut self) {
        if let Some(p) = self.pending.take() {
            self.out.extend_from_slice(&p.raw);
        }
        self.out.append(&mut self.inbuf);
        self.passthrough = true;
    }

    /// Emits a complete header block, rewritten.
    fn emit_headers(&mut self, p: PendingHeaders) {
        let Ok(mut headers) = self.decoder.decode(&p.block) else {
            // The HPACK state is now unknown: stop interfering.
            self.out.extend_from_slice(&p.raw);
            self.give_up();
            return;
        };
        let mut changed = false;
        for (name, value) in headers.iter_mut() {
            if name.as_slice() == b":authority" && !authority_ok(value) {
                *value = b"localhost".to_vec();
                changed = true;
            }
        }
        if changed {
            tracing::trace!("rewrote a Unix-socket path :authority to localhost");
        }
        let block = encode_block(&headers);
        let mut prefix = Vec::new();
        if let Some(pr) = p.priority {
            prefix.extend_from_slice(&pr);
        }
        let first_room = MAX_FRAME - prefix.len();
        let base_flags = (p.flags & FLAG_END_STREAM)
            | if p.priority.is_some() {
                FLAG_PRIORITY
            } else {
                0
            };
        if block.len() <= first_room {
            prefix.extend_from_slice(&block);
            frame(
                &mut self.out,
                TYPE_HEADERS,
                base_flags | FLAG_END_HEADERS,
                p.stream_id,
                &prefix,
            );
            return;
        }
        prefix.extend_from_slice(&block[..first_room]);
        frame(
            &mut self.out,
            TYPE_HEADERS,
            base_flags,
            p.stream_id,
            &prefix,
        );
        let mut rest = &block[first_room..];
        while !rest.is_empty() {
            let n = rest.len().min(MAX_FRAME);
            let last = n == rest.len();
            frame(
                &mut self.out,
                TYPE_CONTINUATION,
                if last { FLAG_END_HEADERS } else { 0 },
                p.stream_id,
                &rest[..n],
            );
            rest = &rest[n..];
        }
    }

    /// Moves what can be processed from `inbuf` to `out`.
    fn process(&mut self) {
        if self.passthrough {
            self.out.append(&mut self.inbuf);
            return;
        }
        if self.preface_left > 0 {
            let n = self.preface_left.min(self.inbuf.len());
            self.out.extend(self.inbuf.drain(..n));
            self.preface_left -= n;
            if self.preface_left > 0 {
                return;
            }
        }
        while self.inbuf.len() >= FRAME_HEADER_LEN {
            let len = (usize::from(self.inbuf[0]) << 16)
                | (usize::from(self.inbuf[1]) << 8)
                | usize::from(self.inbuf[2]);
            if self.inbuf.len() < FRAME_HEADER_LEN + len {
                return;
            }
            let raw: Vec<u8> = self.inbuf.drain(..FRAME_HEADER_LEN + len).collect();
            let kind = raw[3];
            let flags = raw[4];
            let stream_id = u32::from_be_bytes([raw[5], raw[6], raw[7], raw[8]]) & 0x7fff_ffff;
            let payload = &raw[FRAME_HEADER_LEN..];
            match kind {
                TYPE_HEADERS if self.pending.is_none() => {
                    let mut off = 0;
                    let mut pad = 0;
                    if flags & FLAG_PADDED != 0 {
                        let Some(p) = payload.first() else {
                            self.out.extend_from_slice(&raw);
                            return self.give_up();
                        };
                        pad = usize::from(*p);
                        off = 1;
                    }
                    let mut priority = None;
                    if flags & FLAG_PRIORITY != 0 {
                        if payload.len() < off + 5 {
                            self.out.extend_from_slice(&raw);
                            return self.give_up();
                        }
                        let mut p = [0u8; 5];
                        p.copy_from_slice(&payload[off..off + 5]);
                        priority = Some(p);
                        off += 5;
                    }
                    if payload.len() < off + pad {
                        self.out.extend_from_slice(&raw);
                        return self.give_up();
                    }
                    let block = payload[off..payload.len() - pad].to_vec();
                    let p = PendingHeaders {
                        stream_id,
                        flags,
                        priority,
                        block,
                        raw,
                    };
                    if flags & FLAG_END_HEADERS != 0 {
                        self.emit_headers(p);
                    } else {
                        self.pending = Some(p);
                    }
                }
                TYPE_CONTINUATION if self.pending.is_some() => {
                    let mut p = self.pending.take().expect("checked");
                    if p.stream_id != stream_id || p.block.len() + payload.len() > MAX_BLOCK {
                        self.pending = Some(p);
                        self.out.extend_from_slice(&raw);
                        return self.give_up();
                    }
                    p.block.extend_from_slice(payload);
                    p.raw.extend_from_slice(&raw);
                    if flags & FLAG_END_HEADERS != 0 {
                        self.emit_headers(p);
                    } else {
                        self.pending = Some(p);
                    }
                }
                _ if self.pending.is_some() => {
                    // A header block interrupted by another frame: a protocol error the
                    // server must see as it is.
                    self.out.extend_from_slice(&raw);
                    return self.give_up();
                }
                _ => self.out.extend_from_slice(&raw),
            }
            if self.passthrough {
                self.out.append(&mut self.inbuf);
                return;
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut tmp = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let got = rb.filled();
                    if got.is_empty() {
                        this.eof = true;
                        // Whatever is left incomplete goes to the server as it is.
                        this.give_up();
                    } else {
                        this.inbuf.extend_from_slice(got);
                        this.process();
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for AuthorityFix<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn parse_frames(mut b: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let len = (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]);
            let sid = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
            out.push((b[3], b[4], sid, b[9..9 + len].to_vec()));
            b = &b[9 + len..];
        }
        out
    }

    async fn run(input: Vec<u8>) -> Vec<u8> {
        let mut fix = AuthorityFix::new(&input[..]);
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await.unwrap();
        out
    }

    fn headers(authority: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        vec![
            (b":method".to_vec(), b"POST".to_vec()),
            (b":scheme".to_vec(), b"http".to_vec()),
            (
                b":path".to_vec(),
                b"/SpiffeWorkloadAPI/FetchX509SVID".to_vec(),
            ),
            (b":authority".to_vec(), authority.as_bytes().to_vec()),
            (b"workload.spiffe.io".to_vec(), b"true".to_vec()),
        ]
    }

    #[tokio::test]
    async fn rewrites_a_path_authority_and_keeps_the_rest() {
        let mut input = PREFACE.to_vec();
        frame(&mut input, 0x4, 0, 0, &[]); // SETTINGS
                                           // Indexed-with-incremental-indexing encoding by a real encoder, split over
                                           // HEADERS (padded, with priority) + CONTINUATION.
        let mut enc = loona_hpack::Encoder::new();
        let h = headers("%2Ftmp%2Fagent.sock");
        let block = enc.encode(h.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let mut p = vec![3u8, 0, 0, 0, 0, 16];
        p.extend_from_slice(&block[..10]);
        p.extend_from_slice(&[0, 0, 0]);
        frame(&mut input, TYPE_HEADERS, FLAG_PADDED | FLAG_PRIORITY, 1, &p);
        frame(
            &mut input,
            TYPE_CONTINUATION,
            FLAG_END_HEADERS,
            1,
            &block[10..],
        );
        frame(&mut input, 0x0, FLAG_END_STREAM, 1, b"\0\0\0\0\0"); // DATA
                                                                   // A second request on the same connection uses the client's dynamic table.
        let block2 = enc.encode(
            headers("/tmp/agent.sock")
                .iter()
                .map(|(n, v)| (n.as_slice(), v.as_slice())),
        );
        frame(&mut input, TYPE_HEADERS, FLAG_END_HEADERS, 3, &block2);
        // And a valid authority is left as it is.
        let block3 = enc.encode(
            headers("localhost:1234")
                .iter()
                .map(|(n, v)| (n.as_slice(), v.as_slice())),
        );
        frame(&mut input, TYPE_HEADERS, FLAG_END_HEADERS, 5, &block3);

        let out = run(input).await;
        assert_eq!(&out[..24], PREFACE);
        let frames = parse_frames(&out[24..]);
        assert_eq!(frames.len(), 5);
        assert_eq!(frames[0].0, 0x4);
        let mut dec = loona_hpack::Decoder::new();
        let (kind, flags, sid, payload) = &frames[1];
        assert_eq!((*kind, *sid), (TYPE_HEADERS, 1));
        assert_eq!(*flags, FLAG_END_HEADERS | FLAG_PRIORITY);
        assert_eq!(&payload[..5], &[0, 0, 0, 0, 16]);
        assert_eq!(dec.decode(&payload[5..]).unwrap(), headers("localhost"));
        assert_eq!(frames[2].0, 0x0);
        assert_eq!(frames[2].3, b"\0\0\0\0\0");
        assert_eq!(dec.decode(&frames[3].3).unwrap(), headers("localhost"));
        assert_eq!(dec.decode(&frames[4].3).unwrap(), headers("localhost:1234"));
    }

    #[tokio::test]
    async fn large_blocks_are_split_into_continuations() {
        let mut input = PREFACE.to_vec();
        let mut h = headers("/tmp/x.sock");
        h.push((b"big".to_vec(), vec![b'a'; 40_000]));
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode(h.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let mut rest = &block[..];
        let mut first = true;
        while !rest.is_empty() {
            let n = rest.len().min(MAX_FRAME);
            let last = n == rest.len();
            frame(
                &mut input,
                if first {
                    TYPE_HEADERS
                } else {
                    TYPE_CONTINUATION
                },
                if last { FLAG_END_HEADERS } else { 0 },
                1,
                &rest[..n],
            );
            first = false;
            rest = &rest[n..];
        }
        let out = run(input).await;
        let frames = parse_frames(&out[24..]);
        assert!(frames.len() >= 3);
        assert!(frames.iter().all(|f| f.3.len() <= MAX_FRAME));
        let block: Vec<u8> = frames.iter().flat_map(|f| f.3.clone()).collect();
        let mut want = h.clone();
        want[3].1 = b"localhost".to_vec();
        assert_eq!(loona_hpack::Decoder::new().decode(&block).unwrap(), want);
        assert_eq!(frames.last().unwrap().1, FLAG_END_HEADERS);
    }

    #[tokio::test]
    async fn garbage_passes_through_untouched() {
        let mut input = PREFACE.to_vec();
        frame(
            &mut input,
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &[0xff, 0xff, 0xff],
        );
        frame(&mut input, 0x0, 0, 1, b"x");
        input.extend_from_slice(&[1, 2, 3]);
        assert_eq!(run(input.clone()).await, input);
    }

    /// No header block, however malformed, panics the shim (a single HPACK byte did with the
    /// decoder it used before: `panic = "abort"` would have taken the agent down). Every
    /// one- and two-byte block and 20,000 pseudo-random ones, each in a HEADERS frame.
    #[tokio::test]
    async fn malformed_header_blocks_never_panic() {
        let mut blocks: Vec<Vec<u8>> = vec![vec![0x20, 0x3f]];
        for a in 0..=255u8 {
            blocks.push(vec![a]);
            for b in 0..=255u8 {
                blocks.push(vec![a, b]);
            }
        }
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let n = (next() % 48) as usize + 1;
            blocks.push((0..n).map(|_| next() as u8).collect());
        }
        for block in &blocks {
            let mut input = PREFACE.to_vec();
            frame(&mut input, TYPE_HEADERS, FLAG_END_HEADERS, 1, block);
            let out = run(input).await;
            assert!(out.starts_with(PREFACE), "{block:?}");
        }
    }

    /// Fuzz target (see `ca_identity`'s fuzz module for how it runs): whatever a local
    /// caller sends after the preface, as one HEADERS frame's block or as raw frames, the
    /// shim never panics and never drops or invents the preface.
    #[test]
    fn fuzz_connection_bytes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        bolero::check!().for_each(|bytes: &[u8]| {
            let mut framed = PREFACE.to_vec();
            frame(&mut framed, TYPE_HEADERS, FLAG_END_HEADERS, 1, bytes);
            let mut raw = PREFACE.to_vec();
            raw.extend_from_slice(bytes);
            for input in [framed, raw] {
                let out = rt.block_on(run(input));
                assert!(out.starts_with(PREFACE));
            }
        });
    }
}
