//! Files in folders that others may touch: an agent's folder belongs to the agent's user,
//! so agentd (often root) opens what stands there without following links or blocking, and
//! checks that its own folders are beyond other users' reach.

use std::path::Path;

/// The file an agent writes its progress to.
pub(crate) const STATUS_FILE: &str = "status.json";

/// Opens a file in an agent's folder for reading: never through a symbolic link (the agent,
/// or the user it runs as, owns the folder and could plant one to any file agentd can read),
/// never blocking (a FIFO planted there would stop the reader), and only a regular file.
pub(crate) fn open_for_reading(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("`{}` is not a regular file", path.display()),
        ));
    }
    Ok(file)
}

/// Options to open a file in an agent's folder for writing, for [`open_for_writing`]:
/// never through a symbolic link, which would make agentd (often root) write where the
/// agent's user may not; never blocking on a FIFO planted there (ENXIO without a reader);
/// created readable by its owner only (a prompt or output may hold secrets).
pub(crate) fn no_follow() -> std::fs::OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .mode(0o600);
    options
}

/// Opens a file in an agent's folder with `options` (from [`no_follow`]): only a regular
/// file, then given to `owner` (the agent's user and group) through its descriptor, never
/// by path, so nothing planted in the folder can turn the write or the chown elsewhere.
pub(crate) fn open_for_writing(
    options: &std::fs::OpenOptions,
    path: &Path,
    owner: Option<(u32, u32)>,
) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let file = options.open(path).map_err(|error| {
        let what = match error.raw_os_error() {
            Some(nix::libc::ELOOP) => "is a symbolic link, which agentd never writes through",
            Some(nix::libc::ENXIO) => "is not a regular file (a FIFO?)",
            _ => return error,
        };
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("`{}` {what}", path.display()),
        )
    })?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("`{}` is not a regular file", path.display()),
        ));
    }
    // O_NONBLOCK only guarded the open: the agent gets a plain file.
    // SAFETY: fcntl on a descriptor we own, with flags it just returned.
    unsafe {
        let flags = nix::libc::fcntl(file.as_raw_fd(), nix::libc::F_GETFL);
        if flags >= 0 {
            nix::libc::fcntl(
                file.as_raw_fd(),
                nix::libc::F_SETFL,
                flags & !nix::libc::O_NONBLOCK,
            );
        }
    }
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
    }
    Ok(file)
}

/// Whether a folder agentd writes into, or serves its socket from, is beyond other users'
/// reach: it belongs to agentd's user (or root, with `root_will_do`) and nobody else may
/// write it, and every folder above it belongs to agentd's user or root and is closed to
/// others' writes, unless sticky (`/tmp`: others cannot move what is not theirs there).
/// `Err` says what is wrong and how to mend it.
pub fn check_folder(path: &Path, root_will_do: bool) -> std::result::Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let own = nix::unistd::geteuid().as_raw();
    let meta = std::fs::symlink_metadata(path)
        .map_err(|error| format!("`{}` cannot be examined: {error}", path.display()))?;
    if !meta.is_dir() {
        return Err(format!(
            "`{}` is not a folder (a symbolic link or a file stands there)",
            path.display()
        ));
    }
    if meta.uid() != own && !(root_will_do && meta.uid() == 0) {
        return Err(format!(
            "`{}` belongs to uid {}, not to the user agentd runs as (uid {own}): chown it, or \
             give agentd a folder of its own",
            path.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "its group or others may write to `{}` (mode {:o}): `chmod go-w {}`",
            path.display(),
            meta.mode() & 0o7777,
            path.display()
        ));
    }
    for above in path.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(above) else {
            continue;
        };
        let sticky = meta.mode() & 0o1000 != 0;
        if (meta.uid() != own && meta.uid() != 0) || (meta.mode() & 0o022 != 0 && !sticky) {
            return Err(format!(
                "`{}` above it belongs to uid {} with mode {:o}: whoever may write there can \
                 move `{}` away and put their own in its place; choose a folder whose every \
                 parent is root's or agentd's user's and closed to others' writes",
                above.display(),
                meta.uid(),
                meta.mode() & 0o7777,
                path.display()
            ));
        }
    }
    Ok(())
}
