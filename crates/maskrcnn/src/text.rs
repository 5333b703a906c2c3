//! Small text helpers shared by the error messages.

/// `s` with every run of whitespace (newlines included) collapsed to one
/// space: library errors are reported on one line.
pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
