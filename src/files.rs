//! Files other programs read while the process runs (ready files), written
//! whole or not at all; private keys other users must not read; and the
//! process's descriptor limit.

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

/// Permission bits a private key file must not have: readable or writable by
/// any user (anyone could take the node's or the client's identity), or
/// writable by its group. Group read stays allowed: the common
/// `root:ssl-cert 0640` layout for TLS keys relies on it.
pub const KEY_FORBIDDEN_MODE: u32 = 0o027;

/// Refuses a private key file that users other than its owner (and its
/// group, for reading) could read or change: the error says the mode and
/// the `chmod` that mends it.
pub fn check_private(path: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        // Reading it will say what is wrong.
        return Ok(());
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & KEY_FORBIDDEN_MODE != 0 {
        return Err(format!(
            "{}: a private key with mode {mode:03o} can be read or changed by other users; run `chmod 600 {}`",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_others_can_read_or_change_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("node.key");
        std::fs::write(&key, "k").unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o640, true),
            (0o644, false),
            (0o660, false),
            (0o606, false),
        ] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            let checked = check_private(&key);
            assert_eq!(checked.is_ok(), ok, "{mode:o}: {checked:?}");
        }
        let err = check_private(&key).unwrap_err();
        assert!(err.contains("chmod 600"), "{err}");
    }
}
