//! Default locations: the data folder and the cache.

use std::path::PathBuf;

/// `DEADBOLT_DATA_DIR`, else `./data`.
pub fn data_dir() -> PathBuf {
    std::env::var_os("DEADBOLT_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("data"))
}

/// `DEADBOLT_CACHE`, else `$XDG_CACHE_HOME/deadbolt`, else `~/.cache/deadbolt`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("DEADBOLT_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("deadbolt");
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/deadbolt"))
        .unwrap_or_else(|| PathBuf::from(".cache/deadbolt"))
}
