//! Quantized layers moved out of process memory as they are finished. Each layer's int8
//! buffers (weights, scales, row sums) are written to an unlinked file beside the output and
//! used from a read-only map from then on; once the next layer's calibration inputs have been
//! computed, the map's pages are dropped from the process. Quantizing then holds one layer in
//! memory, not the growing int8 model (a Mixtral's int8 experts are half its bf16 size).

use crate::error::{Error, Result};
use crate::model::buf::{bytes_of, release_pages, Buf, Plain, SharedMap};
use crate::model::weights::{Linear, LinearWeight};
use memmap2::Mmap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where each buffer starts in a spill file: a cache line, as the kernels' rows expect.
const ALIGN: usize = 64;

pub struct Spill {
    dir: PathBuf,
    /// Files written so far (they are unlinked: the maps keep them alive).
    count: usize,
    last: Option<SharedMap>,
}

impl Spill {
    /// Spills into files in `dir` (the output's folder: the same disk as the result).
    pub fn new(dir: &Path) -> Spill {
        Spill {
            dir: dir.to_path_buf(),
            count: 0,
            last: None,
        }
    }

    /// Moves the int8 buffers of `linears` into one new file and points them at its map.
    /// Values are unchanged: the layer computes exactly as before.
    pub fn take(&mut self, linears: Vec<&mut Linear>) -> Result<()> {
        let (file, path) = self.create()?;
        let fail = |e: std::io::Error| Error::io(&path, e);
        let mut out = Placed {
            w: BufWriter::with_capacity(1 << 20, &file),
            pos: 0,
        };
        let mut placed = Vec::new();
        let mut placed4 = Vec::new();
        for lin in &linears {
            if let LinearWeight::Int8(m) | LinearWeight::Int8WeightOnly(m) = &lin.weight {
                let data = out.put(&m.data).map_err(fail)?;
                let scales = out.put(&m.scales).map_err(fail)?;
                let sums = out.put(&m.row_sums).map_err(fail)?;
                placed.push((data, scales, sums));
            }
            if let LinearWeight::Int4(m) = &lin.weight {
                let data = out.put(&m.data).map_err(fail)?;
                let scales = out.put(&m.scales).map_err(fail)?;
                let zeros = match &m.zeros {
                    Some(z) => Some(out.put(z).map_err(fail)?),
                    None => None,
                };
                placed4.push((data, scales, zeros));
            }
        }
        out.w.flush().map_err(fail)?;
        drop(out);
        if placed.is_empty() && placed4.is_empty() {
            return Ok(());
        }
        // SAFETY: the file is ours alone (created new, then unlinked) and is never written
        // again, so the map's contents cannot change under the references it hands out.
        let map: SharedMap = Arc::new(unsafe { Mmap::map(&file) }.map_err(fail)?);
        let mut placed = placed.into_iter();
        let mut placed4 = placed4.into_iter();
        for lin in linears {
            if let LinearWeight::Int4(m) = &mut lin.weight {
                let Some((data, scales, zeros)) = placed4.next() else {
                    break;
                };
                let z = match (&m.zeros, zeros) {
                    (Some(z), Some(at)) => Buf::mapped(&map, at, z.len()).map(Some),
                    _ => Some(None),
                };
                if let (Some(d), Some(s), Some(z)) = (
                    Buf::mapped(&map, data, m.data.len()),
                    Buf::mapped(&map, scales, m.scales.len()),
                    z,
                ) {
                    (m.data, m.scales, m.zeros) = (d, s, z);
                }
                continue;
            }
            if let LinearWeight::Int8(m) | LinearWeight::Int8WeightOnly(m) = &mut lin.weight {
                let Some((data, scales, sums)) = placed.next() else {
                    break;
                };
                // On a host where a view is refused (big-endian), the owned buffers stay.
                if let (Some(d), Some(s), Some(r)) = (
                    Buf::mapped(&map, data, m.data.len()),
                    Buf::mapped(&map, scales, m.scales.len()),
                    Buf::mapped(&map, sums, m.row_sums.len()),
                ) {
                    (m.data, m.scales, m.row_sums) = (d, s, r);
                }
            }
        }
        self.last = Some(map);
        Ok(())
    }

    /// Drops the pages of the last spilled layer from the process (once it has been run for
    /// the next layer's inputs); they are read back from the file when written out.
    pub fn release_last(&mut self) {
        if let Some(map) = self.last.take() {
            release_pages(&map, 0, map.len());
        }
    }

    /// A new file in the spill folder, already unlinked, so nothing is left behind whatever
    /// happens to the process.
    fn create(&mut self) -> Result<(File, PathBuf)> {
        self.count += 1;
        let path = self.dir.join(format!(
            ".edgemoe-quantize-{}-{}.spill",
            std::process::id(),
            self.count
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        Ok((file, path))
    }
}

/// A writer that aligns each buffer and returns where it put it.
struct Placed<'f> {
    w: BufWriter<&'f File>,
    pos: usize,
}

impl Placed<'_> {
    fn put<T: Plain>(&mut self, values: &[T]) -> std::io::Result<usize> {
        const ZEROS: [u8; ALIGN] = [0; ALIGN];
        let start = self.pos.div_ceil(ALIGN) * ALIGN;
        self.w.write_all(&ZEROS[..start - self.pos])?;
        let bytes = bytes_of(values);
        self.w.write_all(bytes)?;
        self.pos = start + bytes.len();
        Ok(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::int8::Int8Matrix;

    fn int8_linear(name: &str, n: usize, k: usize, seed: i32) -> Linear {
        let q: Vec<i8> = (0..n * k)
            .map(|i| ((i as i32 * 37 + seed) % 255 - 127) as i8)
            .collect();
        let scales = (0..n).map(|j| 0.01 + j as f32 * 1e-3).collect();
        let m = Int8Matrix::from_quantized(n, k, &q, scales).unwrap();
        let mut lin = Linear::new(name, n, k, vec![0.0; n * k], None);
        lin.weight = LinearWeight::Int8(m);
        lin
    }

    fn matrix(lin: &Linear) -> &Int8Matrix {
        match &lin.weight {
            LinearWeight::Int8(m) | LinearWeight::Int8WeightOnly(m) => m,
            _ => panic!("not int8"),
        }
    }

    #[test]
    fn spilled_buffers_are_mapped_and_equal() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = int8_linear("a", 5, 70, 3);
        let mut b = int8_linear("b", 3, 33, 11);
        let mut f32_lin = Linear::new("c", 2, 2, vec![1.0, 2.0, 3.0, 4.0], None);
        let (ma, mb) = (matrix(&a).clone(), matrix(&b).clone());
        let mut spill = Spill::new(dir.path());
        spill.take(vec![&mut a, &mut f32_lin, &mut b]).unwrap();
        for (lin, before) in [(&a, &ma), (&b, &mb)] {
            let m = matrix(lin);
            assert!(m.data.is_mapped() && m.scales.is_mapped() && m.row_sums.is_mapped());
            assert_eq!(m, before);
        }
        assert_eq!(f32_lin.f32_rows().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        spill.release_last();
        assert_eq!(matrix(&a), &ma, "pages read back after release");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "spill files are unlinked: {left:?}");
    }
}
