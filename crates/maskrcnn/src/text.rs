//! Small text helpers shared by the error messages.

/// The longest message [`one_line`] returns, in characters.
const MAX_CHARS: usize = 600;

/// `s` with every run of whitespace (newlines included) collapsed to one
/// space: library errors are reported on one line. A longer message (a
/// parser quoting a 60 MB line back, say) keeps its start (where) and end
/// (why) around an ellipsis, within [`MAX_CHARS`].
pub(crate) fn one_line(s: &str) -> String {
    let line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let n = line.chars().count();
    if n <= MAX_CHARS {
        return line;
    }
    let (head, tail) = (MAX_CHARS * 2 / 3, MAX_CHARS / 3 - 10);
    let start: String = line.chars().take(head).collect();
    let end: String = line.chars().skip(n - tail).collect();
    format!("{start} … [{} characters cut] … {end}", n - head - tail)
}

#[cfg(test)]
mod tests {
    #[test]
    fn long_messages_keep_both_ends_within_the_limit() {
        assert_eq!(super::one_line("a\n  b\tc"), "a b c");
        let long = format!("at line 1, column 9 {} expected `=`", "x".repeat(60_000));
        let short = super::one_line(&long);
        assert!(short.starts_with("at line 1, column 9") && short.ends_with("expected `=`"), "{short}");
        assert!(short.chars().count() <= super::MAX_CHARS + 40, "{}", short.len());
    }
}
