//! LEB128 varints and zigzag, for the columnar streams of compact packs.

use super::mp::DecodeError;

/// Appends `v` as an unsigned LEB128 varint.
pub fn put(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends `v` zigzag-encoded, so small negative deltas stay small.
pub fn put_signed(out: &mut Vec<u8>, v: i64) {
    put(out, ((v << 1) ^ (v >> 63)) as u64);
}

/// A cursor over one stream of varints and raw bytes.
#[derive(Debug, Clone)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Fails unless the stream was consumed exactly.
    pub fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }

    /// One unsigned varint (at most 10 bytes, no overflow).
    pub fn get(&mut self) -> Result<u64, DecodeError> {
        let start = self.pos;
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self
                .buf
                .get(self.pos)
                .ok_or(DecodeError::Truncated(self.pos))?;
            self.pos += 1;
            let chunk = (b & 0x7f) as u64;
            if shift == 63 && chunk > 1 {
                break;
            }
            v |= chunk << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::Invalid {
            at: start,
            what: "varint overflows u64",
        })
    }

    /// One varint that must fit `u32`.
    pub fn get_u32(&mut self) -> Result<u32, DecodeError> {
        let at = self.pos;
        u32::try_from(self.get()?).map_err(|_| DecodeError::Invalid {
            at,
            what: "varint exceeds u32",
        })
    }

    /// A count of items that each take at least `unit` bytes in `budget`
    /// bytes; refused if it could not fit (so nothing is sized from a lie).
    pub fn get_count(&mut self, unit: usize, budget: usize) -> Result<usize, DecodeError> {
        let at = self.pos;
        let n = self.get()?;
        if n.saturating_mul(unit as u64) > budget as u64 {
            return Err(DecodeError::LengthOverrun {
                at,
                claimed: n,
                remaining: budget,
            });
        }
        Ok(n as usize)
    }

    /// One zigzag varint.
    pub fn get_signed(&mut self) -> Result<i64, DecodeError> {
        let v = self.get()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    /// `n` raw bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::LengthOverrun {
                at: self.pos,
                claimed: n as u64,
                remaining: self.remaining(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// Exactly `N` raw bytes.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        Ok(self.bytes(N)?.try_into().expect("took N bytes"))
    }

    /// The unread rest.
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    /// Skips `n` bytes already consumed by another reader of `rest()`.
    pub fn advance(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn roundtrip(a: u64, b: i64) {
            let mut out = Vec::new();
            put(&mut out, a);
            put_signed(&mut out, b);
            let mut c = Cursor::new(&out);
            prop_assert_eq!(c.get().unwrap(), a);
            prop_assert_eq!(c.get_signed().unwrap(), b);
            c.finish().unwrap();
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..24)) {
            let mut c = Cursor::new(&bytes);
            while c.get().is_ok() {}
        }
    }

    #[test]
    fn overlong_varints_are_refused() {
        let bytes = [0xff; 11];
        assert!(Cursor::new(&bytes).get().is_err());
        let mut max = Vec::new();
        put(&mut max, u64::MAX);
        assert_eq!(Cursor::new(&max).get().unwrap(), u64::MAX);
    }
}
