//! W8A8 int8 CPU kernels: per-token dynamic int8 activations × per-channel int8 weights.
//!
//! The math (symmetric, no zero points):
//! - Activations, per row `t`: `scale_t = max_j |x_tj| / 127`, `q = round_half_away(x / scale_t)`
//!   clamped to `[-127, 127]`. An all-zero row gets scale 1 and zeros. A row holding inf/NaN gets
//!   scale NaN (and zeros), so the bad value reaches the output instead of being hidden.
//! - Weights ([`Int8Matrix`]): one f32 scale per output channel, values in `[-127, 127]`.
//! - `out[t][j] = (Σ_k xq[t][k]·wq[j][k]) as f32 * scale_t * wscale_j (+ bias_j)`.
//!
//! Tiers ([`Tier`]): a portable scalar reference, AVX2 (`maddubs` with the sign trick) and
//! AVX-512 VNNI (`dpbusd`, activations shifted to u8 by +128 and `128·row_sums[j]` subtracted).
//! Integer sums are exact in every tier (for `k ≤ MAX_K`) and the f32 epilogue is one shared
//! function, so every tier gives bitwise-equal outputs. Rows are zero padded to a multiple of
//! [`K_ALIGN`] bytes, so SIMD loops never need a k tail.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;
use std::sync::OnceLock;

use rayon::prelude::*;

pub use crate::model::int8::{padded_k, Int8Error, Int8Matrix, K_ALIGN, MAX_K};

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod int4;
mod scalar;

/// Environment variable that forces a lower tier: `scalar`, `avx2` or `avx512`.
pub const TIER_ENV: &str = "EDGEMOE_INT8_TIER";

/// A tier request that cannot be honoured ([`TIER_ENV`], [`resolve_tier`]).
#[derive(Clone, Debug, PartialEq)]
pub enum TierError {
    /// A tier name that is not `scalar`, `avx2` or `avx512`.
    UnknownTier(String),
    /// A tier this CPU cannot run.
    TierUnsupported(Tier),
}

impl fmt::Display for TierError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownTier(s) => {
                write!(
                    f,
                    "unknown int8 tier {s:?}; expected scalar, avx2 or avx512"
                )
            }
            Self::TierUnsupported(t) => write!(f, "this CPU cannot run the {t} int8 kernels"),
        }
    }
}

impl std::error::Error for TierError {}

/// A kernel implementation. Ordered: each tier's CPU features include the lower tiers'.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    /// Portable reference.
    Scalar,
    /// AVX2: `vpmaddubsw` with the sign trick.
    Avx2,
    /// AVX-512 F + BW + VNNI: `vpdpbusd` on u8-shifted activations.
    Avx512Vnni,
}

impl Tier {
    /// Every tier, lowest first.
    pub const ALL: [Tier; 3] = [Tier::Scalar, Tier::Avx2, Tier::Avx512Vnni];

    /// The name [`TIER_ENV`] uses.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Scalar => "scalar",
            Tier::Avx2 => "avx2",
            Tier::Avx512Vnni => "avx512",
        }
    }

    /// Whether this CPU can run the tier.
    pub fn is_supported(self) -> bool {
        match self {
            Tier::Scalar => true,
            Tier::Avx2 => cpu_has_avx2(),
            Tier::Avx512Vnni => cpu_has_avx512_vnni(),
        }
    }

    /// The tiers this CPU can run, lowest first.
    pub fn supported() -> Vec<Tier> {
        Tier::ALL.into_iter().filter(|t| t.is_supported()).collect()
    }

    /// The highest tier this CPU can run.
    pub fn best_supported() -> Tier {
        Tier::supported().pop().unwrap_or(Tier::Scalar)
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Tier {
    type Err = TierError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tier::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| TierError::UnknownTier(s.to_owned()))
    }
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_avx512_vnni() -> bool {
    // AVX2 too: this tier quantizes activations with the AVX2 code.
    cpu_has_avx2()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_avx2() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_avx512_vnni() -> bool {
    false
}

/// The tier [`gemm`] and [`quantize_rows`] use: the best this CPU has, or a lower one forced with
/// [`TIER_ENV`]. Decided once per process; a bad or unsupported request falls back to the best
/// tier with one line on stderr.
pub fn active_tier() -> Tier {
    static ACTIVE: OnceLock<Tier> = OnceLock::new();
    *ACTIVE.get_or_init(|| {
        // `EDGEMOE_CPU=scalar` caps this family too, as it does every kernel.
        let best = if crate::backend::cpu::simd::forced_scalar() {
            Tier::Scalar
        } else {
            Tier::best_supported()
        };
        let requested = std::env::var(TIER_ENV).ok();
        resolve_tier(requested.as_deref(), best).unwrap_or_else(|e| {
            eprintln!("edgemoe: {TIER_ENV}: {e}; using the {best} int8 kernels");
            best
        })
    })
}

/// The tier to use given a requested name (`None` or empty: no request) and the best supported
/// tier. Requests above `best` are refused, never honoured.
pub fn resolve_tier(requested: Option<&str>, best: Tier) -> Result<Tier, TierError> {
    match requested.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(best),
        Some(name) => {
            let tier: Tier = name.parse()?;
            if tier > best {
                Err(TierError::TierUnsupported(tier))
            } else {
                Ok(tier)
            }
        }
    }
}

fn assert_supported(tier: Tier) {
    assert!(
        tier.is_supported(),
        "the {tier} int8 tier is not supported by this CPU"
    );
}

/// Per-token quantized activations: `rows × k_padded` int8, zero padded, one scale per row.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QuantizedRows {
    pub data: Vec<i8>,
    pub scales: Vec<f32>,
    pub rows: usize,
    pub k: usize,
    pub k_padded: usize,
}

impl QuantizedRows {
    /// An empty buffer, to be filled (and reused) by [`quantize_rows`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Row `t`, padding included.
    pub fn row(&self, t: usize) -> &[i8] {
        &self.data[t * self.k_padded..(t + 1) * self.k_padded]
    }
}

/// Quantizes `x` (`rows × k`, row-major) per row into `out`, reusing its buffers.
///
/// # Panics
/// If `x.len() != rows * k` (or `rows × padded_k(k)` overflows).
pub fn quantize_rows(x: &[f32], rows: usize, k: usize, out: &mut QuantizedRows) {
    quantize_rows_with_tier(active_tier(), x, rows, k, None, out);
}

/// [`quantize_rows`] with `x[t][j] * inv_smooth[j]` quantized instead of `x[t][j]` (SmoothQuant
/// where no norm precedes the matmul to fold the smoothing into).
///
/// # Panics
/// If `x.len() != rows * k` or `inv_smooth` is not `k` long.
pub fn quantize_rows_smoothed(
    x: &[f32],
    rows: usize,
    k: usize,
    inv_smooth: Option<&[f32]>,
    out: &mut QuantizedRows,
) {
    quantize_rows_with_tier(active_tier(), x, rows, k, inv_smooth, out);
}

/// [`quantize_rows_smoothed`] on a given tier. All tiers give identical results.
///
/// # Panics
/// If the CPU cannot run `tier`, or the lengths disagree as in [`quantize_rows_smoothed`].
pub fn quantize_rows_with_tier(
    tier: Tier,
    x: &[f32],
    rows: usize,
    k: usize,
    inv_smooth: Option<&[f32]>,
    out: &mut QuantizedRows,
) {
    assert_supported(tier);
    assert_eq!(Some(x.len()), rows.checked_mul(k), "x is not rows × k");
    if let Some(s) = inv_smooth {
        assert_eq!(s.len(), k, "inv_smooth is not k long");
    }
    let k_padded = padded_k(k);
    out.rows = rows;
    out.k = k;
    out.k_padded = k_padded;
    let len = rows
        .checked_mul(k_padded)
        .expect("rows × k_padded overflows usize");
    // Every byte is rewritten below (padding included), so resizing alone is enough.
    out.data.resize(len, 0);
    out.scales.resize(rows, 0.0);
    for t in 0..rows {
        let src = &x[t * k..(t + 1) * k];
        let dst = &mut out.data[t * k_padded..(t + 1) * k_padded];
        out.scales[t] = quantize_row(tier, src, inv_smooth, dst);
    }
}

fn quantize_row(tier: Tier, x: &[f32], inv_smooth: Option<&[f32]>, dst: &mut [i8]) -> f32 {
    match tier {
        Tier::Scalar => scalar::quantize_row(x, inv_smooth, dst),
        // SAFETY: callers assert `tier.is_supported()`, and both tiers imply AVX2.
        #[cfg(target_arch = "x86_64")]
        Tier::Avx2 | Tier::Avx512Vnni => unsafe { avx2::quantize_row(x, inv_smooth, dst) },
        #[cfg(not(target_arch = "x86_64"))]
        Tier::Avx2 | Tier::Avx512Vnni => unreachable!("only the scalar tier exists here"),
    }
}

/// How a row is quantized, given the bits of its largest |x| (see [`abs_bits`]).
#[derive(Clone, Copy, Debug, PartialEq)]
enum RowScale {
    /// Quantize with this scale.
    Quantize(f32),
    /// Write zeros and record this scale: 1 for an all-zero row, NaN for a non-finite one.
    Zeros(f32),
}

fn row_scale(max_abs_bits: u32) -> RowScale {
    let max_abs = f32::from_bits(max_abs_bits);
    if !max_abs.is_finite() {
        return RowScale::Zeros(f32::NAN);
    }
    let scale = max_abs / 127.0;
    if scale == 0.0 {
        RowScale::Zeros(1.0)
    } else {
        RowScale::Quantize(scale)
    }
}

/// `|v|` as raw bits. For non-negative floats the integer order is the float order, with NaN
/// above inf, so a plain integer max finds max |x| and lets NaN win (identically in SIMD).
fn abs_bits(v: f32) -> u32 {
    v.to_bits() & 0x7fff_ffff
}

impl Int8Matrix {
    /// Round-to-nearest symmetric per-output-channel quantization of `w` (`n × k`, row-major).
    pub fn quantize_rtn(w: &[f32], n: usize, k: usize) -> Result<Self, Int8Error> {
        crate::model::int8::check_matrix_shape(n, k, w.len(), "f32 weights")?;
        let mut data = vec![0i8; n * k];
        let mut scales = vec![0f32; n];
        let mut row_buf = vec![0i8; padded_k(k)];
        for j in 0..n {
            let src = &w[j * k..(j + 1) * k];
            if !src.iter().all(|v| v.is_finite()) {
                return Err(Int8Error::NonFinite {
                    what: "weight",
                    row: j,
                });
            }
            // Same rule as the activations: scale = max|w| / 127, round half away from zero.
            scales[j] = scalar::quantize_row(src, None, &mut row_buf);
            data[j * k..(j + 1) * k].copy_from_slice(&row_buf[..k]);
        }
        Self::from_quantized(n, k, &data, scales)
    }
}

/// `out[t*n + j] = Σ_k x[t][k]·w[j][k] · x.scales[t] · w.scales[j] (+ bias[j])` for
/// `t < x.rows`, `j < w.n`, on the [`active_tier`], threaded over output channels on `pool`.
///
/// # Panics
/// If the shapes disagree: `x.k != w.k`, `out` not `x.rows × w.n`, `bias` not `w.n` long, or
/// buffers inconsistent with their stated sizes.
pub fn gemm(
    out: &mut [f32],
    x: &QuantizedRows,
    w: &Int8Matrix,
    bias: Option<&[f32]>,
    pool: &rayon::ThreadPool,
) {
    gemm_with_tier(active_tier(), out, x, w, bias, pool);
}

/// [`gemm`] on a given tier. All tiers give bitwise-equal results.
///
/// # Panics
/// If the CPU cannot run `tier`, or as [`gemm`].
pub fn gemm_with_tier(
    tier: Tier,
    out: &mut [f32],
    x: &QuantizedRows,
    w: &Int8Matrix,
    bias: Option<&[f32]>,
    pool: &rayon::ThreadPool,
) {
    assert_supported(tier);
    check_gemm_shapes(out, x, w, bias);
    let threads = if super::parallel::kernel_threads() == 1 {
        1
    } else {
        pool.current_num_threads()
    };
    let chunks = column_chunks(x.rows, w.n, w.k_padded, threads);
    let target = OutPtr(out.as_mut_ptr());
    let run = |cols: Range<usize>| {
        // SAFETY: `out` holds `x.rows × w.n` floats (checked above) and stays mutably borrowed by
        // this call until every task has returned; the ranges from `column_chunks` are disjoint.
        let sink = unsafe { ColumnSink::new(target, x, w, bias, cols.clone()) };
        gemm_columns(tier, x, w, cols, &sink);
    };
    match chunks.len() {
        0 => {}
        // Not worth a hop to the pool (or a one-thread pool): run on the caller's thread.
        1 => run(0..w.n),
        _ => pool.install(|| chunks.into_par_iter().for_each(run)),
    }
}

fn check_gemm_shapes(out: &[f32], x: &QuantizedRows, w: &Int8Matrix, bias: Option<&[f32]>) {
    assert_eq!(
        x.k, w.k,
        "activations have k = {}, weights k = {}",
        x.k, w.k
    );
    assert!(w.k <= MAX_K, "k = {} exceeds MAX_K", w.k);
    assert!(
        x.k_padded == padded_k(x.k) && w.k_padded == padded_k(w.k),
        "k_padded must be padded_k(k)"
    );
    assert_eq!(
        Some(x.data.len()),
        x.rows.checked_mul(x.k_padded),
        "x.data size"
    );
    assert_eq!(x.scales.len(), x.rows, "x.scales size");
    assert_eq!(
        Some(w.data.len()),
        w.n.checked_mul(w.k_padded),
        "w.data size"
    );
    assert_eq!(w.scales.len(), w.n, "w.scales size");
    assert_eq!(w.row_sums.len(), w.n, "w.row_sums size");
    assert_eq!(
        Some(out.len()),
        x.rows.checked_mul(w.n),
        "out is not rows × n"
    );
    if let Some(b) = bias {
        assert_eq!(b.len(), w.n, "bias is not n long");
    }
}

/// Splits `0..n` into column ranges for the pool. Small problems stay in one range (a rayon
/// hop costs more than they do); otherwise about four per thread so an unlucky thread does not
/// hold the others up. Range sizes are multiples of 16, keeping the kernels' column tiles whole.
fn column_chunks(rows: usize, n: usize, k_padded: usize, threads: usize) -> Vec<Range<usize>> {
    const MIN_MACS_PER_CHUNK: usize = 1 << 18;
    const COL_ALIGN: usize = 16;
    if rows == 0 || n == 0 {
        return Vec::new();
    }
    let macs = rows.saturating_mul(n).saturating_mul(k_padded.max(1));
    let want = if threads <= 1 {
        1
    } else {
        let want = (threads * 4)
            .min(macs / MIN_MACS_PER_CHUNK)
            .min(n.div_ceil(COL_ALIGN));
        // A whole number of chunks per thread: 3 chunks on 2 threads leave one thread a third
        // of the work idle-waiting at the end.
        if want >= threads {
            want - want % threads
        } else {
            want.max(1)
        }
    };
    let size = n.div_ceil(want).next_multiple_of(COL_ALIGN);
    (0..n).step_by(size).map(|s| s..(s + size).min(n)).collect()
}

fn gemm_columns(
    tier: Tier,
    x: &QuantizedRows,
    w: &Int8Matrix,
    cols: Range<usize>,
    sink: &ColumnSink,
) {
    match tier {
        Tier::Scalar => scalar::gemm_columns(x, w, cols, sink),
        // SAFETY (both arms): `gemm_with_tier` asserted `tier.is_supported()`.
        #[cfg(target_arch = "x86_64")]
        Tier::Avx2 => unsafe { gemm_tiled::<avx2::Avx2>(x, w, cols, sink) },
        #[cfg(target_arch = "x86_64")]
        Tier::Avx512Vnni => unsafe { gemm_tiled::<avx512::Avx512Vnni>(x, w, cols, sink) },
        #[cfg(not(target_arch = "x86_64"))]
        Tier::Avx2 | Tier::Avx512Vnni => unreachable!("only the scalar tier exists here"),
    }
}

/// The largest register tile any kernel uses, in tokens and in weight rows.
const TILE: usize = 4;

/// Integer dot products of one register tile, `[token][weight row]`.
type TileSums = [[i32; TILE]; TILE];

/// A SIMD tier's register-blocked kernel; [`gemm_tiled`] does the blocking around it.
trait DotKernel {
    /// Tokens per tile. Up to this many tokens, every weight row is read once and the product
    /// streams weights ([`streaming_tiles`]); beyond, it is blocked for reuse ([`panel_tiles`]).
    const GEMM_ROWS: usize;
    /// Weight rows per tile when streaming.
    const STREAM_COLS: usize;
    /// Weight rows per tile when blocked.
    const GEMM_COLS: usize;

    /// Sets `sums[r][c] = Σ_i xs[r][i]·ws[c][i]`, exactly, for `r < xs.len()`, `c < ws.len()`.
    /// `row_sums[c]` is `Σ_i ws[c][i]`.
    ///
    /// # Safety
    /// The CPU must have the tier's features. (Shapes are checked: 1 ≤ `xs.len()`, `ws.len()`
    /// ≤ [`TILE`], every slice the same length, a multiple of [`K_ALIGN`].)
    unsafe fn dots(xs: &[&[i8]], ws: &[&[i8]], row_sums: &[i32], sums: &mut TileSums);

    /// One token against [`Self::STREAM_COLS`] runs of `run` consecutive weight rows:
    /// `w` holds `STREAM_COLS · run` rows of `x.len()` bytes, and `sums[i][s]` becomes the dot
    /// product of `x` with row `s·run + i` (`row_sums` as in [`Self::dots`], one per row of
    /// `w`). Decode's GEMV: the kernel walks the runs itself, so no per-tile call or bookkeeping
    /// sits between the weight streams' loads.
    ///
    /// # Safety
    /// As [`Self::dots`]. (Shapes are checked.)
    unsafe fn dot_runs(x: &[i8], w: &[i8], row_sums: &[i32], run: usize, sums: &mut [[i32; TILE]]);
}

/// Output channels `cols` of the product, tile by tile.
///
/// # Safety
/// The CPU must have `K`'s features.
unsafe fn gemm_tiled<K: DotKernel>(
    x: &QuantizedRows,
    w: &Int8Matrix,
    cols: Range<usize>,
    sink: &ColumnSink,
) {
    // Borrowed once: a stored matrix's buffers may be maps, and this loop is hot.
    let (w_data, w_row_sums, kp): (&[i8], &[i32], usize) = (&w.data, &w.row_sums, w.k_padded);
    let tile = |t0: usize, r: usize, js: &[usize]| {
        let mut xs: [&[i8]; TILE] = [&[]; TILE];
        let mut ws: [&[i8]; TILE] = [&[]; TILE];
        let mut row_sums = [0; TILE];
        for (i, slot) in xs[..r].iter_mut().enumerate() {
            *slot = x.row(t0 + i);
        }
        for (i, &j) in js.iter().enumerate() {
            ws[i] = &w_data[j * kp..(j + 1) * kp];
            row_sums[i] = w_row_sums[j];
        }
        let c = js.len();
        let mut sums = [[0; TILE]; TILE];
        // SAFETY: the caller guarantees `K`'s features; shapes are checked inside.
        unsafe { K::dots(&xs[..r], &ws[..c], &row_sums[..c], &mut sums) };
        sink.store_tile(t0, &sums[..r], js);
    };
    if x.rows == 1 {
        // SAFETY: the caller guarantees `K`'s features.
        let rest = unsafe { one_token::<K>(x.row(0), w, cols.clone(), sink) };
        streaming_tiles(rest, K::STREAM_COLS, |js| tile(0, 1, js));
    } else if x.rows <= K::GEMM_ROWS {
        streaming_tiles(cols, K::STREAM_COLS, |js| tile(0, x.rows, js));
    } else {
        panel_tiles::<K>(x.rows, w.k_padded, cols, |t0, r, js| tile(t0, r, js));
    }
}

/// Rows per run in one [`one_token`] block: its sums stay on the stack, and runs of 128 rows
/// (128 KiB at k = 1024) are long sequential streams.
const RUN_BLOCK: usize = 128;

/// One token's GEMV over `cols` in blocks of [`DotKernel::STREAM_COLS`] runs
/// ([`DotKernel::dot_runs`]); returns the columns left over (fewer than `STREAM_COLS`).
///
/// # Safety
/// The CPU must have `K`'s features.
unsafe fn one_token<K: DotKernel>(
    x: &[i8],
    w: &Int8Matrix,
    cols: Range<usize>,
    sink: &ColumnSink,
) -> Range<usize> {
    let (c, kp) = (K::STREAM_COLS, w.k_padded);
    let mut sums = [[0; TILE]; RUN_BLOCK];
    let mut j0 = cols.start;
    while cols.end - j0 >= c {
        let run = ((cols.end - j0) / c).min(RUN_BLOCK);
        let rows = j0..j0 + c * run;
        let (w_rows, row_sums) = (&w.data[rows.start * kp..rows.end * kp], &w.row_sums[rows]);
        // SAFETY: the caller guarantees `K`'s features; shapes are checked inside.
        unsafe { K::dot_runs(x, w_rows, row_sums, run, &mut sums[..run]) };
        sink.store_runs(j0, c, &sums[..run]);
        j0 += c * run;
    }
    j0..cols.end
}

/// Tiles for few tokens, where each weight row is read once and memory bandwidth is the limit.
///
/// `cols` is cut into `c` equal runs of consecutive rows and a tile takes one row from each run,
/// so the kernel reads `c` long sequential streams (which the hardware prefetchers follow well,
/// measured ~20% faster than `c` adjacent rows when rows are 4 KiB); the remainder is one
/// narrower tile of adjacent rows.
fn streaming_tiles(cols: Range<usize>, c: usize, mut tile: impl FnMut(&[usize])) {
    let run = cols.len() / c;
    let mut js = [0; TILE];
    for i in 0..run {
        for (s, j) in js[..c].iter_mut().enumerate() {
            *j = cols.start + s * run + i;
        }
        tile(&js[..c]);
    }
    let rest = cols.start + c * run..cols.end;
    if !rest.is_empty() {
        let len = rest.len();
        for (j, col) in js.iter_mut().zip(rest) {
            *j = col;
        }
        tile(&js[..len]);
    }
}

/// Tiles for many tokens, where compute is the limit: weight rows are taken in panels of about
/// 256 KiB (they stay in L2 while every token tile passes over them), and a token tile stays in
/// L1 across a panel.
fn panel_tiles<K: DotKernel>(
    rows: usize,
    k_padded: usize,
    cols: Range<usize>,
    mut tile: impl FnMut(usize, usize, &[usize]),
) {
    const PANEL_BYTES: usize = 256 << 10;
    let panel = (PANEL_BYTES / k_padded.max(1) / K::GEMM_COLS).max(1) * K::GEMM_COLS;
    let mut js = [0; TILE];
    for p0 in cols.clone().step_by(panel) {
        let p1 = (p0 + panel).min(cols.end);
        for t0 in (0..rows).step_by(K::GEMM_ROWS) {
            let r = K::GEMM_ROWS.min(rows - t0);
            for j0 in (p0..p1).step_by(K::GEMM_COLS) {
                let c = K::GEMM_COLS.min(p1 - j0);
                for (i, j) in js[..c].iter_mut().enumerate() {
                    *j = j0 + i;
                }
                tile(t0, r, &js[..c]);
            }
        }
    }
}

/// `out`'s address, shared by the column tasks of one [`gemm_with_tier`] call.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

// SAFETY: an `OutPtr` is only written through `ColumnSink::store`, and the sinks alive at the same
// time cover disjoint column ranges (see `ColumnSink::new`), so threads never touch the same float.
unsafe impl Send for OutPtr {}
// SAFETY: as for `Send`; `OutPtr` is never read through.
unsafe impl Sync for OutPtr {}

/// Where a column task writes its results: `out[t*n + j]` for its own columns `j ∈ cols` only.
///
/// Chosen over per-task buffers plus a scatter: the kernels write each output once, in place,
/// with no extra pass over `rows × n` floats.
struct ColumnSink<'a> {
    out: OutPtr,
    n: usize,
    rows: usize,
    cols: Range<usize>,
    x_scales: &'a [f32],
    w_scales: &'a [f32],
    bias: Option<&'a [f32]>,
}

impl<'a> ColumnSink<'a> {
    /// # Safety
    /// `out` must point to `x.rows × w.n` floats that are writable for the sink's lifetime and
    /// that nothing else reads or writes meanwhile, except other sinks whose `cols` are disjoint
    /// from this one's.
    unsafe fn new(
        out: OutPtr,
        x: &'a QuantizedRows,
        w: &'a Int8Matrix,
        bias: Option<&'a [f32]>,
        cols: Range<usize>,
    ) -> Self {
        assert!(cols.end <= w.n, "columns {cols:?} outside 0..{}", w.n);
        Self {
            out,
            n: w.n,
            rows: x.rows,
            cols,
            x_scales: &x.scales,
            w_scales: &w.scales,
            bias,
        }
    }

    /// Writes `out[t][j]` from its integer dot product.
    #[inline]
    fn store(&self, t: usize, j: usize, acc: i32) {
        self.store_tile(t, &[[acc; TILE]], &[j]);
    }

    /// Writes token 0's outputs for `c` runs of `sums.len()` columns from `j0`: column
    /// `j0 + s·run + i` from `sums[i][s]` ([`DotKernel::dot_runs`]'s order).
    fn store_runs(&self, j0: usize, c: usize, sums: &[[i32; TILE]]) {
        let run = sums.len();
        let cols = j0..j0 + c * run;
        assert!(
            self.rows >= 1
                && c <= TILE
                && self.cols.start <= cols.start
                && cols.end <= self.cols.end,
            "columns {cols:?} outside this task's {:?}",
            self.cols
        );
        let x_scale = self.x_scales[0];
        let w_scales = &self.w_scales[cols.clone()];
        let bias = self.bias.map(|b| &b[cols]);
        for s in 0..c {
            for (i, row) in sums.iter().enumerate() {
                let j = s * run + i;
                let value = epilogue(row[s], x_scale, w_scales[j], bias.map(|b| b[j]));
                // SAFETY: token 0 < rows and j0 + j < cols.end ≤ n (checked above), so the index
                // is inside `out` (`new`'s contract), in this sink's own columns.
                unsafe { self.out.0.add(j0 + j).write(value) };
            }
        }
    }

    /// Writes a register tile: `out[t0 + i][js[c]]` from `sums[i][c]`, for `c < js.len()`.
    /// Bounds are checked once per tile, and each weight row's scale and bias read once.
    #[inline]
    fn store_tile(&self, t0: usize, sums: &[[i32; TILE]], js: &[usize]) {
        assert!(
            t0 + sums.len() <= self.rows && js.len() <= TILE,
            "tokens {t0}..{} outside 0..{}",
            t0 + sums.len(),
            self.rows
        );
        let mut w_scales = [0f32; TILE];
        let mut biases = [None; TILE];
        for (c, &j) in js.iter().enumerate() {
            assert!(self.cols.contains(&j), "column {j} outside this task");
            w_scales[c] = self.w_scales[j];
            biases[c] = self.bias.map(|b| b[j]);
        }
        for (i, row) in sums.iter().enumerate() {
            let x_scale = self.x_scales[t0 + i];
            for (c, &j) in js.iter().enumerate() {
                let value = epilogue(row[c], x_scale, w_scales[c], biases[c]);
                // SAFETY: t0 + i < rows and j < n (checked above), so the index is inside `out`
                // (`new`'s contract), and j is one of this sink's columns, which no other live
                // sink writes.
                unsafe { self.out.0.add((t0 + i) * self.n + j).write(value) };
            }
        }
    }
}

/// The f32 epilogue, shared by every tier so their outputs are bitwise equal.
#[inline(always)]
fn epilogue(acc: i32, x_scale: f32, w_scale: f32, bias: Option<f32>) -> f32 {
    let value = acc as f32 * x_scale * w_scale;
    match bias {
        Some(b) => value + b,
        None => value,
    }
}

#[cfg(test)]
mod tests;
