//! Files other programs read while the process runs (ready files), written
//! whole or not at all; and the process's descriptor limit.

use anyhow::Context;

/// Writes `contents` to `path` atomically (a temporary file, then a rename),
/// so a reader never sees half a file.
pub fn write_atomically(path: &std::path::Path, contents: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Raises the process's soft limit on open descriptors to its hard limit
/// (the common soft limit, 1,024, is below what a busy node holds) and
/// returns the soft limit in force afterwards.
pub fn raise_descriptor_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let Some(current) = limit.current else {
        return u64::MAX; // unlimited
    };
    if limit.maximum.is_none_or(|max| max > current) {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(err) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(%err, current, "cannot raise the descriptor limit");
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}
