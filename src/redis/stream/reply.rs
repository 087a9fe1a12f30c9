//! The replies the source reads, taken apart by hand: fields stay bytes (a field name need not
//! be UTF-8 either), and nothing is copied twice.

use std::sync::Arc;

use ::redis::{ErrorKind, RedisError, Value};

use super::message::Fields;

/// An entry as Redis returned it, before it becomes a [`Message`](super::Message).
#[derive(Debug)]
pub(super) struct RawEntry {
    pub(super) id: Arc<str>,
    pub(super) fields: Fields,
    pub(super) deliveries: u32,
}

/// What one claim (the claim script) returned.
#[derive(Debug)]
pub(super) struct Claimed {
    /// Where the next claim starts; `0-0` once the whole pending list has been scanned.
    pub(super) cursor: String,
    pub(super) entries: Vec<RawEntry>,
    /// Ids moved to the dead-letter stream.
    pub(super) dead: Vec<String>,
}

fn malformed(what: &'static str) -> RedisError {
    RedisError::from((ErrorKind::Parse, "unexpected reply", what.to_owned()))
}

fn bytes(v: Value) -> Result<Vec<u8>, RedisError> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        Value::Int(i) => Ok(i.to_string().into_bytes()),
        _ => Err(malformed("a string")),
    }
}

fn string(v: Value) -> Result<String, RedisError> {
    String::from_utf8(bytes(v)?).map_err(|_| malformed("an entry id in ASCII"))
}

fn array(v: Value) -> Result<Vec<Value>, RedisError> {
    match v {
        Value::Array(a) | Value::Set(a) => Ok(a),
        Value::Nil => Ok(Vec::new()),
        _ => Err(malformed("an array")),
    }
}

fn fields(v: Value) -> Result<Fields, RedisError> {
    let flat = match v {
        Value::Map(pairs) => {
            return pairs
                .into_iter()
                .map(|(f, v)| Ok((bytes(f)?, bytes(v)?)))
                .collect();
        }
        v => array(v)?,
    };
    if flat.len() % 2 != 0 {
        return Err(malformed("field-value pairs"));
    }
    let mut out = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(f), Some(v)) = (it.next(), it.next()) {
        out.push((bytes(f)?, bytes(v)?));
    }
    Ok(out)
}

/// `[id, [field, value, ...]]`, delivered `deliveries` times; `None` for an entry deleted
/// from the stream (its fields nil).
fn entry(v: Value, deliveries: u32) -> Result<Option<RawEntry>, RedisError> {
    let mut parts = array(v)?.into_iter();
    let (Some(id), Some(f)) = (parts.next(), parts.next()) else {
        return Err(malformed("an entry [id, fields]"));
    };
    if f == Value::Nil {
        return Ok(None);
    }
    Ok(Some(RawEntry {
        id: string(id)?.into(),
        fields: fields(f)?,
        deliveries,
    }))
}

/// The entries of an `XREADGROUP` of one stream: nil (none before the block ran out), or
/// `[[key, [entry, ...]]]` (a map of key to entries in RESP3).
pub(super) fn read(v: Value) -> Result<Vec<RawEntry>, RedisError> {
    let entries = match v {
        Value::Nil => return Ok(Vec::new()),
        Value::Map(streams) => match streams.into_iter().next() {
            Some((_, entries)) => entries,
            None => return Ok(Vec::new()),
        },
        v => match array(v)?.into_iter().next() {
            Some(stream) => {
                let mut parts = array(stream)?.into_iter();
                parts.nth(1).ok_or_else(|| malformed("[key, entries]"))?
            }
            None => return Ok(Vec::new()),
        },
    };
    let entries = array(entries)?;
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        out.extend(entry(e, 1)?);
    }
    Ok(out)
}

/// The claim script's `[cursor, [[id, fields, deliveries], ...], [dead id, ...]]`.
pub(super) fn claimed(v: Value) -> Result<Claimed, RedisError> {
    let mut parts = array(v)?.into_iter();
    let (Some(cursor), Some(entries), Some(dead)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("[cursor, entries, dead]"));
    };
    let mut out = Vec::new();
    for e in array(entries)? {
        let mut e = array(e)?.into_iter();
        let (Some(id), Some(f), Some(n)) = (e.next(), e.next(), e.next()) else {
            return Err(malformed("a claimed entry [id, fields, deliveries]"));
        };
        let deliveries = match n {
            Value::Int(n) => u32::try_from(n).unwrap_or(u32::MAX),
            _ => return Err(malformed("a delivery count")),
        };
        out.extend(entry(Value::Array(vec![id, f]), deliveries)?);
    }
    Ok(Claimed {
        cursor: string(cursor)?,
        entries: out,
        dead: array(dead)?
            .into_iter()
            .map(string)
            .collect::<Result<_, _>>()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &[u8]) -> Value {
        Value::BulkString(s.to_vec())
    }

    #[test]
    fn a_read_reply_keeps_bytes_and_skips_deleted_entries() {
        let reply = Value::Array(vec![Value::Array(vec![
            b(b"jobs"),
            Value::Array(vec![
                Value::Array(vec![b(b"1-0"), Value::Array(vec![b(b"f"), b(b"\xff")])]),
                Value::Array(vec![b(b"2-0"), Value::Nil]),
            ]),
        ])]);
        let entries = read(reply).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(&*entries[0].id, "1-0");
        assert_eq!(entries[0].fields, vec![(b"f".to_vec(), b"\xff".to_vec())]);
        assert_eq!(entries[0].deliveries, 1);
        assert!(read(Value::Nil).unwrap().is_empty());
    }

    #[test]
    fn a_claim_reply_carries_delivery_counts_and_dead_ids() {
        let reply = Value::Array(vec![
            b(b"0-0"),
            Value::Array(vec![Value::Array(vec![
                b(b"3-1"),
                Value::Array(vec![b(b"k"), b(b"v")]),
                Value::Int(4),
            ])]),
            Value::Array(vec![b(b"2-0")]),
        ]);
        let c = claimed(reply).unwrap();
        assert_eq!(c.cursor, "0-0");
        assert_eq!(&*c.entries[0].id, "3-1");
        assert_eq!(c.entries[0].deliveries, 4);
        assert_eq!(c.dead, ["2-0"]);
    }

    #[test]
    fn an_odd_field_list_is_an_error_not_a_panic() {
        let reply = Value::Array(vec![Value::Array(vec![
            b(b"jobs"),
            Value::Array(vec![Value::Array(vec![
                b(b"1-0"),
                Value::Array(vec![b(b"f")]),
            ])]),
        ])]);
        assert!(read(reply).is_err());
        assert!(claimed(Value::Int(1)).is_err());
    }
}
