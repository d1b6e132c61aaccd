//! One error type for every user-facing failure. `main` prints it as a single line and exits 1.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum AsaError {
    #[error("config error: {}", one_line(.0))]
    Config(String),
    #[error("checkpoint error: {}", one_line(.0))]
    Checkpoint(String),
    #[error("input error: {}", one_line(.0))]
    Input(String),
    #[error("device error: {}", one_line(.0))]
    Device(String),
    #[error("{}", one_line(.0))]
    Other(String),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Writing any output file failed (a report, a checkpoint, a shard): not a checkpoint error,
    /// so no "checkpoint error:" label on a `smoke.json` that cannot be written.
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A message as one line: every failure is one `error: ...` line. Parsers' multi-line reports
/// (the TOML crate draws the offending line with a `|` gutter and a caret) keep their text lines,
/// joined with "; ", and lose the drawing (the line and column are in the first line).
pub fn one_line(msg: &str) -> std::borrow::Cow<'_, str> {
    if !msg.contains(['\n', '\r']) {
        return std::borrow::Cow::Borrowed(msg);
    }
    let gutter = |l: &str| {
        let t = l
            .trim_start()
            .trim_start_matches(|c: char| c.is_ascii_digit());
        t.trim_start().starts_with('|')
    };
    let parts: Vec<&str> = msg
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty() && !gutter(l))
        .collect();
    std::borrow::Cow::Owned(parts.join("; "))
}

impl AsaError {
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        AsaError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

/// An error naming `dir` or its first ancestor that exists but is not a folder, if any: the
/// clear form of the "File exists" / "Not a directory" that creating or listing it would give.
pub fn not_a_folder(dir: &std::path::Path) -> Option<AsaError> {
    let b = dir
        .ancestors()
        .filter(|a| !a.as_os_str().is_empty())
        .find(|a| a.exists() && !a.is_dir())?;
    Some(AsaError::Input(format!(
        "{} exists and is not a folder{}",
        b.display(),
        if b == dir {
            String::new()
        } else {
            format!(" (needed for {})", dir.display())
        }
    )))
}

/// Creates `dir` and its parents (like `create_dir_all`), with a clear message when the path
/// or one of its parents exists but is not a folder (`create_dir_all` only says "File exists").
pub fn ensure_dir(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| not_a_folder(dir).unwrap_or_else(|| AsaError::io(dir, e)))
}

pub type Result<T> = std::result::Result<T, AsaError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_is_one_line() {
        let toml_err = toml::from_str::<toml::Value>("a = 1\nbatch_size = NaN\n").unwrap_err();
        let e = AsaError::Config(format!("c.toml: invalid TOML: {toml_err}")).to_string();
        assert!(!e.contains('\n') && !e.contains('\r'), "{e}");
        assert!(e.contains("line 2") && e.contains("invalid"), "{e}");
        assert!(!e.contains(" | "), "{e}");
        let e = AsaError::Input("a\r\n\nb\rc".into()).to_string();
        assert_eq!(e, "input error: a; b; c");
        assert_eq!(AsaError::Other("plain".into()).to_string(), "plain");
    }

    #[test]
    fn ensure_dir_names_a_file_in_the_way() {
        let td = tempfile::tempdir().unwrap();
        let f = td.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let e = ensure_dir(&f).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{} exists and is not a folder", f.display())),
            "{e}"
        );
        assert!(!e.contains("File exists"), "{e}");
        let e = ensure_dir(&f.join("a/b")).unwrap_err().to_string();
        assert!(
            e.contains("exists and is not a folder") && e.contains("a/b"),
            "{e}"
        );
        ensure_dir(&td.path().join("x/y")).unwrap();
        ensure_dir(&td.path().join("x/y")).unwrap();
        assert!(td.path().join("x/y").is_dir());
    }
}
