//! Writing result files safely: JSON through a temporary file and a rename,
//! so a reader never sees half a file and a failed write leaves nothing.

use std::path::{Path, PathBuf};

/// A file could not be written (the cause kept as the error's source).
#[derive(Debug, thiserror::Error)]
#[error("cannot write {}", path.display())]
pub struct WriteError {
    pub path: PathBuf,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Writes `value` as JSON to `path` through `path.json.tmp` and a rename
/// (the temporary file is removed when the rename fails); a folder at
/// `path` is an error, said so.
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), WriteError> {
    let err = |source: Box<dyn std::error::Error + Send + Sync>| WriteError { path: path.to_path_buf(), source };
    if path.is_dir() {
        return Err(err("is a directory, not a file".into()));
    }
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string(value).map_err(|e| err(e.into()))?;
    std::fs::write(&tmp, text).map_err(|e| err(e.into()))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e.into())
    })
}
