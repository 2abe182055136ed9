//! A strict, canonical subset of MessagePack.
//!
//! Node ids are hashes of encoded bytes, so the encoding must be a bijection:
//! one value has exactly one encoding, and the reader rejects every other
//! spelling (a wider integer than needed, a `str 8` header for a 3-byte
//! string, a map with unsorted keys, trailing bytes). General-purpose
//! MessagePack libraries accept all of those, which is why this small codec
//! is written here rather than borrowed.
//!
//! The reader never allocates on the strength of a length prefix alone: every
//! prefix is checked against the bytes that remain first.

use thiserror::Error;

/// Why bytes were refused by the strict reader.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The input ended inside a value.
    #[error("input truncated at byte {0}")]
    Truncated(usize),
    /// A length prefix claims more bytes than remain.
    #[error("length prefix {claimed} at byte {at} exceeds the {remaining} bytes that remain")]
    LengthOverrun {
        /// Offset of the prefix.
        at: usize,
        /// The declared length.
        claimed: u64,
        /// Bytes left in the input.
        remaining: usize,
    },
    /// A valid MessagePack form that is not the canonical one.
    #[error("non-canonical encoding at byte {0}")]
    NonCanonical(usize),
    /// A type marker other than the one expected here.
    #[error("unexpected type marker {marker:#04x} at byte {at}, expected {expected}")]
    UnexpectedType {
        /// Offset of the marker.
        at: usize,
        /// The marker byte found.
        marker: u8,
        /// What the grammar wanted.
        expected: &'static str,
    },
    /// Bytes left over after the value.
    #[error("{0} trailing bytes after the value")]
    TrailingBytes(usize),
    /// A string that is not UTF-8.
    #[error("invalid UTF-8 in string at byte {0}")]
    InvalidUtf8(usize),
    /// A value outside what the field allows (an unknown tag, NaN, a limit).
    #[error("invalid value at byte {at}: {what}")]
    Invalid {
        /// Offset of the value.
        at: usize,
        /// What rule it broke.
        what: &'static str,
    },
}

/// Appends canonical MessagePack to a byte vector.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// A writer that appends to `buf`.
    pub fn with_buffer(buf: Vec<u8>) -> Self {
        Self { buf }
    }

    /// The bytes written so far.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// Borrow the bytes written so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// `nil`.
    pub fn nil(&mut self) {
        self.buf.push(0xc0);
    }

    /// `true` / `false`.
    pub fn bool(&mut self, v: bool) {
        self.buf.push(if v { 0xc3 } else { 0xc2 });
    }

    /// An unsigned integer in its smallest form.
    pub fn uint(&mut self, v: u64) {
        match v {
            0..=0x7f => self.buf.push(v as u8),
            0x80..=0xff => self.buf.extend_from_slice(&[0xcc, v as u8]),
            0x100..=0xffff => {
                self.buf.push(0xcd);
                self.buf.extend_from_slice(&(v as u16).to_be_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                self.buf.push(0xce);
                self.buf.extend_from_slice(&(v as u32).to_be_bytes());
            }
            _ => {
                self.buf.push(0xcf);
                self.buf.extend_from_slice(&v.to_be_bytes());
            }
        }
    }

    /// A signed integer: non-negative values use the unsigned forms, negative
    /// ones the smallest signed form.
    pub fn int(&mut self, v: i64) {
        if v >= 0 {
            return self.uint(v as u64);
        }
        if v >= -32 {
            self.buf.push(v as i8 as u8);
        } else if v >= i8::MIN as i64 {
            self.buf.extend_from_slice(&[0xd0, v as i8 as u8]);
        } else if v >= i16::MIN as i64 {
            self.buf.push(0xd1);
            self.buf.extend_from_slice(&(v as i16).to_be_bytes());
        } else if v >= i32::MIN as i64 {
            self.buf.push(0xd2);
            self.buf.extend_from_slice(&(v as i32).to_be_bytes());
        } else {
            self.buf.push(0xd3);
            self.buf.extend_from_slice(&v.to_be_bytes());
        }
    }

    /// A 64-bit float (always `float 64`, so that one value has one form).
    pub fn f64(&mut self, v: f64) {
        self.buf.push(0xcb);
        self.buf.extend_from_slice(&v.to_bits().to_be_bytes());
    }

    /// A UTF-8 string.
    pub fn str(&mut self, s: &str) {
        let n = s.len();
        match n {
            0..=31 => self.buf.push(0xa0 | n as u8),
            32..=0xff => self.buf.extend_from_slice(&[0xd9, n as u8]),
            0x100..=0xffff => {
                self.buf.push(0xda);
                self.buf.extend_from_slice(&(n as u16).to_be_bytes());
            }
            _ => {
                self.buf.push(0xdb);
                self.buf.extend_from_slice(&(n as u32).to_be_bytes());
            }
        }
        self.buf.extend_from_slice(s.as_bytes());
    }

    /// A byte string.
    pub fn bin(&mut self, b: &[u8]) {
        let n = b.len();
        match n {
            0..=0xff => self.buf.extend_from_slice(&[0xc4, n as u8]),
            0x100..=0xffff => {
                self.buf.push(0xc5);
                self.buf.extend_from_slice(&(n as u16).to_be_bytes());
            }
            _ => {
                self.buf.push(0xc6);
                self.buf.extend_from_slice(&(n as u32).to_be_bytes());
            }
        }
        self.buf.extend_from_slice(b);
    }

    /// An array header for `n` elements.
    pub fn array(&mut self, n: usize) {
        self.collection(n, 0x90, 0xdc);
    }

    /// A map header for `n` pairs (keys must then be written in strictly
    /// ascending byte order; the reader checks this).
    pub fn map(&mut self, n: usize) {
        self.collection(n, 0x80, 0xde);
    }

    fn collection(&mut self, n: usize, fix: u8, wide16: u8) {
        match n {
            0..=15 => self.buf.push(fix | n as u8),
            16..=0xffff => {
                self.buf.push(wide16);
                self.buf.extend_from_slice(&(n as u16).to_be_bytes());
            }
            _ => {
                self.buf.push(wide16 + 1);
                self.buf.extend_from_slice(&(n as u32).to_be_bytes());
            }
        }
    }

    /// An extension value of type `tag` with `data` as payload.
    pub fn ext(&mut self, tag: i8, data: &[u8]) {
        let n = data.len();
        match n {
            1 => self.buf.push(0xd4),
            2 => self.buf.push(0xd5),
            4 => self.buf.push(0xd6),
            8 => self.buf.push(0xd7),
            16 => self.buf.push(0xd8),
            0..=0xff => self.buf.extend_from_slice(&[0xc7, n as u8]),
            0x100..=0xffff => {
                self.buf.push(0xc8);
                self.buf.extend_from_slice(&(n as u16).to_be_bytes());
            }
            _ => {
                self.buf.push(0xc9);
                self.buf.extend_from_slice(&(n as u32).to_be_bytes());
            }
        }
        self.buf.push(tag as u8);
        self.buf.extend_from_slice(data);
    }
}

/// Reads canonical MessagePack from a byte slice, refusing anything else.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Current offset.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Fails unless every byte was consumed.
    pub fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }

    /// The next marker byte, without consuming it.
    pub fn peek(&self) -> Result<u8, DecodeError> {
        self.buf
            .get(self.pos)
            .copied()
            .ok_or(DecodeError::Truncated(self.pos))
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        let b = self.peek()?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::Truncated(self.buf.len()));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn be(&mut self, n: usize) -> Result<u64, DecodeError> {
        let s = self.take(n)?;
        Ok(s.iter().fold(0u64, |acc, &b| (acc << 8) | b as u64))
    }

    fn unexpected(&self, at: usize, marker: u8, expected: &'static str) -> DecodeError {
        DecodeError::UnexpectedType {
            at,
            marker,
            expected,
        }
    }

    /// `nil`.
    pub fn nil(&mut self) -> Result<(), DecodeError> {
        let at = self.pos;
        match self.byte()? {
            0xc0 => Ok(()),
            m => Err(self.unexpected(at, m, "nil")),
        }
    }

    /// A boolean.
    pub fn bool(&mut self) -> Result<bool, DecodeError> {
        let at = self.pos;
        match self.byte()? {
            0xc2 => Ok(false),
            0xc3 => Ok(true),
            m => Err(self.unexpected(at, m, "bool")),
        }
    }

    /// An unsigned integer in its smallest form.
    pub fn uint(&mut self) -> Result<u64, DecodeError> {
        let at = self.pos;
        let m = self.byte()?;
        let (v, min) = match m {
            0x00..=0x7f => return Ok(m as u64),
            0xcc => (self.be(1)?, 0x80),
            0xcd => (self.be(2)?, 0x100),
            0xce => (self.be(4)?, 0x1_0000),
            0xcf => (self.be(8)?, 0x1_0000_0000),
            _ => return Err(self.unexpected(at, m, "unsigned integer")),
        };
        if v < min {
            return Err(DecodeError::NonCanonical(at));
        }
        Ok(v)
    }

    /// An unsigned integer that must fit `u32`.
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        let at = self.pos;
        u32::try_from(self.uint()?).map_err(|_| DecodeError::Invalid {
            at,
            what: "integer exceeds u32",
        })
    }

    /// A signed integer in its smallest form (non-negative values must use
    /// the unsigned forms).
    pub fn int(&mut self) -> Result<i64, DecodeError> {
        let at = self.pos;
        let m = self.peek()?;
        if m <= 0x7f || (0xcc..=0xcf).contains(&m) {
            let v = self.uint()?;
            return i64::try_from(v).map_err(|_| DecodeError::Invalid {
                at,
                what: "integer exceeds i64",
            });
        }
        self.pos += 1;
        let v = match m {
            0xe0..=0xff => return Ok(m as i8 as i64),
            0xd0 => self.be(1)? as u8 as i8 as i64,
            0xd1 => self.be(2)? as u16 as i16 as i64,
            0xd2 => self.be(4)? as u32 as i32 as i64,
            0xd3 => self.be(8)? as i64,
            _ => return Err(self.unexpected(at, m, "integer")),
        };
        let canonical = match m {
            0xd0 => v < -32,
            0xd1 => v < i8::MIN as i64,
            0xd2 => v < i16::MIN as i64,
            _ => v < i32::MIN as i64,
        };
        if !canonical {
            return Err(DecodeError::NonCanonical(at));
        }
        Ok(v)
    }

    /// A 64-bit float; NaN is refused because its many bit patterns would
    /// give one value several encodings.
    pub fn f64(&mut self) -> Result<f64, DecodeError> {
        let at = self.pos;
        match self.byte()? {
            0xcb => {
                let v = f64::from_bits(self.be(8)?);
                if v.is_nan() {
                    return Err(DecodeError::Invalid { at, what: "NaN" });
                }
                Ok(v)
            }
            m => Err(self.unexpected(at, m, "float 64")),
        }
    }

    fn checked_len(&self, at: usize, n: u64, unit: usize) -> Result<usize, DecodeError> {
        let remaining = self.remaining();
        if n.saturating_mul(unit as u64) > remaining as u64 {
            return Err(DecodeError::LengthOverrun {
                at,
                claimed: n,
                remaining,
            });
        }
        Ok(n as usize)
    }

    /// A UTF-8 string of at most `max` bytes.
    pub fn str(&mut self, max: usize) -> Result<&'a str, DecodeError> {
        let at = self.pos;
        let m = self.byte()?;
        let (n, min) = match m {
            0xa0..=0xbf => ((m & 0x1f) as u64, 0),
            0xd9 => (self.be(1)?, 32),
            0xda => (self.be(2)?, 0x100),
            0xdb => (self.be(4)?, 0x1_0000),
            _ => return Err(self.unexpected(at, m, "string")),
        };
        if n < min {
            return Err(DecodeError::NonCanonical(at));
        }
        let n = self.checked_len(at, n, 1)?;
        if n > max {
            return Err(DecodeError::Invalid {
                at,
                what: "string longer than its limit",
            });
        }
        let bytes = self.take(n)?;
        std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8(at))
    }

    /// A byte string of at most `max` bytes.
    pub fn bin(&mut self, max: usize) -> Result<&'a [u8], DecodeError> {
        let at = self.pos;
        let m = self.byte()?;
        let (n, min) = match m {
            0xc4 => (self.be(1)?, 0),
            0xc5 => (self.be(2)?, 0x100),
            0xc6 => (self.be(4)?, 0x1_0000),
            _ => return Err(self.unexpected(at, m, "bytes")),
        };
        if n < min {
            return Err(DecodeError::NonCanonical(at));
        }
        let n = self.checked_len(at, n, 1)?;
        if n > max {
            return Err(DecodeError::Invalid {
                at,
                what: "bytes longer than their limit",
            });
        }
        self.take(n)
    }

    /// Exactly `N` bytes as a byte string.
    pub fn bin_array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let at = self.pos;
        let b = self.bin(N)?;
        b.try_into().map_err(|_| DecodeError::Invalid {
            at,
            what: "fixed-size bytes of the wrong length",
        })
    }

    /// An array header. Each element takes at least one byte, so a count
    /// larger than the remaining input is refused before anything is sized
    /// from it; `max` is the caller's own limit.
    pub fn array(&mut self, max: usize) -> Result<usize, DecodeError> {
        self.collection(max, 0x90, 0xdc, 1, "array")
    }

    /// A map header (each pair takes at least two bytes).
    pub fn map(&mut self, max: usize) -> Result<usize, DecodeError> {
        self.collection(max, 0x80, 0xde, 2, "map")
    }

    fn collection(
        &mut self,
        max: usize,
        fix: u8,
        wide16: u8,
        unit: usize,
        expected: &'static str,
    ) -> Result<usize, DecodeError> {
        let at = self.pos;
        let m = self.byte()?;
        let (n, min) = if m & 0xf0 == fix {
            ((m & 0x0f) as u64, 0)
        } else if m == wide16 {
            (self.be(2)?, 16)
        } else if m == wide16 + 1 {
            (self.be(4)?, 0x1_0000)
        } else {
            return Err(self.unexpected(at, m, expected));
        };
        if n < min {
            return Err(DecodeError::NonCanonical(at));
        }
        let n = self.checked_len(at, n, unit)?;
        if n > max {
            return Err(DecodeError::Invalid {
                at,
                what: "collection longer than its limit",
            });
        }
        Ok(n)
    }

    /// An array header that must announce exactly `n` elements.
    pub fn array_exact(&mut self, n: usize) -> Result<(), DecodeError> {
        let at = self.pos;
        if self.array(n)? != n {
            return Err(DecodeError::Invalid {
                at,
                what: "array of the wrong arity",
            });
        }
        Ok(())
    }

    /// Skips one value of any type (for fields a newer peer added), nested at
    /// most `max_depth` deep.
    pub fn skip_value(&mut self, max_depth: usize) -> Result<(), DecodeError> {
        let at = self.pos;
        let m = self.peek()?;
        match m {
            0xc0 => self.nil(),
            0xc2 | 0xc3 => self.bool().map(drop),
            0x00..=0x7f | 0xcc..=0xcf => self.uint().map(drop),
            0xd0..=0xd3 | 0xe0..=0xff => self.int().map(drop),
            0xca => {
                self.pos += 1;
                self.take(4).map(drop)
            }
            0xcb => {
                self.pos += 1;
                self.take(8).map(drop)
            }
            0xa0..=0xbf | 0xd9..=0xdb => self.str(usize::MAX).map(drop),
            0xc4..=0xc6 => self.bin(usize::MAX).map(drop),
            0xd4..=0xd8 | 0xc7..=0xc9 => self.ext(usize::MAX).map(drop),
            0x90..=0x9f | 0xdc | 0xdd | 0x80..=0x8f | 0xde | 0xdf => {
                if max_depth == 0 {
                    return Err(DecodeError::Invalid {
                        at,
                        what: "value nested too deeply",
                    });
                }
                let is_map = matches!(m, 0x80..=0x8f | 0xde | 0xdf);
                let n = if is_map {
                    self.map(usize::MAX)? * 2
                } else {
                    self.array(usize::MAX)?
                };
                for _ in 0..n {
                    self.skip_value(max_depth - 1)?;
                }
                Ok(())
            }
            _ => Err(self.unexpected(at, m, "value")),
        }
    }

    /// An extension value: (tag, payload) of at most `max` bytes.
    pub fn ext(&mut self, max: usize) -> Result<(i8, &'a [u8]), DecodeError> {
        let at = self.pos;
        let m = self.byte()?;
        let (n, min) = match m {
            0xd4 => (1, 1),
            0xd5 => (2, 2),
            0xd6 => (4, 4),
            0xd7 => (8, 8),
            0xd8 => (16, 16),
            0xc7 => (self.be(1)?, 0),
            0xc8 => (self.be(2)?, 0x100),
            0xc9 => (self.be(4)?, 0x1_0000),
            _ => return Err(self.unexpected(at, m, "extension")),
        };
        // Sizes with a fixext form must use it.
        if n < min || ((0xc7..=0xc9).contains(&m) && matches!(n, 1 | 2 | 4 | 8 | 16)) {
            return Err(DecodeError::NonCanonical(at));
        }
        let tag = self.byte()? as i8;
        let n = self.checked_len(at, n, 1)?;
        if n > max {
            return Err(DecodeError::Invalid {
                at,
                what: "extension longer than its limit",
            });
        }
        Ok((tag, self.take(n)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn uint_roundtrips_and_is_minimal(v: u64) {
            let mut w = Writer::new();
            w.uint(v);
            let bytes = w.into_bytes();
            let mut r = Reader::new(&bytes);
            prop_assert_eq!(r.uint().unwrap(), v);
            r.finish().unwrap();
        }

        #[test]
        fn int_roundtrips(v: i64) {
            let mut w = Writer::new();
            w.int(v);
            let bytes = w.into_bytes();
            let mut r = Reader::new(&bytes);
            prop_assert_eq!(r.int().unwrap(), v);
            r.finish().unwrap();
        }

        #[test]
        fn str_roundtrips(s in ".{0,300}") {
            let mut w = Writer::new();
            w.str(&s);
            let bytes = w.into_bytes();
            let mut r = Reader::new(&bytes);
            prop_assert_eq!(r.str(usize::MAX).unwrap(), s.as_str());
        }

        #[test]
        fn ext_roundtrips(tag: i8, data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut w = Writer::new();
            w.ext(tag, &data);
            let bytes = w.into_bytes();
            let mut r = Reader::new(&bytes);
            let (t, d) = r.ext(usize::MAX).unwrap();
            prop_assert_eq!(t, tag);
            prop_assert_eq!(d, data.as_slice());
        }

        #[test]
        fn reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut r = Reader::new(&bytes);
            let _ = r.clone().int();
            let _ = r.clone().str(1 << 20);
            let _ = r.clone().bin(1 << 20);
            let _ = r.clone().ext(1 << 20);
            let _ = r.clone().f64();
            let _ = r.array(usize::MAX);
        }
    }

    #[test]
    fn skip_value_skips_exactly_one_value() {
        let mut w = Writer::new();
        w.map(2);
        w.str("a");
        w.array(3);
        w.uint(1);
        w.str("x");
        w.bin(&[1, 2]);
        w.str("b");
        w.f64(1.5);
        w.uint(7);
        let bytes = w.into_bytes();
        let mut r = Reader::new(&bytes);
        r.skip_value(4).unwrap();
        assert_eq!(r.uint().unwrap(), 7);
        r.finish().unwrap();
        let deep = [0x91; 8];
        assert!(Reader::new(&deep).skip_value(3).is_err());
    }

    #[test]
    fn wide_forms_of_small_values_are_refused() {
        assert_eq!(
            Reader::new(&[0xcc, 0x05]).uint(),
            Err(DecodeError::NonCanonical(0))
        );
        assert_eq!(
            Reader::new(&[0xd0, 0x05]).int(),
            Err(DecodeError::NonCanonical(0))
        );
        assert_eq!(
            Reader::new(&[0xd0, 0xff]).int(),
            Err(DecodeError::NonCanonical(0))
        );
        assert_eq!(
            Reader::new(&[0xd9, 0x01, b'a']).str(9),
            Err(DecodeError::NonCanonical(0))
        );
        assert_eq!(
            Reader::new(&[0xdc, 0x00, 0x01, 0xc0]).array(9),
            Err(DecodeError::NonCanonical(0))
        );
        assert_eq!(
            Reader::new(&[0xc7, 0x01, 0x05, 0x00]).ext(9),
            Err(DecodeError::NonCanonical(0))
        );
    }

    #[test]
    fn huge_length_prefixes_are_refused_before_allocation() {
        let claim = [0xdd, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            Reader::new(&claim).array(usize::MAX),
            Err(DecodeError::LengthOverrun {
                claimed: 0xffff_ffff,
                ..
            })
        ));
        let claim = [0xc6, 0x7f, 0xff, 0xff, 0xff, 0x00];
        assert!(matches!(
            Reader::new(&claim).bin(usize::MAX),
            Err(DecodeError::LengthOverrun { .. })
        ));
    }

    #[test]
    fn nan_and_trailing_bytes_are_refused() {
        let mut w = Writer::new();
        w.f64(f64::NAN);
        assert!(matches!(
            Reader::new(w.as_bytes()).f64(),
            Err(DecodeError::Invalid { .. })
        ));
        let r = Reader::new(&[0x01, 0x02]);
        let mut r2 = r.clone();
        r2.uint().unwrap();
        assert_eq!(r2.finish(), Err(DecodeError::TrailingBytes(1)));
    }
}
