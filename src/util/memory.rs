//! Memory as the OS sees it: this process's resident set (now and at its peak) and which pages of
//! a memory map are resident, so reports can tell mapped weight pages from anonymous memory.

/// One `/proc/self/status` field in bytes (`VmRSS`, `VmHWM`, `RssAnon`, `RssFile`).
fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Peak resident set size of this process (VmHWM), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    status_bytes("VmHWM:")
}

/// Resident set size now (VmRSS).
pub fn rss_bytes() -> Option<u64> {
    status_bytes("VmRSS:")
}

/// Resets the peak resident set size to the current one (Linux ≥ 4.0), so a later
/// [`peak_rss_bytes`] covers only what follows (e.g. a benchmark after an in-process
/// quantization, whose f32 model is gone). Returns whether the OS accepted it.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Gives the heap's free pages back to the OS. glibc keeps freed small allocations (a
/// tokenizer's construction leaves tens of MB) in the process, where they count in its RSS
/// for good; a loader that builds large transient structures calls this once it is done.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}

const PAGE: usize = 4096;

/// Bytes of `[ptr, ptr + len)` whose pages are resident (`mincore`); `None` where the OS
/// cannot tell.
pub fn resident_bytes(ptr: *const u8, len: usize) -> Option<usize> {
    if len == 0 {
        return Some(0);
    }
    let start = ptr as usize / PAGE * PAGE;
    let end = (ptr as usize + len).div_ceil(PAGE) * PAGE;
    let pages = (end - start) / PAGE;
    let mut vec = vec![0u8; pages];
    // SAFETY: mincore only reads the page tables for the given range, which lies inside a live
    // mapping the caller holds (rounded out to whole pages, all of which belong to the map,
    // because maps are page-granular); `vec` has one byte per page.
    let rc = unsafe { libc::mincore(start as *mut libc::c_void, end - start, vec.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    let resident = vec.iter().filter(|&&b| b & 1 == 1).count();
    Some(resident * PAGE)
}

/// What a run holds in memory, for reports: the weights (owned, mapped, mapped and resident),
/// the KV cache and the process's resident set now and at its peak.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct MemoryReport {
    pub weights_owned_bytes: usize,
    pub weights_mapped_bytes: usize,
    /// Mapped weight bytes in the page cache (resident for any process; what a cgroup counts).
    pub weights_mapped_resident_bytes: usize,
    pub kv_bytes: usize,
    pub rss_bytes: Option<u64>,
    /// The anonymous part of the resident set (owned memory).
    pub rss_anon_bytes: Option<u64>,
    /// The file-backed part (mapped weight pages this process touched, and the binary).
    pub rss_file_bytes: Option<u64>,
    pub peak_rss_bytes: Option<u64>,
}

impl MemoryReport {
    pub fn new(weights: crate::model::WeightMemory, kv_bytes: usize) -> MemoryReport {
        MemoryReport {
            weights_owned_bytes: weights.owned_bytes,
            weights_mapped_bytes: weights.mapped_bytes,
            weights_mapped_resident_bytes: weights.mapped_resident_bytes,
            kv_bytes,
            rss_bytes: rss_bytes(),
            rss_anon_bytes: status_bytes("RssAnon:"),
            rss_file_bytes: status_bytes("RssFile:"),
            peak_rss_bytes: peak_rss_bytes(),
        }
    }
}

impl std::fmt::Display for MemoryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
        let opt = |b: Option<u64>| b.map_or("?".to_string(), |b| format!("{:.1}", mib(b as usize)));
        write!(
            f,
            "memory: weights {:.1} MiB owned + {:.1} MiB mapped ({:.1} MiB of it in the page cache), KV {:.1} MiB; RSS {} MiB ({} anonymous, {} mapped files), peak {} MiB",
            mib(self.weights_owned_bytes),
            mib(self.weights_mapped_bytes),
            mib(self.weights_mapped_resident_bytes),
            mib(self.kv_bytes),
            opt(self.rss_bytes),
            opt(self.rss_anon_bytes),
            opt(self.rss_file_bytes),
            opt(self.peak_rss_bytes),
        )
    }
}
