//! Where a forwarded request's body ends. The proxy passes on exactly the body its head
//! announced and nothing after it, so bytes an agent sends past the body (a second request,
//! perhaps with another `Host`) never reach the upstream server, whatever that server does
//! with `Connection: close`.

use std::fmt;

/// How a request's head frames its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Body {
    Empty,
    Length(u64),
    Chunked,
}

/// A chunked body that breaks the grammar: the proxy stops forwarding and closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BadChunk(&'static str);

impl fmt::Display for BadChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed chunked body: {}", self.0)
    }
}

impl std::error::Error for BadChunk {}

/// The most hex digits a chunk size may have (sizes fit in a u64).
const MAX_SIZE_DIGITS: u8 = 16;

/// Where the reader is in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// `Length` bytes of a plain body, or of a chunk's data, are still to come.
    Data {
        left: u64,
        chunked: bool,
    },
    /// A chunk's size, in hex, read so far.
    Size {
        value: u64,
        digits: u8,
    },
    /// After the size: `;name=value` extensions, up to CR.
    Extension {
        value: u64,
    },
    /// The LF after a chunk size line.
    SizeLf {
        value: u64,
    },
    /// The CR and LF after a chunk's data.
    DataCr,
    DataLf,
    /// After the last chunk: at the start of a trailer line (or the final CRLF).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

/// Reads a body as it passes, telling how much of each piece belongs to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BodyReader {
    place: Place,
}

impl BodyReader {
    pub fn new(body: Body) -> BodyReader {
        let place = match body {
            Body::Empty | Body::Length(0) => Place::Done,
            Body::Length(left) => Place::Data {
                left,
                chunked: false,
            },
            Body::Chunked => Place::Size {
                value: 0,
                digits: 0,
            },
        };
        BodyReader { place }
    }

    pub fn is_done(&self) -> bool {
        self.place == Place::Done
    }

    /// How many bytes at the start of `input` belong to the body. Once the body is done,
    /// the rest of `input` (and everything after) is not part of it.
    pub fn take(&mut self, input: &[u8]) -> Result<usize, BadChunk> {
        let mut at = 0;
        while at < input.len() {
            if let Place::Data { left, chunked } = self.place {
                let step = left.min((input.len() - at) as u64);
                at += step as usize;
                self.place = match (left - step, chunked) {
                    (0, true) => Place::DataCr,
                    (0, false) => Place::Done,
                    (left, chunked) => Place::Data { left, chunked },
                };
                continue;
            }
            if self.place == Place::Done {
                break;
            }
            self.place = self.step(input[at])?;
            at += 1;
        }
        Ok(at)
    }

    /// One byte of the chunked framing (never in `Data` or `Done`).
    fn step(&self, byte: u8) -> Result<Place, BadChunk> {
        let next = match (self.place, byte) {
            (Place::Size { value, digits }, _) if byte.is_ascii_hexdigit() => {
                if digits == MAX_SIZE_DIGITS {
                    return Err(BadChunk("a chunk size has more than 16 hex digits"));
                }
                let digit = (byte as char).to_digit(16).unwrap_or(0);
                Place::Size {
                    value: (value << 4) | u64::from(digit),
                    digits: digits + 1,
                }
            }
            (Place::Size { digits: 0, .. }, _) => {
                return Err(BadChunk("a chunk does not start with its size"));
            }
            (Place::Size { value, .. }, b';' | b' ' | b'\t') => Place::Extension { value },
            (Place::Size { value, .. } | Place::Extension { value }, b'\r') => {
                Place::SizeLf { value }
            }
            (Place::Size { .. }, _) => return Err(BadChunk("a chunk size is not hex")),
            (Place::Extension { .. }, b'\n') => {
                return Err(BadChunk("a chunk size line ends without CR"));
            }
            (Place::Extension { value }, _) => Place::Extension { value },
            (Place::SizeLf { value: 0 }, b'\n') => Place::TrailerStart,
            (Place::SizeLf { value }, b'\n') => Place::Data {
                left: value,
                chunked: true,
            },
            (Place::DataCr, b'\r') => Place::DataLf,
            (Place::DataLf | Place::TrailerLf | Place::EndLf, b'\n') => match self.place {
                Place::DataLf => Place::Size {
                    value: 0,
                    digits: 0,
                },
                Place::TrailerLf => Place::TrailerStart,
                _ => Place::Done,
            },
            (Place::TrailerStart, b'\r') => Place::EndLf,
            (Place::TrailerStart | Place::TrailerLine, b'\n') => {
                return Err(BadChunk("a trailer line ends without CR"));
            }
            (Place::TrailerStart | Place::TrailerLine, _) if byte == b'\r' => Place::TrailerLf,
            (Place::TrailerStart | Place::TrailerLine, _) => Place::TrailerLine,
            (Place::SizeLf { .. } | Place::DataLf | Place::TrailerLf | Place::EndLf, _) => {
                return Err(BadChunk("CR without LF"));
            }
            (Place::DataCr, _) => return Err(BadChunk("a chunk is longer than its size")),
            (Place::Data { .. } | Place::Done, _) => return Ok(self.place),
        };
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How much of `input` a reader of `body` takes, fed in pieces of `piece` bytes.
    fn taken(body: Body, input: &[u8], piece: usize) -> Result<(usize, bool), BadChunk> {
        let mut reader = BodyReader::new(body);
        let mut total = 0;
        for part in input.chunks(piece) {
            let took = reader.take(part)?;
            total += took;
            if took < part.len() {
                break;
            }
        }
        Ok((total, reader.is_done()))
    }

    #[test]
    fn a_length_ends_the_body() {
        assert_eq!(taken(Body::Empty, b"GET /", 64), Ok((0, true)));
        assert_eq!(taken(Body::Length(0), b"x", 64), Ok((0, true)));
        for piece in [1, 3, 64] {
            assert_eq!(taken(Body::Length(5), b"helloGET /", piece), Ok((5, true)));
        }
        assert_eq!(taken(Body::Length(5), b"hel", 64), Ok((3, false)));
    }

    #[test]
    fn chunks_end_at_the_last_chunk_and_trailers() {
        let body = b"5\r\nhello\r\n1;name=value\r\n!\r\n0\r\nTrailer: x\r\n\r\n";
        let mut input = body.to_vec();
        input.extend_from_slice(b"GET http://other.test/ HTTP/1.1\r\n\r\n");
        for piece in [1, 2, 7, 1000] {
            assert_eq!(
                taken(Body::Chunked, &input, piece),
                Ok((body.len(), true)),
                "{piece}"
            );
        }
        assert_eq!(
            taken(Body::Chunked, b"A\r\n0123456789\r\n0\r\n\r\nX", 4),
            Ok((20, true))
        );
        assert_eq!(
            taken(Body::Chunked, b"5\r\nhel", 64),
            Ok((6, false)),
            "a body cut short is not done"
        );
    }

    #[test]
    fn broken_chunks_are_refused() {
        for input in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloo\r\n",
            b"11111111111111111\r\n",
            b"0\r\nTrailer\n\r\n",
            b"5;ext\n",
            b"-5\r\n",
        ] {
            assert!(
                taken(Body::Chunked, input, 64).is_err(),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }
}
