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

/// An error and its causes on one line, `outer: cause: root cause`, each
/// cause left out where the message before already quotes it (a wrapper
/// that both shows and keeps its source), then cut as [`one_line`] cuts.
pub fn error_chain_line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    let mut cause = Some(error);
    while let Some(e) = cause {
        let text = e.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        cause = e.source();
    }
    one_line(&line)
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("cannot write {path}: {source}")]
    struct Quoting {
        path: String,
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("evaluation")]
    struct Plain(#[source] Quoting);

    /// Every cause appears once, in order, whether or not a wrapper quotes it.
    #[test]
    fn error_chain_names_each_cause_once() {
        let root = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "permission denied");
        let e = Plain(Quoting { path: "out/x.json".into(), source: root });
        assert_eq!(super::error_chain_line(&e), "evaluation: cannot write out/x.json: permission denied");
    }

    #[test]
    fn long_messages_keep_both_ends_within_the_limit() {
        assert_eq!(super::one_line("a\n  b\tc"), "a b c");
        let long = format!("at line 1, column 9 {} expected `=`", "x".repeat(60_000));
        let short = super::one_line(&long);
        assert!(short.starts_with("at line 1, column 9") && short.ends_with("expected `=`"), "{short}");
        assert!(short.chars().count() <= super::MAX_CHARS + 40, "{}", short.len());
    }
}
