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
}
