//! Agent output. An agent writes its stdout and stderr straight into `stdout.log` and
//! `stderr.log` in its folder, so it never waits on agentd and keeps writing across agentd
//! restarts. Every byte has a fixed offset in its stream for good.
//!
//! Rotation never moves the agent's file: once `stdout.log` holds more than `max_bytes` past
//! its oldest kept byte, that span is copied (in the kernel) into a segment file named by its
//! first offset, `stdout.log.<offset>`, and then punched out of `stdout.log` as a hole, which
//! frees the disk blocks while every later offset stays where it was. Segments past `keep`
//! are deleted. Readers look up an offset in the segments first, then in the main file, so a
//! follower never misses or repeats a byte across a rotation.

use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{FallocateFlags, fallocate};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::files::{no_follow, open_for_reading, open_for_writing};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogStream {
    Stdout,
    Stderr,
}

impl LogStream {
    pub fn file_name(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout.log",
            LogStream::Stderr => "stderr.log",
        }
    }
}

/// How much output is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRotation {
    /// Bytes the main file may hold before the oldest of them move to a segment.
    pub max_bytes: u64,
    /// Segments kept besides the main file.
    pub keep: usize,
}

impl Default for LogRotation {
    fn default() -> Self {
        LogRotation {
            max_bytes: 64 * 1024 * 1024,
            keep: 4,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(
        "output before offset {first} of this stream is no longer kept (asked for offset {offset})"
    )]
    Gone { offset: u64, first: u64 },
    #[error("reading agent output: {0}")]
    Io(#[from] io::Error),
}

/// A rotated span of a stream: bytes `start..start + len`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Segment {
    start: u64,
    len: u64,
    path: PathBuf,
}

impl Segment {
    fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// One stream of one agent, read by offset.
#[derive(Debug, Clone)]
pub struct LogFile {
    dir: PathBuf,
    stream: LogStream,
}

impl LogFile {
    pub fn new(dir: &Path, stream: LogStream) -> LogFile {
        LogFile {
            dir: dir.to_path_buf(),
            stream,
        }
    }

    fn main_path(&self) -> PathBuf {
        self.dir.join(self.stream.file_name())
    }

    /// The stream's segments, oldest first.
    fn segments(&self) -> io::Result<Vec<Segment>> {
        let prefix = format!("{}.", self.stream.file_name());
        let mut segments = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(segments),
            Err(error) => return Err(error),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let Some(start) = name
                .to_str()
                .and_then(|name| name.strip_prefix(&prefix))
                .and_then(|offset| offset.parse::<u64>().ok())
            else {
                continue;
            };
            // A segment deleted by a rotation meanwhile is simply not there any more.
            let len = match entry.metadata() {
                Ok(meta) => meta.len(),
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => return Err(error),
            };
            segments.push(Segment {
                start,
                len,
                path: entry.path(),
            });
        }
        segments.sort_by_key(|segment| segment.start);
        Ok(segments)
    }

    /// The offset the main file's kept bytes start at: the end of the newest segment.
    fn main_start(segments: &[Segment]) -> u64 {
        segments.last().map_or(0, Segment::end)
    }

    /// The oldest offset still kept.
    pub fn first_offset(&self) -> io::Result<u64> {
        let segments = self.segments()?;
        Ok(segments
            .first()
            .map_or_else(|| Self::main_start(&segments), |s| s.start))
    }

    /// The offset the next byte written will have.
    pub fn end_offset(&self) -> io::Result<u64> {
        match std::fs::metadata(self.main_path()) {
            Ok(meta) => Ok(meta.len()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(error) => Err(error),
        }
    }

    /// Reads bytes from `offset` on; 0 at the end.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, LogError> {
        loop {
            let segments = self.segments()?;
            let first = segments
                .first()
                .map_or_else(|| Self::main_start(&segments), |s| s.start);
            if offset < first {
                return Err(LogError::Gone { offset, first });
            }
            if let Some(segment) = segments
                .iter()
                .find(|s| s.start <= offset && offset < s.end())
            {
                let wanted = buf.len().min((segment.end() - offset) as usize);
                let file = match open_for_reading(&segment.path) {
                    Ok(file) => file,
                    // Deleted by a rotation since the listing: look again.
                    Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                    Err(error) => return Err(error.into()),
                };
                return Ok(file.read_at(&mut buf[..wanted], offset - segment.start)?);
            }
            let main = match open_for_reading(&self.main_path()) {
                Ok(main) => main,
                Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(0),
                Err(error) => return Err(error.into()),
            };
            let read = main.read_at(buf, offset)?;
            // A rotation may have punched this span out while we read it; it renames the
            // segment into place first, so if one now covers the offset, read from there.
            if Self::main_start(&self.segments()?) > offset {
                continue;
            }
            return Ok(read);
        }
    }

    /// The offset of the first of the last `lines` lines (a last line without a newline
    /// counts), or the oldest kept offset when there are fewer.
    pub fn tail_offset(&self, lines: u32) -> Result<u64, LogError> {
        let first = self.first_offset()?;
        let end = self.end_offset()?;
        if lines == 0 || end <= first {
            return Ok(end);
        }
        let mut last = [0u8; 1];
        self.read_at(end - 1, &mut last)?;
        // A final newline ends the last line; it does not start another.
        let mut scan_end = if last[0] == b'\n' { end - 1 } else { end };
        let mut remaining = lines;
        let mut block = vec![0u8; 64 * 1024];
        while scan_end > first {
            let start = scan_end.saturating_sub(block.len() as u64).max(first);
            let len = (scan_end - start) as usize;
            let mut filled = 0;
            while filled < len {
                let read = self.read_at(start + filled as u64, &mut block[filled..len])?;
                if read == 0 {
                    break;
                }
                filled += read;
            }
            for (index, byte) in block[..filled].iter().enumerate().rev() {
                if *byte == b'\n' {
                    remaining -= 1;
                    if remaining == 0 {
                        return Ok(start + index as u64 + 1);
                    }
                }
            }
            scan_end = start;
        }
        Ok(first)
    }

    /// Moves the oldest bytes of the main file into a segment once it holds more than the
    /// limit, and deletes segments past `keep`. Returns whether it rotated.
    pub fn rotate(&self, rotation: LogRotation) -> io::Result<bool> {
        // The cheap check first: a stream that never grew past the limit needs no listing.
        if self.end_offset()? <= rotation.max_bytes {
            return Ok(false);
        }
        let mut segments = self.segments()?;
        let start = Self::main_start(&segments);
        let end = self.end_offset()?;
        if end.saturating_sub(start) <= rotation.max_bytes {
            return Ok(false);
        }
        let segment_path = self
            .dir
            .join(format!("{}.{start}", self.stream.file_name()));
        let partial = segment_path.with_extension("partial");
        let mut main = open_for_reading(&self.main_path())?;
        main.seek(SeekFrom::Start(start))?;
        // The segment belongs to whoever owns the output: the agent's user.
        let owner = {
            use std::os::unix::fs::MetadataExt;
            let meta = main.metadata()?;
            (meta.uid(), meta.gid())
        };
        let mut copy = open_for_writing(
            no_follow().write(true).create(true).truncate(true),
            &partial,
            Some(owner),
        )?;
        // `io::copy` between files uses copy_file_range: no bytes pass through agentd.
        let copied = io::copy(&mut (&mut main).take(end - start), &mut copy)?;
        std::fs::rename(&partial, &segment_path)?;
        let main = open_for_writing(no_follow().write(true), &self.main_path(), None)?;
        // Punching everything before `start + copied` also frees what an earlier rotation
        // that was interrupted before its punch left behind.
        let punched = fallocate(
            main.as_fd(),
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            0,
            i64::try_from(start + copied).unwrap_or(i64::MAX),
        );
        if let Err(errno) = punched {
            tracing::warn!(
                file = %self.main_path().display(),
                %errno,
                "this filesystem cannot punch holes: rotated output stays on disk in the main file"
            );
        }
        segments.push(Segment {
            start,
            len: copied,
            path: segment_path,
        });
        while segments.len() > rotation.keep {
            let oldest = segments.remove(0);
            std::fs::remove_file(&oldest.path)?;
        }
        Ok(true)
    }
}

/// Wakes when anything in an agent's folder changes (output written, a rotation), so a
/// follower waits on the kernel rather than polling.
pub struct FolderWatch {
    inotify: AsyncFd<InotifyFd>,
}

pub(crate) struct InotifyFd(pub(crate) Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl FolderWatch {
    pub fn new(dir: &Path) -> io::Result<FolderWatch> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        inotify.add_watch(
            dir,
            AddWatchFlags::IN_MODIFY
                | AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_CLOSE_WRITE,
        )?;
        // SAFETY: the inotify descriptor is valid and owned by `InotifyFd`, which the
        // `AsyncFd` owns until it is dropped.
        let inotify =
            unsafe { AsyncFd::register_with_interest(InotifyFd(inotify), Interest::READABLE) }
                .map_err(io::Error::from)?;
        Ok(FolderWatch { inotify })
    }

    /// Waits for the next change (changes since the last call count).
    pub async fn changed(&mut self) -> io::Result<()> {
        loop {
            let mut ready = self.inotify.readable().await?;
            match ready.get_inner().0.read_events() {
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EAGAIN) => ready.clear_ready(),
                Err(errno) => return Err(errno.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Write;

    fn read_all(log: &LogFile, mut offset: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 7];
        loop {
            let read = log.read_at(offset, &mut buf).expect("read");
            if read == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..read]);
            offset += read as u64;
        }
    }

    #[test]
    fn rotation_keeps_every_offset_readable_and_frees_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = LogFile::new(dir.path(), LogStream::Stdout);
        let mut writer = File::create(dir.path().join("stdout.log")).expect("create");
        let rotation = LogRotation {
            max_bytes: 100,
            keep: 2,
        };
        let mut expected = Vec::new();
        for line in 0..200 {
            let text = format!("line {line}\n");
            writer.write_all(text.as_bytes()).expect("write");
            expected.extend_from_slice(text.as_bytes());
            log.rotate(rotation).expect("rotate");
        }
        let segments = log.segments().expect("segments");
        assert_eq!(segments.len(), 2);
        let first = log.first_offset().expect("first");
        assert_eq!(read_all(&log, first), expected[first as usize..]);
        assert!(matches!(
            log.read_at(0, &mut [0u8; 4]),
            Err(LogError::Gone { .. })
        ));
        assert_eq!(log.end_offset().expect("end"), expected.len() as u64);
    }

    #[test]
    fn tail_finds_the_last_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = LogFile::new(dir.path(), LogStream::Stderr);
        std::fs::write(dir.path().join("stderr.log"), "a\nbb\nccc\n").expect("write");
        assert_eq!(log.tail_offset(1).expect("tail"), 5);
        assert_eq!(log.tail_offset(2).expect("tail"), 2);
        assert_eq!(log.tail_offset(10).expect("tail"), 0);
        assert_eq!(log.tail_offset(0).expect("tail"), 9);
        std::fs::write(dir.path().join("stderr.log"), "a\nno newline").expect("write");
        assert_eq!(log.tail_offset(1).expect("tail"), 2);
    }
}
