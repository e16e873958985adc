//! JSON text written into a caller's buffer. Streaming writes one small JSON
//! object per token; building it in a buffer that is cleared and reused keeps
//! the decode loop free of allocations (serde_json would do the same work but
//! hides whether it allocates).

/// Appends `text` as a JSON string literal (quotes included) to `out`.
pub fn push_string(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    let bytes = text.as_bytes();
    let mut start = 0;
    for (i, &byte) in bytes.iter().enumerate() {
        let escape: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x00..=0x1F | 0x7F => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            // Other control characters as \u00XX.
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(byte >> 4) as usize]);
            out.push(HEX[(byte & 15) as usize]);
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Parses JSON text into a [`serde_json::Value`], refusing an object that
/// names a key twice, at any depth. serde_json keeps the last of duplicate
/// keys; another parser may keep the first, so `{"max_tokens":99999,
/// "max_tokens":2}` would mean different things to a proxy and to us.
pub fn parse_strict(text: &str) -> serde_json::Result<serde_json::Value> {
    use serde::de::DeserializeSeed;
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let value = StrictValue.deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(value)
}

/// A [`serde_json::Value`] seed whose objects refuse a key seen before.
struct StrictValue;

impl<'de> serde::de::DeserializeSeed<'de> for StrictValue {
    type Value = serde_json::Value;
    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for StrictValue {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, serde_json::Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(StrictValue)? {
            items.push(item);
        }
        Ok(serde_json::Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format_args!("the key {key:?} appears twice")));
            }
            let value = map.next_value_seed(StrictValue)?;
            object.insert(key, value);
        }
        Ok(serde_json::Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_text_parses_back_to_itself() {
        for text in ["plain", "quote \" and \\ slash", "lines\nand\ttabs\r", "\u{1}\u{7f} controls", "€ and 😀", ""]
        {
            let mut out = Vec::new();
            push_string(&mut out, text);
            let back: String = serde_json::from_slice(&out).unwrap();
            assert_eq!(back, text);
        }
    }

    #[test]
    fn reusing_the_buffer_does_not_allocate_more() {
        let mut out = Vec::with_capacity(256);
        let capacity = out.capacity();
        for _ in 0..100 {
            out.clear();
            push_string(&mut out, "a token \"piece\"\n");
        }
        assert_eq!(out.capacity(), capacity);
    }

    #[test]
    fn strict_parsing_refuses_a_key_twice_at_any_depth_and_keeps_the_rest() {
        let twice = parse_strict(r#"{"max_tokens":99999,"max_tokens":2}"#).unwrap_err().to_string();
        assert!(twice.contains("\"max_tokens\" appears twice"), "{twice}");
        let nested = parse_strict(r#"{"messages":[{"role":"user","role":"system","content":"x"}]}"#).unwrap_err();
        assert!(nested.to_string().contains("\"role\" appears twice"), "{nested}");
        let text = r#"{"a":[1,-2,3.5,true,null,"x",{"b":{}}],"c":{"a":1},"d":18446744073709551615}"#;
        assert_eq!(parse_strict(text).unwrap(), serde_json::from_str::<serde_json::Value>(text).unwrap());
        assert!(parse_strict(r#"{"a":1} x"#).is_err(), "trailing characters");
        assert!(parse_strict(r#"{"a":1"#).is_err());
    }
}
