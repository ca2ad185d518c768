use std::path::Path;

use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// Reads a JSON file into `T`; a malformed file or a field of the wrong type is an
/// [`Error::Config`] naming the file and the field (e.g. `rope_scaling.factor`).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let value = read_json_value(path)?;
    from_value(value, path)
}

/// Converts a parsed JSON value into `T`, naming the offending field on error.
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value, path: &Path) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        Error::config(path, format!("field `{field}`: {}", e.into_inner()))
    })
}

/// Reads a JSON file as an untyped value.
pub fn read_json_value(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::MissingFile {
                path: path.to_path_buf(),
                hint: String::new(),
            }
        } else {
            Error::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    serde_json::from_slice(&text).map_err(|e| Error::config(path, e.to_string()))
}
