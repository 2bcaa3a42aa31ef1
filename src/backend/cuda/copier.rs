//! Expert weights to the device off the compute stream: the int8 bytes of a fetched expert are
//! staged in page-locked host buffers (a ring, so several copies are in flight) and copied with
//! `cudaMemcpyAsync` on a dedicated copy stream. cudarc records a write event on the destination
//! for the copy stream, and a kernel that reads it on the compute stream waits for that event,
//! so a copy is ordered before its use without the host waiting.
//!
//! The ring's buffers are write-combined (`alloc_pinned`): fast for the CPU to write once and
//! for the GPU to read, never read back by the CPU.

use super::device::{driver_error, Gpu};
use crate::error::{Error, Result};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, PinnedHostSlice};
use std::sync::{Arc, Mutex};

/// Staging buffers in the ring: how many copies may be queued at once.
const RING: usize = 4;

pub struct ExpertCopier {
    stream: Arc<CudaStream>,
    ring: Mutex<Ring>,
}

/// A staging buffer and the event recorded after the copy that last read it.
type Staging = (PinnedHostSlice<i8>, Option<CudaEvent>);

struct Ring {
    buffers: Vec<Option<Staging>>,
    next: usize,
}

impl ExpertCopier {
    pub fn new(gpu: &Gpu) -> Result<ExpertCopier> {
        let stream = gpu
            .ctx
            .new_stream()
            .map_err(|e| driver_error("creating the expert copy stream", e))?;
        Ok(ExpertCopier {
            stream,
            ring: Mutex::new(Ring {
                buffers: (0..RING).map(|_| None).collect(),
                next: 0,
            }),
        })
    }

    /// A device copy of `data` (`what` names it in errors), queued on the copy stream through
    /// the next staging buffer of the ring (which first waits for that buffer's previous copy).
    pub fn upload_i8(&self, gpu: &Gpu, data: &[i8], what: &str) -> Result<CudaSlice<i8>> {
        if data.is_empty() {
            return gpu.upload(data, what);
        }
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let at = ring.next;
        ring.next = (at + 1) % RING;
        let slot = &mut ring.buffers[at];
        if slot.as_ref().is_none_or(|(b, _)| b.len() < data.len()) {
            if let Some((_, Some(done))) = slot.as_ref() {
                done.synchronize()
                    .map_err(|e| driver_error("waiting for a staging buffer", e))?;
            }
            // SAFETY: the buffer is written below before any copy reads it.
            let fresh = unsafe { gpu.ctx.alloc_pinned::<i8>(data.len()) }.map_err(|e| {
                Error::invalid(format!(
                    "allocating {} bytes of page-locked memory for {what}: {e}",
                    data.len()
                ))
            })?;
            *slot = Some((fresh, None));
        }
        let (staging, last_copy) = slot
            .as_mut()
            .ok_or_else(|| Error::invalid("the staging ring lost a buffer"))?;
        // The copy that last read this buffer must have finished before it is overwritten.
        if let Some(done) = last_copy.take() {
            done.synchronize()
                .map_err(|e| driver_error("waiting for a staging buffer", e))?;
        }
        let host = staging
            .as_mut_slice()
            .map_err(|e| driver_error("writing a staging buffer", e))?;
        host[..data.len()].copy_from_slice(data);
        // SAFETY: fully overwritten by the copy queued next on the same stream.
        let mut dst = unsafe { self.stream.alloc::<i8>(data.len()) }.map_err(|e| {
            Error::invalid(format!(
                "the GPU has no room for {what} ({} bytes): {e}",
                data.len()
            ))
        })?;
        // Page-locked source: the copy is asynchronous, and the event below keeps the buffer
        // from being rewritten until it is done.
        self.stream
            .memcpy_htod(&host[..data.len()], &mut dst)
            .map_err(|e| driver_error(&format!("copying {what} to the GPU"), e))?;
        *last_copy = Some(
            self.stream
                .record_event(None)
                .map_err(|e| driver_error("recording an expert copy", e))?,
        );
        Ok(dst)
    }

    /// The copy stream (the tier times copies with events on it).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits until every queued copy has landed (tests and the copy-bandwidth probe).
    pub fn sync(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_error("waiting for expert copies", e))
    }
}

impl Drop for ExpertCopier {
    fn drop(&mut self) {
        // The staging buffers must outlive the copies that read them.
        let _ = self.stream.synchronize();
    }
}
