//! One error type for every user-facing failure. `main` prints it as a single line and exits 1.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum AsaError {
    #[error("config error: {0}")]
    Config(String),
    #[error("checkpoint error: {0}")]
    Checkpoint(String),
    #[error("input error: {0}")]
    Input(String),
    #[error("device error: {0}")]
    Device(String),
    #[error("{0}")]
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
