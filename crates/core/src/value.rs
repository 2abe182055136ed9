//! Field values: JSON-like scalars and collections, bytes, blob references
//! and embedding vectors, with their canonical encoding.

use std::collections::BTreeMap;

use crate::codec::mp::{DecodeError, Reader, Writer};
use crate::limits::{
    MAX_COLLECTION_LEN, MAX_MIME_BYTES, MAX_STRING_BYTES, MAX_VALUE_DEPTH, MAX_VECTOR_DIMS,
};

/// Extension tags for the non-JSON value kinds.
const EXT_BLOB: i8 = 1;
const EXT_VECTOR_F32: i8 = 2;
const EXT_VECTOR_Q8: i8 = 3;

/// A reference to blob bytes that travel outside history.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BlobRef {
    /// BLAKE3-256 of the content.
    pub hash: [u8; 32],
    /// Length of the content in bytes.
    pub size: u64,
    /// Media type, e.g. `image/png`.
    pub mime: String,
}

/// An embedding vector. What is hashed is what is sent: the quantized form is
/// chosen at write time and replicas never re-quantize.
#[derive(Clone, Debug, PartialEq)]
pub enum Vector {
    /// Full-precision components.
    F32(Vec<f32>),
    /// 8-bit symmetric quantization: component `i` is `scale * q[i]`.
    Q8 {
        /// Step between quantization levels.
        scale: f32,
        /// Quantized components.
        q: Vec<i8>,
    },
}

impl Vector {
    /// Quantizes `v` to 8 bits with one scale for the whole vector (the
    /// largest magnitude maps to ±127). Non-finite components become 0.
    pub fn quantize(v: &[f32]) -> Vector {
        let max = v
            .iter()
            .filter(|x| x.is_finite())
            .fold(0f32, |m, x| m.max(x.abs()));
        let scale = if max == 0.0 { 1.0 } else { max / 127.0 };
        let q = v
            .iter()
            .map(|x| {
                if x.is_finite() {
                    (x / scale).round().clamp(-127.0, 127.0) as i8
                } else {
                    0
                }
            })
            .collect();
        Vector::Q8 { scale, q }
    }

    /// The components as `f32` (dequantized if needed).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Vector::F32(v) => v.clone(),
            Vector::Q8 { scale, q } => q.iter().map(|&x| x as f32 * scale).collect(),
        }
    }
}

/// A field value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// JSON `null`.
    Null,
    /// A boolean.
    Bool(bool),
    /// A signed integer.
    Int(i64),
    /// A finite float or ±infinity (NaN has no canonical form and is refused).
    Float(f64),
    /// A UTF-8 string.
    Str(String),
    /// Raw bytes.
    Bytes(Vec<u8>),
    /// An ordered list.
    Array(Vec<Value>),
    /// A map with string keys (kept sorted, which is the canonical order).
    Map(BTreeMap<String, Value>),
    /// A reference to a blob.
    Blob(BlobRef),
    /// An embedding vector.
    Vector(Vector),
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Str(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Str(s)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Value {
        Value::Int(i)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Bool(b)
    }
}

impl From<i32> for Value {
    fn from(i: i32) -> Value {
        Value::Int(i.into())
    }
}

impl From<u32> for Value {
    fn from(i: u32) -> Value {
        Value::Int(i.into())
    }
}

impl From<f64> for Value {
    fn from(f: f64) -> Value {
        Value::Float(f)
    }
}

impl From<Vec<u8>> for Value {
    fn from(b: Vec<u8>) -> Value {
        Value::Bytes(b)
    }
}

impl From<Vec<Value>> for Value {
    fn from(items: Vec<Value>) -> Value {
        Value::Array(items)
    }
}

impl From<BTreeMap<String, Value>> for Value {
    fn from(m: BTreeMap<String, Value>) -> Value {
        Value::Map(m)
    }
}

impl From<BlobRef> for Value {
    fn from(b: BlobRef) -> Value {
        Value::Blob(b)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    /// `None` is `Null`.
    fn from(v: Option<T>) -> Value {
        v.map_or(Value::Null, Into::into)
    }
}

/// JSON-like, for people: strings quoted, bytes, blobs and vectors in
/// short tagged forms (`bytes[3]`, `blob:1f2e3d4c…(12 B, image/png)`,
/// `vector[768]`).
impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x:?}"),
            Value::Str(s) => write!(f, "{s:?}"),
            Value::Bytes(b) => write!(f, "bytes[{}]", b.len()),
            Value::Array(items) => {
                f.write_str("[")?;
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str("]")
            }
            Value::Map(m) => {
                f.write_str("{")?;
                for (i, (k, v)) in m.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k:?}: {v}")?;
                }
                f.write_str("}")
            }
            Value::Blob(b) => write!(
                f,
                "blob:{}…({} B, {})",
                crate::ids::to_hex(&b.hash[..4]),
                b.size,
                b.mime
            ),
            Value::Vector(v) => write!(f, "vector[{}]", v.to_f32().len()),
        }
    }
}

/// Accessors: each gives the value if it is of that kind.
///
/// ```
/// use syncline_core::Value;
/// let v = Value::from("milk");
/// assert_eq!(v.as_str(), Some("milk"));
/// assert_eq!(v.as_i64(), None);
/// assert_eq!(Value::from(3).as_f64(), Some(3.0));
/// assert_eq!(Value::from(None::<bool>), Value::Null);
/// assert_eq!(Value::from(vec![Value::from(true)]).to_string(), "[true]");
/// ```
impl Value {
    /// Pushes the hash of every blob this value references (at any
    /// depth) onto `out`.
    pub fn blob_hashes(&self, out: &mut Vec<[u8; 32]>) {
        self.for_each_blob(&mut |b| out.push(b.hash));
    }

    /// Calls `f` with every blob reference in this value, at any depth.
    pub fn for_each_blob(&self, f: &mut impl FnMut(&BlobRef)) {
        match self {
            Value::Blob(b) => f(b),
            Value::Array(items) => items.iter().for_each(|i| i.for_each_blob(f)),
            Value::Map(m) => m.values().for_each(|i| i.for_each_blob(f)),
            _ => {}
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, if this is one.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The number as a float, if this is an integer or a float.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    /// The boolean, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The bytes, if this is bytes.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    /// The items, if this is an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(items) => Some(items),
            _ => None,
        }
    }

    /// The map, if this is one.
    pub fn as_map(&self) -> Option<&BTreeMap<String, Value>> {
        match self {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    /// The blob reference, if this is one.
    pub fn as_blob(&self) -> Option<&BlobRef> {
        match self {
            Value::Blob(b) => Some(b),
            _ => None,
        }
    }

    /// Whether this is `Null`.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// About how many bytes the value takes in memory, without allocating.
    pub fn approx_size(&self) -> usize {
        16 + match self {
            Value::Null | Value::Bool(_) | Value::Int(_) | Value::Float(_) => 0,
            Value::Str(s) => s.len(),
            Value::Bytes(b) => b.len(),
            Value::Array(items) => items.iter().map(Value::approx_size).sum(),
            Value::Map(m) => m.iter().map(|(k, v)| k.len() + v.approx_size()).sum(),
            Value::Blob(b) => 48 + b.mime.len(),
            Value::Vector(Vector::F32(v)) => v.len() * 4,
            Value::Vector(Vector::Q8 { q, .. }) => q.len(),
        }
    }

    /// Appends the canonical encoding.
    pub fn encode(&self, w: &mut Writer) {
        match self {
            Value::Null => w.nil(),
            Value::Bool(b) => w.bool(*b),
            Value::Int(i) => w.int(*i),
            Value::Float(f) => w.f64(*f),
            Value::Str(s) => w.str(s),
            Value::Bytes(b) => w.bin(b),
            Value::Array(items) => {
                w.array(items.len());
                for v in items {
                    v.encode(w);
                }
            }
            Value::Map(map) => {
                w.map(map.len());
                for (k, v) in map {
                    w.str(k);
                    v.encode(w);
                }
            }
            Value::Blob(b) => {
                let mut data = Vec::with_capacity(40 + b.mime.len());
                data.extend_from_slice(&b.hash);
                data.extend_from_slice(&b.size.to_be_bytes());
                data.extend_from_slice(b.mime.as_bytes());
                w.ext(EXT_BLOB, &data);
            }
            Value::Vector(Vector::F32(v)) => {
                let data: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                w.ext(EXT_VECTOR_F32, &data);
            }
            Value::Vector(Vector::Q8 { scale, q }) => {
                let mut data = Vec::with_capacity(4 + q.len());
                data.extend_from_slice(&scale.to_le_bytes());
                data.extend(q.iter().map(|&x| x as u8));
                w.ext(EXT_VECTOR_Q8, &data);
            }
        }
    }

    /// Reads one canonical value.
    pub fn decode(r: &mut Reader<'_>) -> Result<Value, DecodeError> {
        Self::decode_at_depth(r, 0)
    }

    /// Whether the value is within what [`Value::decode`] accepts (a value
    /// a transaction writes must read back wherever it goes), or the limit
    /// it breaks.
    pub fn check_limits(&self) -> Result<(), &'static str> {
        self.check_at_depth(0)
    }

    fn check_at_depth(&self, depth: usize) -> Result<(), &'static str> {
        if depth > MAX_VALUE_DEPTH {
            return Err("value nested too deeply");
        }
        match self {
            Value::Null | Value::Bool(_) | Value::Int(_) => Ok(()),
            Value::Float(f) if f.is_nan() => Err("NaN has no canonical form"),
            Value::Float(_) => Ok(()),
            Value::Str(s) if s.len() > MAX_STRING_BYTES => Err("string longer than 128 KiB"),
            Value::Bytes(b) if b.len() > MAX_STRING_BYTES => Err("bytes longer than 128 KiB"),
            Value::Str(_) | Value::Bytes(_) => Ok(()),
            Value::Array(items) => {
                if items.len() > MAX_COLLECTION_LEN {
                    return Err("array longer than the collection limit");
                }
                items.iter().try_for_each(|v| v.check_at_depth(depth + 1))
            }
            Value::Map(map) => {
                if map.len() > MAX_COLLECTION_LEN {
                    return Err("map larger than the collection limit");
                }
                map.iter().try_for_each(|(k, v)| {
                    if k.len() > MAX_STRING_BYTES {
                        return Err("map key longer than 128 KiB");
                    }
                    v.check_at_depth(depth + 1)
                })
            }
            Value::Blob(b) if b.mime.len() > MAX_MIME_BYTES => Err("blob MIME type too long"),
            Value::Blob(_) => Ok(()),
            Value::Vector(Vector::F32(v)) => {
                if v.len() > MAX_VECTOR_DIMS {
                    return Err("vector with too many dimensions");
                }
                if v.iter().any(|x| x.is_nan()) {
                    return Err("NaN in vector");
                }
                Ok(())
            }
            Value::Vector(Vector::Q8 { scale, q }) => {
                if q.len() > MAX_VECTOR_DIMS {
                    return Err("vector with too many dimensions");
                }
                if !scale.is_finite() {
                    return Err("non-finite q8 scale");
                }
                Ok(())
            }
        }
    }

    fn decode_at_depth(r: &mut Reader<'_>, depth: usize) -> Result<Value, DecodeError> {
        let at = r.position();
        if depth > MAX_VALUE_DEPTH {
            return Err(DecodeError::Invalid {
                at,
                what: "value nested too deeply",
            });
        }
        let m = r.peek()?;
        Ok(match m {
            0xc0 => {
                r.nil()?;
                Value::Null
            }
            0xc2 | 0xc3 => Value::Bool(r.bool()?),
            0x00..=0x7f | 0xcc..=0xcf | 0xd0..=0xd3 | 0xe0..=0xff => Value::Int(r.int()?),
            0xcb => Value::Float(r.f64()?),
            0xa0..=0xbf | 0xd9..=0xdb => Value::Str(r.str(MAX_STRING_BYTES)?.to_owned()),
            0xc4..=0xc6 => Value::Bytes(r.bin(MAX_STRING_BYTES)?.to_vec()),
            0x90..=0x9f | 0xdc | 0xdd => {
                let n = r.array(MAX_COLLECTION_LEN)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(Self::decode_at_depth(r, depth + 1)?);
                }
                Value::Array(items)
            }
            0x80..=0x8f | 0xde | 0xdf => {
                let n = r.map(MAX_COLLECTION_LEN)?;
                let mut map = BTreeMap::new();
                let mut last: Option<String> = None;
                for _ in 0..n {
                    let key_at = r.position();
                    let k = r.str(MAX_STRING_BYTES)?.to_owned();
                    if last.as_ref().is_some_and(|l| l >= &k) {
                        // Sorted, unique keys are the only canonical order.
                        return Err(DecodeError::NonCanonical(key_at));
                    }
                    let v = Self::decode_at_depth(r, depth + 1)?;
                    last = Some(k.clone());
                    map.insert(k, v);
                }
                Value::Map(map)
            }
            0xd4..=0xd8 | 0xc7..=0xc9 => Self::decode_ext(r)?,
            _ => {
                return Err(DecodeError::UnexpectedType {
                    at,
                    marker: m,
                    expected: "value",
                });
            }
        })
    }

    fn decode_ext(r: &mut Reader<'_>) -> Result<Value, DecodeError> {
        let at = r.position();
        let max = 4 + MAX_VECTOR_DIMS * 4;
        let (tag, data) = r.ext(max)?;
        let invalid = |what| DecodeError::Invalid { at, what };
        match tag {
            EXT_BLOB => {
                if data.len() < 40 || data.len() > 40 + MAX_MIME_BYTES {
                    return Err(invalid("blob reference of the wrong size"));
                }
                let mime = std::str::from_utf8(&data[40..])
                    .map_err(|_| DecodeError::InvalidUtf8(at))?
                    .to_owned();
                Ok(Value::Blob(BlobRef {
                    hash: data[..32].try_into().expect("checked length"),
                    size: u64::from_be_bytes(data[32..40].try_into().expect("checked length")),
                    mime,
                }))
            }
            EXT_VECTOR_F32 => {
                if data.len() % 4 != 0 || data.len() / 4 > MAX_VECTOR_DIMS {
                    return Err(invalid("f32 vector of the wrong size"));
                }
                let v: Vec<f32> = data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("chunk of 4")))
                    .collect();
                if v.iter().any(|x| x.is_nan()) {
                    return Err(invalid("NaN in vector"));
                }
                Ok(Value::Vector(Vector::F32(v)))
            }
            EXT_VECTOR_Q8 => {
                if data.len() < 4 || data.len() - 4 > MAX_VECTOR_DIMS {
                    return Err(invalid("q8 vector of the wrong size"));
                }
                let scale = f32::from_le_bytes(data[..4].try_into().expect("checked length"));
                if !scale.is_finite() {
                    return Err(invalid("non-finite q8 scale"));
                }
                let q = data[4..].iter().map(|&x| x as i8).collect();
                Ok(Value::Vector(Vector::Q8 { scale, q }))
            }
            _ => Err(invalid("unknown extension type")),
        }
    }

    /// The canonical bytes of this value.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::new();
        self.encode(&mut w);
        w.into_bytes()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Arbitrary values, for codec and document tests.
    pub(crate) fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            any::<f64>()
                .prop_filter("NaN", |f| !f.is_nan())
                .prop_map(Value::Float),
            ".{0,20}".prop_map(Value::Str),
            proptest::collection::vec(any::<u8>(), 0..20).prop_map(Value::Bytes),
            (any::<[u8; 32]>(), any::<u64>(), "[a-z]{1,10}/[a-z]{1,10}")
                .prop_map(|(hash, size, mime)| Value::Blob(BlobRef { hash, size, mime })),
            proptest::collection::vec(-1e6f32..1e6, 0..16)
                .prop_map(|v| Value::Vector(Vector::F32(v))),
            proptest::collection::vec(-1e6f32..1e6, 0..16)
                .prop_map(|v| Value::Vector(Vector::quantize(&v))),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(".{0,8}", inner, 0..6).prop_map(Value::Map),
            ]
        })
    }

    proptest! {
        #[test]
        fn values_roundtrip_canonically(v in arb_value()) {
            let bytes = v.to_bytes();
            let mut r = Reader::new(&bytes);
            let back = Value::decode(&mut r).unwrap();
            r.finish().unwrap();
            prop_assert_eq!(back.to_bytes(), bytes);
        }
    }

    #[test]
    fn unsorted_map_keys_are_refused() {
        let mut w = Writer::new();
        w.map(2);
        w.str("b");
        w.nil();
        w.str("a");
        w.nil();
        assert!(matches!(
            Value::decode(&mut Reader::new(w.as_bytes())),
            Err(DecodeError::NonCanonical(_))
        ));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let bytes = vec![0x91; MAX_VALUE_DEPTH + 2];
        assert!(matches!(
            Value::decode(&mut Reader::new(&bytes)),
            Err(DecodeError::Invalid { .. }) | Err(DecodeError::Truncated(_))
        ));
        let mut nested = vec![0x91; MAX_VALUE_DEPTH + 2];
        nested.push(0xc0);
        assert!(matches!(
            Value::decode(&mut Reader::new(&nested)),
            Err(DecodeError::Invalid { .. })
        ));
    }

    #[test]
    fn quantization_keeps_the_shape() {
        let v = [0.5f32, -1.0, 0.25, 0.0];
        let q = Vector::quantize(&v);
        for (a, b) in v.iter().zip(q.to_f32()) {
            assert!((a - b).abs() < 0.01, "{a} vs {b}");
        }
    }
}
