//! Values as JSON for the command line: JSON in (`set`) and out (`get`,
//! `export`, `--json`). Kinds JSON lacks are tagged objects: bytes as
//! `{"$bytes": "hex"}`, blob references as `{"$blob": "hex", "size": n,
//! "mime": "..."}`, vectors as `{"$vector": [..]}`.

use serde_json::{Map, Number, Value as Json, json};
use syncline::Value;
use syncline_core::doc::{Conflict, FieldWrite};
use syncline_core::ids::{from_hex, to_hex};
use syncline_core::{BlobRef, Vector};

/// A JSON document as a value.
pub(crate) fn from_json(j: &Json) -> Result<Value, String> {
    Ok(match j {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64().ok_or("number out of range")?),
        },
        Json::String(s) => Value::Str(s.clone()),
        Json::Array(items) => Value::Array(items.iter().map(from_json).collect::<Result<_, _>>()?),
        Json::Object(map) => {
            if let Some(Json::String(hex)) = map.get("$bytes") {
                let bytes = (0..hex.len())
                    .step_by(2)
                    .map(|i| {
                        hex.get(i..i + 2)
                            .and_then(|h| u8::from_str_radix(h, 16).ok())
                    })
                    .collect::<Option<Vec<u8>>>()
                    .ok_or("$bytes must be hex")?;
                return Ok(Value::Bytes(bytes));
            }
            if let Some(Json::String(hash)) = map.get("$blob") {
                let hash = from_hex::<32>(hash).ok_or("$blob must be 64 hex digits")?;
                let size = map
                    .get("size")
                    .and_then(Json::as_u64)
                    .ok_or("$blob needs size")?;
                let mime = map
                    .get("mime")
                    .and_then(Json::as_str)
                    .unwrap_or("application/octet-stream");
                return Ok(Value::Blob(BlobRef {
                    hash,
                    size,
                    mime: mime.to_owned(),
                }));
            }
            if let Some(Json::Array(xs)) = map.get("$vector") {
                let v = xs
                    .iter()
                    .map(|x| x.as_f64().map(|f| f as f32))
                    .collect::<Option<Vec<f32>>>()
                    .ok_or("$vector must be numbers")?;
                return Ok(Value::Vector(Vector::F32(v)));
            }
            Value::Map(
                map.iter()
                    .map(|(k, v)| Ok((k.clone(), from_json(v)?)))
                    .collect::<Result<_, String>>()?,
            )
        }
    })
}

/// A value as JSON.
pub(crate) fn to_json(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => Json::Number((*i).into()),
        Value::Float(f) => {
            Number::from_f64(*f).map_or_else(|| Json::String(f.to_string()), Json::Number)
        }
        Value::Str(s) => Json::String(s.clone()),
        Value::Bytes(b) => json!({ "$bytes": to_hex(b) }),
        Value::Array(items) => Json::Array(items.iter().map(to_json).collect()),
        Value::Map(m) => Json::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), to_json(v)))
                .collect::<Map<_, _>>(),
        ),
        Value::Blob(b) => json!({ "$blob": to_hex(&b.hash), "size": b.size, "mime": b.mime }),
        Value::Vector(v) => json!({ "$vector": v.to_f32() }),
    }
}

fn write_json(w: &FieldWrite) -> Json {
    json!({
        "value": w.value.as_ref().map(to_json),
        "author": w.author.to_string(),
        "node": w.node.to_string(),
        "wall_ms": w.hlc.wall_ms,
    })
}

/// A conflict as JSON.
pub(crate) fn conflict_json(c: &Conflict) -> Json {
    match c {
        Conflict::Field {
            path,
            field,
            winner,
            losers,
        } => json!({
            "kind": "field", "path": path, "field": field,
            "winner": write_json(winner),
            "losers": losers.iter().map(write_json).collect::<Vec<_>>(),
        }),
        Conflict::Name {
            path,
            winner,
            others,
        } => json!({
            "kind": "name", "path": path, "winner": winner.to_string(),
            "others": others.iter().map(ToString::to_string).collect::<Vec<_>>(),
        }),
        Conflict::Delete {
            entry,
            deleted_by,
            edits,
        } => json!({
            "kind": "delete", "entry": entry.to_string(), "deleted_by": deleted_by.to_string(),
            "edits": edits.iter().map(ToString::to_string).collect::<Vec<_>>(),
        }),
        Conflict::Move {
            path,
            entry,
            losers,
        } => json!({
            "kind": "move", "path": path, "entry": entry.to_string(),
            "losers": losers.iter().map(ToString::to_string).collect::<Vec<_>>(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_through_values() {
        for text in [
            r#"{"a":[1,2.5,"x",null,true],"b":{"$bytes":"00ff"}}"#,
            r#"{"$vector":[0.5,-1.0]}"#,
            r#"-7"#,
        ] {
            let j: Json = serde_json::from_str(text).unwrap();
            assert_eq!(to_json(&from_json(&j).unwrap()), j, "{text}");
        }
        assert!(from_json(&json!({"$bytes": "zz"})).is_err());
    }
}
