//! Reads expert blocks from the .emoe file into memory edgemoe owns, past the page cache, so the
//! bytes read do not stay charged to the process (under a cgroup, page cache counts against the
//! limit and the OS would otherwise keep every block read).
//!
//! Two ways: `O_DIRECT` (offset, length and buffer 4096-aligned; the disk DMAs straight into the
//! slot, nothing enters the page cache) and `pread` followed by `posix_fadvise(DONTNEED)` (the
//! bytes pass through the page cache and are dropped right after; works on file systems without
//! O_DIRECT, e.g. tmpfs). Direct is the default; a file system that refuses it falls back.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Alignment O_DIRECT needs of offset, length and buffer.
pub const DIRECT_ALIGN: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadMode {
    /// O_DIRECT into aligned slots.
    Direct,
    /// pread, then posix_fadvise(DONTNEED) on the range.
    Pread,
}

pub struct BlockReader {
    buffered: File,
    direct: Option<File>,
    /// Set once the file system refused an O_DIRECT read: later reads go buffered.
    direct_failed: AtomicBool,
}

impl BlockReader {
    pub fn open(path: &Path, mode: ReadMode) -> std::io::Result<BlockReader> {
        let buffered = File::open(path)?;
        let direct = match mode {
            ReadMode::Direct => std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
                .ok(),
            ReadMode::Pread => None,
        };
        Ok(BlockReader {
            buffered,
            direct,
            direct_failed: AtomicBool::new(false),
        })
    }

    /// The mode reads actually use.
    pub fn mode(&self) -> ReadMode {
        if self.direct.is_some() && !self.direct_failed.load(Ordering::Relaxed) {
            ReadMode::Direct
        } else {
            ReadMode::Pread
        }
    }

    /// Reads `len` bytes at `offset` into the start of `buf`; `offset` and `buf`'s address are
    /// 4096-aligned and `buf` holds `len` rounded up to 4096 (the direct read's length).
    pub fn read(&self, buf: &mut [u8], offset: u64, len: usize) -> std::io::Result<()> {
        debug_assert!(offset.is_multiple_of(DIRECT_ALIGN as u64));
        debug_assert!((buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN));
        if self.mode() == ReadMode::Direct {
            match self.read_direct(buf, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct_failed.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        self.buffered.read_exact_at(&mut buf[..len], offset)?;
        self.drop_cached(offset, len);
        Ok(())
    }

    /// Drops the page cache's copy of `[offset, offset + len)` (pages nobody maps).
    pub fn drop_cached(&self, offset: u64, len: usize) {
        // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is open.
        unsafe {
            libc::posix_fadvise(
                self.buffered.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            );
        }
    }

    fn read_direct(&self, buf: &mut [u8], offset: u64, len: usize) -> std::io::Result<()> {
        let Some(file) = &self.direct else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        };
        let want = len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        let mut done = 0;
        while done < len {
            // Whole pages; the file's last block may end before `want` (a short read at EOF).
            let n = file.read_at(&mut buf[done..want], offset + done as u64)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Both modes read the same bytes, including a block that ends mid-page at the end of file.
    #[test]
    fn direct_and_buffered_reads_agree() {
        let bytes: Vec<u8> = (0..3 * DIRECT_ALIGN + 100)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&bytes).unwrap();
        f.flush().unwrap();
        let mut slot = memmap2::MmapMut::map_anon(4 * DIRECT_ALIGN).unwrap();
        for mode in [ReadMode::Direct, ReadMode::Pread] {
            let r = BlockReader::open(f.path(), mode).unwrap();
            slot.fill(0);
            r.read(&mut slot, DIRECT_ALIGN as u64, 2 * DIRECT_ALIGN + 100)
                .unwrap();
            assert_eq!(
                &slot[..2 * DIRECT_ALIGN + 100],
                &bytes[DIRECT_ALIGN..],
                "{mode:?}"
            );
            assert!(r.read(&mut slot, 4 * DIRECT_ALIGN as u64, 10).is_err());
        }
    }
}
