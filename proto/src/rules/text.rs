//! Text that a peer chose and a person will read: a publisher's principal
//! and account, a refresh error, a broker's refusal reason in an agent's
//! log. Such text reaches an operator's terminal (`credstream status`), a log
//! line or an audit record, so a hostile peer must not be able to move the
//! cursor, clear the screen, reorder text with bidirectional overrides or
//! start a new line that looks like one of ours (a forged `fix:` line), nor
//! fill a disk with one field.
//!
//! One rule, applied where the text is accepted (the broker, on receipt) and
//! again where it is shown (the CLI, which may be talking to an older
//! broker): every control character (C0, DEL, C1) and every invisible
//! formatting character that changes how text around it is shown is written
//! as a visible `\u{…}` escape, and the result is cut at `max_bytes` on a
//! character boundary, with `…` marking the cut. Printable Unicode (an email
//! address with an accent, a role name in another script) stays as it is.

use std::borrow::Cow;
use std::fmt::Write as _;

/// The marker appended where [`printable`] cut the text.
pub const CUT_MARKER: &str = "…";

/// True for a character that [`printable`] writes as an escape.
pub fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            // Bidirectional embeddings, overrides and isolates, and the
            // marks that steer them (Trojan Source, CVE-2021-42574).
            '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
            // Zero-width characters and the BOM, which hide text.
            | '\u{200B}'..='\u{200D}' | '\u{2060}' | '\u{FEFF}'
            // Line and paragraph separators, which some terminals and
            // viewers break lines at.
            | '\u{2028}' | '\u{2029}'
        )
}

/// `text` with every character of [`needs_escape`] written as `\u{…}`, cut
/// to at most `max_bytes` bytes plus [`CUT_MARKER`] when longer. Borrows
/// when nothing changes, which is the common case.
pub fn printable(text: &str, max_bytes: usize) -> Cow<'_, str> {
    if text.len() <= max_bytes && !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len().min(max_bytes) + CUT_MARKER.len());
    for c in text.chars() {
        let start = out.len();
        if needs_escape(c) {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
        if out.len() > max_bytes {
            out.truncate(start);
            out.push_str(CUT_MARKER);
            break;
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_text_is_borrowed_unchanged() {
        for text in [
            "arn:aws:sts::123456789012:assumed-role/r/s",
            "jürgen@example.com",
            "AWS refused to mint: AccessDenied (fix: check the role's trust policy)",
            "",
        ] {
            assert!(matches!(printable(text, 256), Cow::Borrowed(t) if t == text));
        }
    }

    #[test]
    fn control_characters_become_visible_escapes() {
        assert_eq!(
            printable("ok\nfix: run rm -rf /", 256),
            "ok\\u{a}fix: run rm -rf /"
        );
        assert_eq!(printable("\u{1b}[2Jcleared", 256), "\\u{1b}[2Jcleared");
        assert_eq!(
            printable("a\rb\tc\u{7f}\u{9b}", 256),
            "a\\u{d}b\\u{9}c\\u{7f}\\u{9b}"
        );
    }

    #[test]
    fn invisible_formatting_becomes_visible_escapes() {
        assert_eq!(
            printable("admin\u{202e}gnp.exe", 256),
            "admin\\u{202e}gnp.exe"
        );
        assert_eq!(
            printable("a\u{200b}b\u{2028}c", 256),
            "a\\u{200b}b\\u{2028}c"
        );
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary_with_a_marker() {
        let accents = "é".repeat(100);
        assert_eq!(
            printable(&accents, 11),
            format!("{}{CUT_MARKER}", "é".repeat(5))
        );
        let newlines = format!("abc{}", "\n".repeat(10));
        assert_eq!(printable(&newlines, 10), format!("abc\\u{{a}}{CUT_MARKER}"));
        assert!(printable(&"x".repeat(1 << 20), 512).len() <= 512 + CUT_MARKER.len());
    }
}
