//! Python's own spelling of a string, for the messages where the official runner prints
//! `{value!r}`.

use unicode_general_category::{get_general_category, GeneralCategory as G};

/// Python's `str.isprintable` for one character.
fn printable(c: char) -> bool {
    if c == ' ' {
        return true;
    }
    !matches!(
        get_general_category(c),
        G::Control
            | G::Format
            | G::Surrogate
            | G::PrivateUse
            | G::Unassigned
            | G::LineSeparator
            | G::ParagraphSeparator
            | G::SpaceSeparator
    )
}

/// `repr(s)` of a Python `str`.
pub(crate) fn repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if (c as u32) < 0x7f => out.push(c),
            c if printable(c) => out.push(c),
            c if (c as u32) <= 0xff => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if (c as u32) <= 0xffff => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out.push(quote);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_read_as_python_writes_them() {
        for (s, want) in [
            ("../x", "'../x'"),
            ("it's", "\"it's\""),
            ("a'b\"c", "'a\\'b\"c'"),
            ("tab\there\n", "'tab\\there\\n'"),
            ("\u{1}\u{7f}", "'\\x01\\x7f'"),
            ("é ü 日本", "'é ü 日本'"),
            ("\u{a0}\u{200b}\u{2028}", "'\\xa0\\u200b\\u2028'"),
            ("\u{e000}\u{10ffff}", "'\\ue000\\U0010ffff'"),
            ("back\\slash", "'back\\\\slash'"),
        ] {
            assert_eq!(repr(s), want, "{s:?}");
        }
    }
}
