//! Safe display of client-supplied strings (workstation names) in text logs, events and
//! terminals: a client must not be able to forge log lines, move the cursor or reorder text.

use std::borrow::Cow;

/// Whether `c` must be escaped: control characters (C0, DEL, C1), the backslash (so escapes
/// stay unambiguous) and the invisible or direction-changing format characters used to
/// disguise text (zero-width, bidi embeddings, overrides and isolates, BOM).
fn needs_escape(c: char) -> bool {
    c.is_control()
        || c == '\\'
        || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

/// `s` with control and format characters written as Rust-style escapes (`\n`, `\r`, `\t`,
/// `\\`, `\u{1b}`). Borrowed when nothing needs escaping (the usual case).
pub fn escape_control(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\\' => out.push_str("\\\\"),
            c if needs_escape(c) => {
                out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_are_borrowed() {
        assert!(matches!(
            escape_control("PC-042.corp.example"),
            Cow::Borrowed(_)
        ));
        assert!(matches!(escape_control("Müller-PC"), Cow::Borrowed(_)));
    }

    #[test]
    fn control_and_format_characters_are_escaped() {
        assert_eq!(
            escape_control("evil\n2026-01-01 INFO forged\r\x1b[31m\t\u{7f}"),
            "evil\\n2026-01-01 INFO forged\\r\\u{1b}[31m\\t\\u{7f}"
        );
        assert_eq!(escape_control("a\\b"), "a\\\\b");
        assert_eq!(escape_control("abc\u{202E}gpj.exe"), "abc\\u{202e}gpj.exe");
        assert_eq!(escape_control("\u{0}\u{85}"), "\\u{0}\\u{85}");
    }
}
