//! How the SIMD tiers walk a product: register tiles of up to 4 activation rows × 4 weight rows,
//! streamed for decode (each weight read from memory once) or blocked for prefill (weights and
//! activations reused from cache). The tiers only provide the tile ([`HalfKernel`]).
//!
//! A tile always covers whole rows of k, so every output is summed the same way whichever tile,
//! blocking or thread it falls in.

#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use std::ops::Range;

use super::{HalfKind, HalfView, Prepared, Sink};

/// Most activation rows and weight rows of a register tile.
pub(super) const MAX_R: usize = 4;
pub(super) const MAX_C: usize = 4;

/// Dot products of one register tile, `[activation row][weight row]`.
pub(super) type Sums = [[f32; MAX_C]; MAX_R];

/// A SIMD tier's register tile.
pub(super) trait HalfKernel {
    /// Activation rows of a tile, at most [`MAX_R`].
    const TILE_ROWS: usize;
    /// Weight rows of a tile when blocked ([`block_tiles`]).
    const BLOCK_COLS: usize;

    /// Weight rows of a streaming tile ([`stream_tiles`]) for a call of `rows` activation rows.
    fn stream_cols(rows: usize) -> usize;

    /// Sets `sums[r][c] = Σ_i xs[r][i]·widen(ws[c][i])`, for `r < xs.len()`, `c < ws.len()`.
    /// Every `xs[r]` is a [`Prepared`] row (padded to a whole step), every `ws[c]` a weight row.
    /// Shapes: 1 to `TILE_ROWS` rows times 1, `BLOCK_COLS` or `stream_cols(rows)` weight rows
    /// (others panic).
    ///
    /// # Safety
    /// The CPU must have the tier's features. (Lengths are checked.)
    unsafe fn dots(kind: HalfKind, xs: &[&[f32]], ws: &[&[u16]], sums: &mut Sums);
}

/// Up to this many activation rows, a call streams each weight row from memory once (a decode
/// step); beyond, it blocks for reuse from cache (a prefill).
const STREAM_ROWS: usize = 8;
/// Prefill blocking: bytes of activation rows that stay in L2 while the weights pass, and of
/// weight rows that stay in L2 while every row tile of such a block passes over them.
const X_BLOCK_BYTES: usize = 256 << 10;
const PANEL_BYTES: usize = 64 << 10;

/// Output channels `cols`, tile by tile.
///
/// # Safety
/// The CPU must have `K`'s features.
pub(super) unsafe fn tiled<K: HalfKernel>(
    x: &Prepared,
    w: HalfView,
    cols: Range<usize>,
    sink: &Sink,
) {
    let tile = |t0: usize, r: usize, js: &[usize]| {
        let xs: [&[f32]; MAX_R] = std::array::from_fn(|i| match i < r {
            true => x.row(t0 + i),
            false => &[],
        });
        let ws: [&[u16]; MAX_C] = std::array::from_fn(|i| match js.get(i) {
            Some(&j) => w.row(j),
            None => &[],
        });
        let mut sums = [[0f32; MAX_C]; MAX_R];
        // SAFETY: the caller guarantees `K`'s features; lengths are checked inside.
        unsafe { K::dots(w.kind, &xs[..r], &ws[..js.len()], &mut sums) };
        sink.store_tile(t0, r, js, &sums);
    };
    let rows = x.rows;
    if rows <= STREAM_ROWS {
        // More rows than a tile holds: the tile's groups of rows take turns on the same weight
        // rows, the first reading them from memory and the others from cache. (Measured, for 8
        // rows: ~11 GB/s where one 8 × 2 tile, with half as many streams, got 7–10.)
        stream_tiles(cols, K::stream_cols(rows), |js| {
            for t0 in (0..rows).step_by(K::TILE_ROWS) {
                tile(t0, K::TILE_ROWS.min(rows - t0), js);
            }
        });
    } else {
        let row_bytes = x.k_pad * std::mem::size_of::<f32>();
        block_tiles(rows, row_bytes, K::TILE_ROWS, K::BLOCK_COLS, cols, tile);
    }
}

/// Tiles for few rows, where each weight row is read once and memory bandwidth is the limit.
///
/// `cols` is cut into `c` equal runs of consecutive channels and a tile takes one channel from
/// each run, so the kernel reads `c` long sequential streams, which the hardware prefetchers
/// follow across tiles (as the int8 kernels do; adjacent channels measured ~40% slower here);
/// the remainder goes one channel at a time.
fn stream_tiles(cols: Range<usize>, c: usize, mut tile: impl FnMut(&[usize])) {
    let run = cols.len() / c;
    let mut js = [0; MAX_C];
    for i in 0..run {
        for (s, j) in js[..c].iter_mut().enumerate() {
            *j = cols.start + s * run + i;
        }
        tile(&js[..c]);
    }
    for j in cols.start + c * run..cols.end {
        tile(&[j]);
    }
}

/// Tiles for many rows, where compute is the limit: activations in blocks of about
/// [`X_BLOCK_BYTES`], weights in panels of about [`PANEL_BYTES`], and within both a row tile stays
/// in L1 (up to k ≈ 1000) while it passes the panel's weight tiles. (The sizes measured flat
/// between 64 KiB and 1 MiB, and 16 and 256 KiB; splitting k too, with the running sums stored
/// between k blocks, measured 5–20% slower: the tile calls get short.)
fn block_tiles(
    rows: usize,
    row_bytes: usize,
    r_tile: usize,
    c_tile: usize,
    cols: Range<usize>,
    mut tile: impl FnMut(usize, usize, &[usize]),
) {
    let x_block = (X_BLOCK_BYTES / row_bytes.max(1))
        .max(1)
        .next_multiple_of(r_tile);
    // Weight rows are half as long in bytes as activation rows.
    let panel = (2 * PANEL_BYTES / row_bytes.max(1) / c_tile).max(1) * c_tile;
    let mut js = [0; MAX_C];
    for xb in (0..rows).step_by(x_block) {
        let xe = (xb + x_block).min(rows);
        for p0 in cols.clone().step_by(panel) {
            let p1 = (p0 + panel).min(cols.end);
            for t0 in (xb..xe).step_by(r_tile) {
                let r = r_tile.min(xe - t0);
                for j0 in (p0..p1).step_by(c_tile) {
                    if j0 + c_tile <= p1 {
                        for (i, j) in js[..c_tile].iter_mut().enumerate() {
                            *j = j0 + i;
                        }
                        tile(t0, r, &js[..c_tile]);
                    } else {
                        for j in j0..p1 {
                            tile(t0, r, &[j]);
                        }
                    }
                }
            }
        }
    }
}
