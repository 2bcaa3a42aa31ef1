//! Where a weight's values live: in memory the process owns, or in place inside a memory-mapped
//! checkpoint that stays mapped as long as any weight points into it. A mapped weight costs no
//! memory beyond the pages its kernels touch, and the OS may drop those pages again under
//! pressure (they are clean copies of the file).

use memmap2::Mmap;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

/// Element types a mapped byte range may be viewed as: plain little-endian numbers for which
/// every bit pattern is a valid value.
pub trait Plain: Copy + Send + Sync + 'static {}
impl Plain for f32 {}
impl Plain for i8 {}
impl Plain for i32 {}
impl Plain for u16 {}
impl Plain for u8 {}

/// The values' bytes in the host's order (little-endian on every host we map files on).
pub fn bytes_of<T: Plain>(values: &[T]) -> &[u8] {
    // SAFETY: `T: Plain` is a plain number type without padding, so its memory is
    // `size_of_val(values)` initialized bytes, borrowed for as long as `values` is.
    unsafe {
        std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
    }
}

/// The two 16-bit float formats checkpoints store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HalfKind {
    /// bfloat16: the top 16 bits of an f32.
    Bf16,
    /// IEEE half precision.
    F16,
}

impl HalfKind {
    #[inline]
    pub fn to_f32(self, bits: u16) -> f32 {
        match self {
            HalfKind::Bf16 => f32::from_bits(u32::from(bits) << 16),
            HalfKind::F16 => half::f16::from_bits(bits).to_f32(),
        }
    }

    /// `v` rounded to the nearest value of this format (ties to even).
    pub fn from_f32(self, v: f32) -> u16 {
        match self {
            HalfKind::Bf16 => half::bf16::from_f32(v).to_bits(),
            HalfKind::F16 => half::f16::from_f32(v).to_bits(),
        }
    }

    /// The values widened to f32 (a copy).
    pub fn widen(self, bits: &[u16]) -> Vec<f32> {
        bits.iter().map(|&b| self.to_f32(b)).collect()
    }
}

/// A read-only file mapping shared by every weight that lives in it.
pub type SharedMap = Arc<Mmap>;

/// A private read-only map holding a copy of `bytes`: page-aligned, so values inside it at
/// offsets aligned for their type can be used in place like those of a mapped file.
pub fn map_copy_of(bytes: &[u8]) -> std::io::Result<SharedMap> {
    let mut map = memmap2::MmapMut::map_anon(bytes.len().max(1))?;
    map[..bytes.len()].copy_from_slice(bytes);
    Ok(Arc::new(map.make_read_only()?))
}

/// `len` values of `T`, owned or borrowed from a map.
pub enum Buf<T: Plain> {
    Owned(Vec<T>),
    Mapped {
        map: SharedMap,
        /// Byte offset into the map; a multiple of `align_of::<T>()` from the map's start.
        offset: usize,
        len: usize,
    },
}

impl<T: Plain> Buf<T> {
    /// `len` values at byte `offset` of `map`, if they lie inside it, are aligned for `T` and
    /// the host is little-endian (the formats we map are); `None` otherwise (copy instead).
    pub fn mapped(map: &SharedMap, offset: usize, len: usize) -> Option<Buf<T>> {
        let bytes = len.checked_mul(std::mem::size_of::<T>())?;
        let end = offset.checked_add(bytes)?;
        let aligned = (map.as_ptr() as usize + offset).is_multiple_of(std::mem::align_of::<T>());
        (end <= map.len() && aligned && cfg!(target_endian = "little")).then(|| Buf::Mapped {
            map: map.clone(),
            offset,
            len,
        })
    }

    /// Values `start..start + len`: in place for a mapped buffer, copied from an owned one;
    /// `None` past the end.
    pub fn slice(&self, start: usize, len: usize) -> Option<Buf<T>> {
        let end = start.checked_add(len)?;
        if end > self.len() {
            return None;
        }
        Some(match self {
            Buf::Owned(v) => Buf::Owned(v[start..end].to_vec()),
            Buf::Mapped { map, offset, .. } => Buf::Mapped {
                map: map.clone(),
                offset: offset + start * std::mem::size_of::<T>(),
                len,
            },
        })
    }

    /// Whether the values live in a map.
    pub fn is_mapped(&self) -> bool {
        matches!(self, Buf::Mapped { .. })
    }

    /// Bytes the values take.
    pub fn byte_len(&self) -> usize {
        self.len() * std::mem::size_of::<T>()
    }

    /// The values, mutable: a mapped buffer is first copied into owned memory.
    pub fn make_mut(&mut self) -> &mut Vec<T> {
        if let Buf::Mapped { .. } = self {
            *self = Buf::Owned(self.to_vec());
        }
        match self {
            Buf::Owned(v) => v,
            Buf::Mapped { .. } => unreachable!("converted to owned above"),
        }
    }

    /// The map and byte range behind a mapped buffer.
    pub fn mapping(&self) -> Option<(&SharedMap, usize, usize)> {
        match self {
            Buf::Owned(_) => None,
            Buf::Mapped { map, offset, len } => Some((map, *offset, len * size_of::<T>())),
        }
    }
}

impl<T: Plain> Deref for Buf<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match self {
            Buf::Owned(v) => v,
            // SAFETY: `mapped` checked that the range lies inside the map and is aligned for
            // `T`; every bit pattern is a valid `T` (`Plain`); the map is read-only and lives
            // as long as `self` holds its Arc.
            Buf::Mapped { map, offset, len } => unsafe {
                std::slice::from_raw_parts(map.as_ptr().add(*offset).cast::<T>(), *len)
            },
        }
    }
}

impl<T: Plain> From<Vec<T>> for Buf<T> {
    fn from(v: Vec<T>) -> Self {
        Buf::Owned(v)
    }
}

impl<T: Plain> Default for Buf<T> {
    fn default() -> Self {
        Buf::Owned(Vec::new())
    }
}

impl<T: Plain> Clone for Buf<T> {
    fn clone(&self) -> Self {
        match self {
            Buf::Owned(v) => Buf::Owned(v.clone()),
            Buf::Mapped { map, offset, len } => Buf::Mapped {
                map: map.clone(),
                offset: *offset,
                len: *len,
            },
        }
    }
}

impl<T: Plain + PartialEq> PartialEq for Buf<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: Plain> fmt::Debug for Buf<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = if self.is_mapped() { "mapped" } else { "owned" };
        write!(
            f,
            "Buf({} × {}, {how})",
            self.len(),
            std::any::type_name::<T>()
        )
    }
}

/// Why `path` cannot be memory-mapped as a model file (a directory, a device, a FIFO), or
/// `None` for a regular file or one that does not exist (opening it then says so).
pub fn not_mappable(path: &std::path::Path) -> Option<&'static str> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_dir() {
        Some("it is a directory")
    } else if !meta.is_file() {
        Some("it is not a regular file")
    } else {
        None
    }
}

/// Tells the OS it may drop the pages of `map` that lie wholly inside `[offset, offset+len)`:
/// used after a tensor was converted into another layout, so the file's pages it was read from
/// stop counting as resident. They are clean file pages, so a later read faults them back in.
pub fn release_pages(map: &Mmap, offset: usize, len: usize) {
    const PAGE: usize = 4096;
    let start = offset.div_ceil(PAGE) * PAGE;
    let end = (offset + len) / PAGE * PAGE;
    if end > start && end <= map.len() {
        // SAFETY: the map is a read-only shared file mapping: DONTNEED only drops cached copies
        // of file pages, which read back unchanged; no reference we hand out sees new contents.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn map_of(bytes: &[u8]) -> SharedMap {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        Arc::new(unsafe { Mmap::map(&f) }.unwrap())
    }

    #[test]
    fn maps_aligned_ranges_and_refuses_others() {
        let values: Vec<u8> = (1..=8)
            .map(|i| i as f32)
            .flat_map(f32::to_le_bytes)
            .collect();
        let map = map_of(&values);
        let b = Buf::<f32>::mapped(&map, 4, 3).unwrap();
        assert_eq!(&*b, &[2.0, 3.0, 4.0]);
        assert!(b.is_mapped());
        assert_eq!(b.byte_len(), 12);
        assert!(Buf::<f32>::mapped(&map, 2, 1).is_none(), "misaligned");
        assert!(Buf::<f32>::mapped(&map, 28, 2).is_none(), "past the end");
        assert!(
            Buf::<f32>::mapped(&map, 0, usize::MAX).is_none(),
            "overflow"
        );
        let mut owned = b.clone();
        owned.make_mut()[0] = -1.0;
        assert!(!owned.is_mapped());
        assert_eq!(&*owned, &[-1.0, 3.0, 4.0]);
        assert_eq!(&*b, &[2.0, 3.0, 4.0], "the map is untouched");
        release_pages(&map, 0, map.len());
        assert_eq!(&*b, &[2.0, 3.0, 4.0], "released pages read back");
    }
}
