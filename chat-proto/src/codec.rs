//! Line framing for the chat protocol: bytes in, whole lines out.
//!
//! Invariants:
//! - The buffer never holds more than `max_len` bytes of one line. A longer line is reported once
//!   as [`Frame::TooLong`] and the rest of it is discarded up to its terminator, so a client that
//!   streams bytes without a newline costs at most `max_len` bytes of memory.
//! - `\n` ends a line, a `\r` before it is dropped.
//! - A client that has never sent `\n` is a "message client" (the seed's clients `send()` each
//!   message with no terminator); [`LineDecoder::take_partial`] lets the session take its pending
//!   bytes as a line after a pause. Once a `\n` arrives the client is a line client for good and
//!   its partial lines are never cut.

use bytes::{Buf, BytesMut};

/// One decoded unit of input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete line without its terminator (raw bytes: UTF-8 is checked by the caller).
    Line(BytesMut),
    /// A line exceeded the maximum length and was dropped.
    TooLong,
}

/// Incremental line decoder with a hard length cap.
#[derive(Debug)]
pub struct LineDecoder {
    /// Bytes received and not yet returned as a frame.
    buf: BytesMut,
    /// Longest line accepted, in bytes, without the terminator.
    max_len: usize,
    /// How far `buf` has already been searched for `\n`, so each byte is scanned once.
    scanned: usize,
    /// Inside an over-long line: drop bytes until the next `\n`.
    discarding: bool,
    /// The client has sent at least one `\n`.
    line_client: bool,
}

impl LineDecoder {
    /// A decoder accepting lines of at most `max_len` bytes.
    pub fn new(max_len: usize) -> Self {
        LineDecoder {
            buf: BytesMut::new(),
            max_len,
            scanned: 0,
            discarding: false,
            line_client: false,
        }
    }

    /// Changes the cap (config reload); applies to the line being received too.
    pub fn set_max_len(&mut self, max_len: usize) {
        self.max_len = max_len;
    }

    /// The buffer to read socket bytes into.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Whether the client has ever terminated a line.
    pub fn is_line_client(&self) -> bool {
        self.line_client
    }

    /// Whether unterminated bytes are waiting.
    pub fn has_partial(&self) -> bool {
        !self.buf.is_empty() && !self.discarding
    }

    /// Returns the next complete frame, or `None` when more bytes are needed.
    pub fn next_frame(&mut self) -> Option<Frame> {
        loop {
            let newline = self.buf[self.scanned..]
                .iter()
                .position(|&b| b == b'\n')
                .map(|i| i + self.scanned);
            match newline {
                Some(end) => {
                    self.line_client = true;
                    self.scanned = 0;
                    if self.discarding {
                        self.buf.advance(end + 1);
                        self.discarding = false;
                        continue;
                    }
                    let mut line = self.buf.split_to(end + 1);
                    line.truncate(end);
                    if line.last() == Some(&b'\r') {
                        line.truncate(end - 1);
                    }
                    if line.len() > self.max_len {
                        return Some(Frame::TooLong);
                    }
                    return Some(line_frame(line));
                }
                None if self.discarding => {
                    self.buf.clear();
                    self.scanned = 0;
                    return None;
                }
                None if self.buf.len() > self.max_len + 1 => {
                    // +1: the `\r` of a CRLF may arrive before its `\n`.
                    self.discarding = true;
                    self.buf.clear();
                    self.scanned = 0;
                    return Some(Frame::TooLong);
                }
                None => {
                    self.scanned = self.buf.len();
                    return None;
                }
            }
        }
    }

    /// Takes the unterminated bytes as one line, for message clients after a pause; `None` for
    /// line clients or when nothing is pending.
    pub fn take_partial(&mut self) -> Option<Frame> {
        if self.line_client || !self.has_partial() {
            return None;
        }
        self.scanned = 0;
        let mut line = self.buf.split();
        if line.last() == Some(&b'\r') {
            line.truncate(line.len() - 1);
        }
        if line.len() > self.max_len {
            return Some(Frame::TooLong);
        }
        Some(line_frame(line))
    }

    /// Gives the buffer's memory back when no partial line is waiting, so an idle connection
    /// holds no read buffer at all (the next read allocates one again).
    pub fn shrink_if_idle(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }
}

fn line_frame(line: BytesMut) -> Frame {
    Frame::Line(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(dec: &mut LineDecoder, bytes: &[u8]) -> Vec<Frame> {
        dec.buffer_mut().extend_from_slice(bytes);
        std::iter::from_fn(|| dec.next_frame()).collect()
    }

    fn line(s: &str) -> Frame {
        Frame::Line(BytesMut::from(s))
    }

    #[test]
    fn splits_lf_and_crlf() {
        let mut d = LineDecoder::new(100);
        assert_eq!(
            feed(&mut d, b"a\nb\r\n\nc"),
            vec![line("a"), line("b"), line("")]
        );
        assert_eq!(feed(&mut d, b"d\n"), vec![line("cd")]);
    }

    #[test]
    fn too_long_line_is_reported_once_and_resyncs() {
        let mut d = LineDecoder::new(8);
        let mut out = feed(&mut d, b"ok1\n0123456789");
        out.extend(feed(&mut d, b"0123456789"));
        out.extend(feed(&mut d, b"xx\nok2\nok3\n"));
        assert_eq!(
            out,
            vec![line("ok1"), Frame::TooLong, line("ok2"), line("ok3")]
        );
    }

    #[test]
    fn line_of_exactly_max_len_passes_with_crlf_split() {
        let mut d = LineDecoder::new(4);
        assert_eq!(feed(&mut d, b"abcd\r"), vec![]);
        assert_eq!(feed(&mut d, b"\n"), vec![line("abcd")]);
        assert_eq!(feed(&mut d, b"abcde\n"), vec![Frame::TooLong]);
    }

    #[test]
    fn buffer_stays_bounded_without_newlines() {
        let mut d = LineDecoder::new(64);
        for _ in 0..1000 {
            feed(&mut d, &[b'x'; 100]);
            assert!(d.buffer_mut().len() <= 100);
        }
    }

    #[test]
    fn partial_taken_only_from_message_clients() {
        let mut d = LineDecoder::new(100);
        feed(&mut d, b"alice");
        assert_eq!(d.take_partial(), Some(line("alice")));
        assert_eq!(d.take_partial(), None);
        feed(&mut d, b"hi\nhalf");
        assert!(d.is_line_client());
        assert_eq!(d.take_partial(), None);
        assert_eq!(feed(&mut d, b" done\n"), vec![line("half done")]);
    }

    /// Decodes `input` fed in the given chunk sizes (cycled), checking the memory bound after
    /// every chunk; returns the frames.
    fn decode_chunked(max_len: usize, input: &[u8], chunks: &[usize]) -> Vec<Frame> {
        let mut d = LineDecoder::new(max_len);
        let mut out = Vec::new();
        let mut rest = input;
        let mut sizes = chunks.iter().cycle();
        while !rest.is_empty() {
            let n = sizes.next().copied().unwrap_or(1).clamp(1, rest.len());
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            out.extend(feed(&mut d, chunk));
            // Invariant: between reads at most one line's worth (+ a pending `\r`) is held.
            assert!(
                d.buffer_mut().len() <= max_len + 1,
                "buffer grew past the cap"
            );
        }
        out
    }

    /// Bytes rich in terminators, so lines of every length around the cap occur.
    fn stream() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        proptest::collection::vec(
            prop_oneof![
                4 => Just(b'\n'),
                2 => Just(b'\r'),
                10 => b'a'..=b'e',
                2 => any::<u8>(),
            ],
            0..400,
        )
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(10_000))]

        /// Decoding a stream fed in random chunks equals decoding it whole.
        #[test]
        fn chunking_never_changes_the_frames(
            max_len in 1usize..40,
            input in stream(),
            chunks in proptest::collection::vec(1usize..50, 1..20),
        ) {
            let whole = decode_chunked(max_len, &input, &[input.len().max(1)]);
            let chunked = decode_chunked(max_len, &input, &chunks);
            proptest::prop_assert_eq!(&chunked, &whole);
            // A discarded over-long tail may be dropped at different points, but the frames a
            // client sees never differ.
            for f in &chunked {
                if let Frame::Line(l) = f {
                    proptest::prop_assert!(l.len() <= max_len);
                    proptest::prop_assert!(!l.contains(&b'\n'));
                }
            }
        }

        /// Arbitrary bytes, arbitrary caps and the partial-line path never panic.
        #[test]
        fn arbitrary_bytes_never_panic(
            max_len in 0usize..64,
            input in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            flush_every in 1usize..20,
        ) {
            let mut d = LineDecoder::new(max_len);
            for (i, chunk) in input.chunks(flush_every).enumerate() {
                let _ = feed(&mut d, chunk);
                if i % 3 == 0 {
                    let _ = d.take_partial();
                }
                d.shrink_if_idle();
            }
        }
    }
}
