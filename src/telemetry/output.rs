//! Lines for people: configuration, events, statistics, reload results.
//!
//! `println!` panics when stdout is a closed pipe (`redirect -v | head -1`
//! once head exits), and a panic inside a ring-buffer callback aborts the
//! process, detaching every program. These write a line, and a line that
//! cannot be written is dropped and counted: the datapath never stops for
//! its log.

use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Writes one line to stdout; counts it as dropped when it cannot.
pub fn stdout_line(line: fmt::Arguments<'_>) {
    if writeln!(std::io::stdout().lock(), "{line}").is_err() {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Writes one line to stderr; counts it as dropped when it cannot.
pub fn stderr_line(line: fmt::Arguments<'_>) {
    if writeln!(std::io::stderr().lock(), "{line}").is_err() {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Lines that could not be written since start.
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// `println!` that never panics: see the module.
#[macro_export]
macro_rules! out {
    () => {
        $crate::telemetry::output::stdout_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::telemetry::output::stdout_line(format_args!($($arg)*))
    };
}

/// `eprintln!` that never panics: see the module.
#[macro_export]
macro_rules! err_out {
    ($($arg:tt)*) => {
        $crate::telemetry::output::stderr_line(format_args!($($arg)*))
    };
}

/// Text a process chose (its name, say) as one safe line: printable ASCII
/// and other printable characters stay, a backslash is doubled, and every
/// control byte or byte that is not UTF-8 becomes `\xNN`, so that no
/// process can end a line or send escape sequences to a terminal.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => text.push_str("\\\\"),
                c if c.is_control() => {
                    let mut buf = [0u8; 4];
                    for byte in c.encode_utf8(&mut buf).bytes() {
                        text.push_str(&format!("\\x{byte:02x}"));
                    }
                }
                c => text.push(c),
            }
        }
        for byte in chunk.invalid() {
            text.push_str(&format!("\\x{byte:02x}"));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_bytes_and_invalid_utf8_are_escaped() {
        assert_eq!(escape_bytes(b"curl"), "curl");
        assert_eq!(escape_bytes(b"a\nb"), "a\\x0ab");
        assert_eq!(escape_bytes(b"\x1b[2J"), "\\x1b[2J");
        assert_eq!(escape_bytes(b"back\\slash"), "back\\\\slash");
        assert_eq!(escape_bytes(b"\xff\xfe"), "\\xff\\xfe");
        assert_eq!(escape_bytes("caf\u{e9}".as_bytes()), "caf\u{e9}");
        // C1 controls (U+0080..U+009F) too.
        assert_eq!(escape_bytes("\u{9b}".as_bytes()), "\\xc2\\x9b");
    }
}
