//! Text from the server (names, errors, log lines, documents) written to the operator's
//! terminal. Control characters a terminal obeys (escape sequences that rewrite a line, set
//! the clipboard or disguise a link) and bidirectional overrides (which reorder what is shown)
//! are written as `\u00XX` instead: a tenant's job name or a document's text must not drive the
//! terminal of whoever lists it. (JSON output is safe as written: `\u00XX` is JSON's escape.)

use std::{borrow::Cow, fmt::Write};

/// `text` with every hazard escaped; line breaks and tabs kept.
pub fn safe(text: &str) -> Cow<'_, str> {
    if !text.chars().any(hazard) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if hazard(c) {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn hazard(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t')
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `println!` with the line made [`safe`].
macro_rules! out {
    () => {
        println!()
    };
    ($($arg:tt)*) => {
        println!("{}", $crate::terminal::safe(&format!($($arg)*)))
    };
}

/// `print!` with the text made [`safe`].
macro_rules! put {
    ($($arg:tt)*) => {
        print!("{}", $crate::terminal::safe(&format!($($arg)*)))
    };
}

/// `eprintln!` with the line made [`safe`].
macro_rules! err {
    () => {
        eprintln!()
    };
    ($($arg:tt)*) => {
        eprintln!("{}", $crate::terminal::safe(&format!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    use super::safe;

    #[test]
    fn escape_sequences_and_overrides_are_written_out() {
        let hostile = "\u{1b}]52;c;Y3VybA==\u{7}\u{1b}[2K\rok \u{9b}31m \u{202e}gnp.exe\tend\n";
        let shown = safe(hostile);
        assert_eq!(
            shown,
            "\\u001b]52;c;Y3VybA==\\u0007\\u001b[2K\\u000dok \\u009b31m \\u202egnp.exe\tend\n"
        );
        assert!(matches!(
            safe("plain text, ünïcode"),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
