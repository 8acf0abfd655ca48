//! Files other programs read while the process runs (ready files): written
//! whole or not at all.

use anyhow::Context;

/// Writes `contents` to `path` atomically (a temporary file, then a rename),
/// so a reader never sees half a file.
pub fn write_atomically(path: &std::path::Path, contents: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}
