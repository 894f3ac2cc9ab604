//! File-system hygiene of the node: a private data dir (0700, files 0600) and warnings for
//! secrets other users can read.

use std::path::Path;

/// Files and directories kmsd creates from now on are private to its user (umask 077):
/// the write-ahead log, snapshots and sled files hold the client registry (workstation
/// names, addresses) and the host identity.
pub fn private_umask() {
    #[cfg(unix)]
    // SAFETY: umask only changes the calling process's file-creation mask; it takes no
    // pointers and cannot fail.
    unsafe {
        libc::umask(0o077);
    }
}

/// Creates `dir` if needed and makes everything in it that kmsd's user owns private:
/// directories 0700, files 0600 (a data dir written by an older version keeps no group or
/// world bits). Entries of another owner are left alone: a Kubernetes volume's root belongs
/// to root and reaches kmsd through its `fsGroup`, and taking the group's access away would
/// lock kmsd out. Tightening is best effort (a failure is logged); only creating the
/// directory can fail. Returns how many entries were tightened.
pub fn secure_data_dir(dir: &Path) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    let mut tightened = 0;
    tighten(dir, 0, &mut tightened);
    Ok(tightened)
}

#[cfg(unix)]
fn tighten(path: &Path, depth: usize, tightened: &mut usize) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // Never follow a symlink out of the data dir.
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot check permissions");
            return;
        }
    };
    if meta.file_type().is_symlink() {
        return;
    }
    // SAFETY: geteuid takes no arguments and cannot fail.
    let me = unsafe { libc::geteuid() };
    let mode = meta.permissions().mode() & 0o7777;
    let wanted = if meta.is_dir() { 0o700 } else { mode & 0o600 };
    if meta.uid() == me && mode != wanted {
        match std::fs::set_permissions(path, std::fs::Permissions::from_mode(wanted)) {
            Ok(()) => *tightened += 1,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot make private")
            }
        }
    }
    // The data dir is shallow (state/, state/wal, snapshots); bound the walk anyway.
    if meta.is_dir() && depth < 6 {
        match std::fs::read_dir(path) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    tighten(&entry.path(), depth + 1, tightened);
                }
            }
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot list"),
        }
    }
}

#[cfg(not(unix))]
fn tighten(_: &Path, _: usize, _: &mut usize) {}

/// Whether a secret file can be read by its group or by every user (mode bits 044).
pub fn readable_by_others(path: &Path) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        (mode & 0o044 != 0).then_some(mode)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// Logs a warning for every TSIG secret file of the DNS publishing configuration that its
/// group or every user may read.
pub fn warn_exposed_tsig_secrets(dns: &kms_dns::DnsConfig) {
    for target in &dns.publish {
        if let Some(path) = &target.tsig_secret_file {
            if let Some(mode) = readable_by_others(path) {
                tracing::warn!(
                    zone = %target.zone,
                    file = %path.display(),
                    mode = %format!("{mode:03o}"),
                    "the TSIG secret file is readable by other users: anyone who can read it \
                     can change the zone's records; run `chmod 600` on it"
                );
            }
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn data_dir_becomes_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        std::fs::create_dir_all(dir.join("state")).unwrap();
        std::fs::write(dir.join("state/wal"), b"x").unwrap();
        std::fs::set_permissions(
            dir.join("state/wal"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        std::fs::set_permissions(dir.join("state"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let n = secure_data_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("state")), 0o700);
        assert_eq!(mode(&dir.join("state/wal")), 0o600);
        assert_eq!(n, 3);
        // Nothing left to do the second time.
        assert_eq!(secure_data_dir(&dir).unwrap(), 0);
    }

    #[test]
    fn entries_of_another_owner_are_left_alone() {
        // SAFETY: geteuid takes no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            // Giving a file away needs root (CI runs as root: there a skip is a failure).
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        std::fs::create_dir_all(dir.join("state")).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o2775)).unwrap();
        std::os::unix::fs::chown(&dir, Some(0), Some(65532)).unwrap();
        // Like a Kubernetes volume root: another owner, reached through the group.
        std::os::unix::fs::chown(&dir, Some(65532), None).unwrap();
        std::fs::write(dir.join("state/wal"), b"x").unwrap();
        std::fs::set_permissions(
            dir.join("state/wal"),
            std::fs::Permissions::from_mode(0o664),
        )
        .unwrap();
        secure_data_dir(&dir).unwrap();
        assert_eq!(
            mode(&dir),
            0o775,
            "another owner's directory keeps its mode"
        );
        assert_eq!(
            mode(&dir.join("state/wal")),
            0o600,
            "own files are tightened"
        );
    }

    #[test]
    fn group_or_world_readable_secrets_are_found() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("tsig");
        std::fs::write(&f, b"c2VjcmV0").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(readable_by_others(&f), Some(0o640));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(readable_by_others(&f), None);
    }
}
