//! The bytes behind one checkpoint file: memory-mapped while the model is
//! built, or positioned reads (`pread`) once an expert provider reads experts
//! on demand for the engine's lifetime. Reads, unlike a map, turn a file
//! truncated or replaced after load into an error naming it instead of SIGBUS,
//! and they are counted.

use std::borrow::Cow;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use memmap2::{Mmap, UncheckedAdvice};

use crate::error::{Error, Result};

/// Bytes read and time spent in positioned reads, shared by every file of
/// one reopened checkpoint.
#[derive(Debug, Default)]
pub struct ReadStats {
    bytes: AtomicU64,
    nanos: AtomicU64,
    reads: AtomicU64,
}

/// A snapshot of [`ReadStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadTotals {
    pub bytes: u64,
    pub nanos: u64,
    /// Positioned reads issued (one per contiguous range).
    pub reads: u64,
}

impl ReadStats {
    /// Counts one read made elsewhere (a packed expert file's) beside these.
    pub fn record(&self, bytes: u64, nanos: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.nanos.fetch_add(nanos, Ordering::Relaxed);
        self.reads.fetch_add(1, Ordering::Relaxed);
    }

    pub fn totals(&self) -> ReadTotals {
        ReadTotals {
            bytes: self.bytes.load(Ordering::Relaxed),
            nanos: self.nanos.load(Ordering::Relaxed),
            reads: self.reads.load(Ordering::Relaxed),
        }
    }
}

pub(crate) enum Backing {
    Mapped(Mmap),
    Reads { file: File, stats: Arc<ReadStats> },
}

impl Backing {
    pub(crate) fn map(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and lives as long as `self`; it is used only
        // while the model is built, and a checkpoint modified on disk during that
        // is outside what any loader can defend against.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Ok(Backing::Mapped(map))
    }

    pub(crate) fn reads(path: &Path, stats: Arc<ReadStats>) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // Experts are read in routing order, not file order: readahead would only
        // read (and count in /proc/self/io) bytes no one asked for. Advice only,
        // so a refusal is not an error.
        // SAFETY: the descriptor is open; fadvise touches no memory of ours.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        Ok(Backing::Reads { file, stats })
    }

    /// The whole mapped file (for parsing headers); `None` for a read backing.
    pub(crate) fn mapped(&self) -> Option<&[u8]> {
        match self {
            Backing::Mapped(map) => Some(map),
            Backing::Reads { .. } => None,
        }
    }

    /// Takes `bytes`, a slice this map lent, out of the process's resident
    /// set (`madvise DONTNEED`) once the caller has converted them: a model
    /// built from a map would otherwise hold every stored byte twice, mapped
    /// and converted. The pages stay in the page cache, and a later touch of
    /// the slice faults them back in from the file, so this is safe whatever
    /// still borrows it. Owned (read) bytes have nothing to release.
    pub(crate) fn release(&self, bytes: &[u8]) {
        let Backing::Mapped(map) = self else {
            return;
        };
        let base = map.as_ptr() as usize;
        let start = bytes.as_ptr() as usize;
        if bytes.is_empty() || start < base || start + bytes.len() > base + map.len() {
            return;
        }
        // Advice only: a refusal costs memory, not correctness.
        // SAFETY: the map is private and read-only, so DONTNEED drops no data;
        // memmap2 rounds the range out to whole pages inside the map.
        let _ = unsafe {
            map.unchecked_advise_range(UncheckedAdvice::DontNeed, start - base, bytes.len())
        };
    }

    /// Asks the kernel to drop the file's cached pages (`posix_fadvise
    /// DONTNEED`), so that the next reads come from the disk: a benchmark's
    /// page cache must not pass for the expert cache. A map has nothing to drop.
    pub(crate) fn drop_cached_pages(&self, path: &Path) -> Result<()> {
        let Backing::Reads { file, .. } = self else {
            return Ok(());
        };
        // SAFETY: the descriptor is open for as long as `file` lives; fadvise
        // only advises the kernel and touches no memory of ours.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if rc != 0 {
            return Err(Error::io(path, std::io::Error::from_raw_os_error(rc)));
        }
        Ok(())
    }

    /// Bytes `start..end` of the file at `path`: borrowed from the map, or read
    /// with one `pread` into a fresh buffer.
    pub(crate) fn range(&self, path: &Path, start: usize, end: usize) -> Result<Cow<'_, [u8]>> {
        match self {
            Backing::Mapped(map) => map.get(start..end).map(Cow::Borrowed).ok_or_else(|| {
                truncated(path, start, end, format!("the map has {} bytes", map.len()))
            }),
            Backing::Reads { file, stats } => {
                let t = Instant::now();
                let mut buf = vec![0u8; end.saturating_sub(start)];
                file.read_exact_at(&mut buf, start as u64).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        let now = file
                            .metadata()
                            .map_or("unknown".to_string(), |m| m.len().to_string());
                        truncated(
                            path,
                            start,
                            end,
                            format!("the file now has {now} bytes (truncated after load?)"),
                        )
                    } else {
                        Error::io(path, e)
                    }
                })?;
                stats.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
                stats
                    .nanos
                    .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                stats.reads.fetch_add(1, Ordering::Relaxed);
                Ok(Cow::Owned(buf))
            }
        }
    }
}

fn truncated(path: &Path, start: usize, end: usize, why: String) -> Error {
    Error::io(
        PathBuf::from(path),
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("cannot read bytes {start}..{end}: {why}"),
        ),
    )
}
