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

/// `n` and the words for one or several: `count(1, "file is", "files are")`
/// is "1 file is", `count(3, ...)` "3 files are".
pub fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `1, 2, 3` — the first eight of `ids`, then how many in all.
pub fn ids_text(ids: impl Iterator<Item = u64>) -> String {
    let ids: Vec<u64> = ids.collect();
    let shown: Vec<String> = ids.iter().take(8).map(u64::to_string).collect();
    let more = if ids.len() > 8 { format!(", ... ({} in all)", ids.len()) } else { String::new() };
    format!("{}{more}", shown.join(", "))
}

/// A libtorch error message as one short line: c10's messages go on with
/// "Exception raised from ... frame #0: ..." (a C++ backtrace of thousands
/// of characters), which is cut off, and what remains is kept within 300
/// characters.
pub(crate) fn libtorch_message(s: &str) -> String {
    let head = s.split("Exception raised from").next().unwrap_or(s);
    let line = head.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= 300 {
        return line;
    }
    format!("{} …", line.chars().take(300).collect::<String>())
}

std::thread_local! {
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with panics on this thread not printed by the panic hook (the
/// caller catches and reports them itself, in one line); other threads'
/// panics print as before.
pub(crate) fn quiet_panics<T>(f: impl FnOnce() -> T) -> T {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    let before = QUIET.with(|q| q.replace(true));
    let out = f();
    QUIET.with(|q| q.set(before));
    out
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

    /// A c10 message loses its backtrace and stays short.
    #[test]
    fn libtorch_messages_lose_their_backtrace() {
        let msg = "CUDA out of memory. Tried to allocate 2.00 GiB.\nException raised from malloc at /c10/cuda/CUDACachingAllocator.cpp:1234 (most recent call first):\nframe #0: c10::Error::Error(...)";
        assert_eq!(super::libtorch_message(msg), "CUDA out of memory. Tried to allocate 2.00 GiB.");
        assert!(super::libtorch_message(&"x ".repeat(1000)).chars().count() <= 302);
    }

    /// A panic inside `quiet_panics` is still a panic (caught by the caller).
    #[test]
    fn quiet_panics_still_unwind() {
        let caught = super::quiet_panics(|| std::panic::catch_unwind(|| panic!("boom")));
        assert!(caught.is_err());
    }

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
