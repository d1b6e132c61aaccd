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
}

impl AsaError {
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        AsaError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, AsaError>;
