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

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod scalar;

/// Rows of [`QuantizedRows`] and [`Int8Matrix`] are padded with zeros to a multiple of this.
pub const K_ALIGN: usize = 64;
/// Largest k whose worst-case dot product (`k·127·127`) still fits in an i32.
pub const MAX_K: usize = (i32::MAX / (127 * 127)) as usize;
/// Environment variable that forces a lower tier: `scalar`, `avx2` or `avx512`.
pub const TIER_ENV: &str = "EDGEMOE_INT8_TIER";

/// `k` rounded up to a multiple of [`K_ALIGN`].
pub fn padded_k(k: usize) -> usize {
    k.div_ceil(K_ALIGN) * K_ALIGN
}

/// Errors from building int8 data out of external input, or from choosing a tier.
#[derive(Clone, Debug, PartialEq)]
pub enum Int8Error {
    /// A buffer's length disagrees with the shape given with it.
    Length {
        what: &'static str,
        expected: usize,
        actual: usize,
    },
    /// `n * k` does not fit in `usize`.
    ShapeOverflow { n: usize, k: usize },
    /// `k` is above [`MAX_K`], where i32 accumulation could overflow.
    KTooLarge { k: usize },
    /// A weight of -128: the kernels need values in `[-127, 127]`.
    WeightOutOfRange { row: usize, col: usize },
    /// An inf/NaN weight or scale.
    NonFinite { what: &'static str, row: usize },
    /// A tier name that is not `scalar`, `avx2` or `avx512`.
    UnknownTier(String),
    /// A tier this CPU cannot run.
    TierUnsupported(Tier),
}

impl fmt::Display for Int8Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Length {
                what,
                expected,
                actual,
            } => write!(f, "{what}: expected {expected} values, got {actual}"),
            Self::ShapeOverflow { n, k } => write!(f, "int8 matrix {n}x{k} is too large"),
            Self::KTooLarge { k } => write!(f, "k = {k} exceeds the int8 kernels' limit {MAX_K}"),
            Self::WeightOutOfRange { row, col } => {
                write!(
                    f,
                    "int8 weight [{row}][{col}] is -128; expected [-127, 127]"
                )
            }
            Self::NonFinite { what, row } => write!(f, "non-finite {what} in row {row}"),
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

impl std::error::Error for Int8Error {}

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
    type Err = Int8Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tier::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| Int8Error::UnknownTier(s.to_owned()))
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
        let best = Tier::best_supported();
        let requested = std::env::var(TIER_ENV).ok();
        resolve_tier(requested.as_deref(), best).unwrap_or_else(|e| {
            eprintln!("edgemoe: {TIER_ENV}: {e}; using the {best} int8 kernels");
            best
        })
    })
}

/// The tier to use given a requested name (`None` or empty: no request) and the best supported
/// tier. Requests above `best` are refused, never honoured.
pub fn resolve_tier(requested: Option<&str>, best: Tier) -> Result<Tier, Int8Error> {
    match requested.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(best),
        Some(name) => {
            let tier: Tier = name.parse()?;
            if tier > best {
                Err(Int8Error::TierUnsupported(tier))
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

/// Int8 weights, one row per output channel, symmetric per-channel scales.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Matrix {
    pub n: usize,
    pub k: usize,
    pub k_padded: usize,
    /// `n` rows of `k_padded` values, row-major, zero padded; values in `[-127, 127]`.
    pub data: Vec<i8>,
    /// One scale per output channel.
    pub scales: Vec<f32>,
    /// `Σ_k data[j][k]`, for the VNNI tier's u8-shift correction.
    pub row_sums: Vec<i32>,
}

impl Int8Matrix {
    /// Pads `data_unpadded` (`n × k`, row-major) and computes the row sums.
    pub fn from_quantized(
        n: usize,
        k: usize,
        data_unpadded: &[i8],
        scales: Vec<f32>,
    ) -> Result<Self, Int8Error> {
        check_matrix_shape(n, k, data_unpadded.len(), "int8 weights")?;
        if scales.len() != n {
            return Err(Int8Error::Length {
                what: "weight scales",
                expected: n,
                actual: scales.len(),
            });
        }
        if let Some(row) = scales.iter().position(|s| !s.is_finite()) {
            return Err(Int8Error::NonFinite {
                what: "weight scale",
                row,
            });
        }
        let k_padded = padded_k(k);
        let mut data = vec![0i8; n * k_padded];
        let mut row_sums = vec![0i32; n];
        for j in 0..n {
            let src = &data_unpadded[j * k..(j + 1) * k];
            if let Some(col) = src.iter().position(|&v| v == i8::MIN) {
                return Err(Int8Error::WeightOutOfRange { row: j, col });
            }
            data[j * k_padded..j * k_padded + k].copy_from_slice(src);
            // Cannot overflow: k ≤ MAX_K and |v| ≤ 127.
            row_sums[j] = src.iter().map(|&v| i32::from(v)).sum();
        }
        Ok(Self {
            n,
            k,
            k_padded,
            data,
            scales,
            row_sums,
        })
    }

    /// Round-to-nearest symmetric per-output-channel quantization of `w` (`n × k`, row-major).
    pub fn quantize_rtn(w: &[f32], n: usize, k: usize) -> Result<Self, Int8Error> {
        check_matrix_shape(n, k, w.len(), "f32 weights")?;
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

    /// Output channel `j`'s row, padding included.
    pub fn row(&self, j: usize) -> &[i8] {
        &self.data[j * self.k_padded..(j + 1) * self.k_padded]
    }
}

fn check_matrix_shape(n: usize, k: usize, len: usize, what: &'static str) -> Result<(), Int8Error> {
    if k > MAX_K {
        return Err(Int8Error::KTooLarge { k });
    }
    let expected = n
        .checked_mul(padded_k(k))
        .map(|_| n * k)
        .ok_or(Int8Error::ShapeOverflow { n, k })?;
    if len != expected {
        return Err(Int8Error::Length {
            what,
            expected,
            actual: len,
        });
    }
    Ok(())
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
    let chunks = column_chunks(x.rows, w.n, w.k_padded, pool.current_num_threads());
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
        (threads * 4)
            .min(macs / MIN_MACS_PER_CHUNK)
            .min(n.div_ceil(COL_ALIGN))
            .max(1)
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
    let tile = |t0: usize, r: usize, js: &[usize]| {
        let mut xs: [&[i8]; TILE] = [&[]; TILE];
        let mut ws: [&[i8]; TILE] = [&[]; TILE];
        let mut row_sums = [0; TILE];
        for (i, slot) in xs[..r].iter_mut().enumerate() {
            *slot = x.row(t0 + i);
        }
        for (i, &j) in js.iter().enumerate() {
            ws[i] = w.row(j);
            row_sums[i] = w.row_sums[j];
        }
        let c = js.len();
        let mut sums = [[0; TILE]; TILE];
        // SAFETY: the caller guarantees `K`'s features; shapes are checked inside.
        unsafe { K::dots(&xs[..r], &ws[..c], &row_sums[..c], &mut sums) };
        for (i, row) in sums[..r].iter().enumerate() {
            for (&j, &acc) in js.iter().zip(&row[..c]) {
                sink.store(t0 + i, j, acc);
            }
        }
    };
    if x.rows <= K::GEMM_ROWS {
        streaming_tiles(cols, K::STREAM_COLS, |js| tile(0, x.rows, js));
    } else {
        panel_tiles::<K>(x.rows, w.k_padded, cols, |t0, r, js| tile(t0, r, js));
    }
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
        assert!(
            t < self.rows && self.cols.contains(&j),
            "({t}, {j}) outside this task"
        );
        let value = epilogue(
            acc,
            self.x_scales[t],
            self.w_scales[j],
            self.bias.map(|b| b[j]),
        );
        // SAFETY: t < rows and j < n, so the index is inside `out` (`new`'s contract), and j is
        // one of this sink's columns, which no other live sink writes.
        unsafe { self.out.0.add(t * self.n + j).write(value) };
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
mod tests {
    use super::*;

    /// splitmix64: a tiny deterministic generator, enough for test data.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// Uniform in [-1, 1).
        fn unit(&mut self) -> f32 {
            (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }

        fn weight(&mut self) -> i8 {
            (self.next_u64() % 255) as i8 // wraps 128..=254 to -128..=-2; -128 fixed below
        }

        fn f32s(&mut self, len: usize, magnitude: f32) -> Vec<f32> {
            (0..len).map(|_| self.unit() * magnitude).collect()
        }
    }

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("test thread pool")
    }

    fn random_matrix(rng: &mut Rng, n: usize, k: usize) -> Int8Matrix {
        let data: Vec<i8> = (0..n * k).map(|_| rng.weight().max(-127)).collect();
        let scales = (0..n).map(|_| 0.001 + rng.unit().abs() * 0.01).collect();
        Int8Matrix::from_quantized(n, k, &data, scales).expect("valid matrix")
    }

    /// Activations whose rows span very different magnitudes, some rows all zero.
    fn random_activations(rng: &mut Rng, rows: usize, k: usize) -> QuantizedRows {
        let mut x = Vec::with_capacity(rows * k);
        for t in 0..rows {
            let magnitude = if t % 5 == 4 {
                0.0
            } else {
                10f32.powi(t as i32 % 4 - 2)
            };
            x.extend(rng.f32s(k, magnitude));
        }
        let mut q = QuantizedRows::new();
        quantize_rows_with_tier(Tier::Scalar, &x, rows, k, None, &mut q);
        q
    }

    fn run(tier: Tier, x: &QuantizedRows, w: &Int8Matrix, bias: Option<&[f32]>) -> Vec<f32> {
        let mut out = vec![f32::NAN; x.rows * w.n];
        gemm_with_tier(tier, &mut out, x, w, bias, &pool(2));
        out
    }

    fn assert_bitwise_eq(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert_eq!(x.to_bits(), y.to_bits(), "{what}: element {i}: {x} vs {y}");
        }
    }

    #[test]
    fn every_tier_matches_scalar_bitwise() {
        let mut rng = Rng(1);
        for &k in &[1, 5, 63, 64, 65, 200, 1024] {
            for &n in &[1, 3, 17, 64, 257] {
                let w = random_matrix(&mut rng, n, k);
                let bias = rng.f32s(n, 1.0);
                for &rows in &[1, 2, 3, 7, 33, 64, 129] {
                    let x = random_activations(&mut rng, rows, k);
                    let with_bias = (rows + n) % 2 == 0;
                    let bias = with_bias.then_some(bias.as_slice());
                    let reference = run(Tier::Scalar, &x, &w, bias);
                    for tier in Tier::supported() {
                        let what = format!("{tier} rows={rows} n={n} k={k} bias={with_bias}");
                        assert_bitwise_eq(&run(tier, &x, &w, bias), &reference, &what);
                    }
                }
            }
        }
    }

    #[test]
    fn scalar_gemm_is_the_plain_formula() {
        let mut rng = Rng(2);
        let (rows, n, k) = (3, 5, 70);
        let x = random_activations(&mut rng, rows, k);
        let w = random_matrix(&mut rng, n, k);
        let bias = rng.f32s(n, 1.0);
        let out = run(Tier::Scalar, &x, &w, Some(&bias));
        for t in 0..rows {
            for j in 0..n {
                let acc: i32 = (0..k)
                    .map(|i| i32::from(x.data[t * 128 + i]) * i32::from(w.data[j * 128 + i]))
                    .sum();
                let expected = acc as f32 * x.scales[t] * w.scales[j] + bias[j];
                assert_eq!(out[t * n + j].to_bits(), expected.to_bits(), "({t}, {j})");
            }
        }
    }

    #[test]
    fn extreme_values_do_not_saturate() {
        // Every product is ±127·127 and every maddubs pair sums to ±32258; k = MAX_K rounded
        // down to K_ALIGN puts the total within 0.02% of i32::MAX, and the VNNI tier's shifted
        // sum beyond it (wrapping back exactly).
        for &k in &[64, 1000, MAX_K / K_ALIGN * K_ALIGN] {
            for (xv, wv) in [(127i8, 127i8), (-127, -127), (127, -127), (-127, 127)] {
                let rows = 2;
                let n = 5;
                let k_padded = padded_k(k);
                let mut row = vec![0i8; k_padded];
                row[..k].fill(xv);
                let x = QuantizedRows {
                    data: row.repeat(rows),
                    scales: vec![1.0; rows],
                    rows,
                    k,
                    k_padded,
                };
                let w = Int8Matrix::from_quantized(n, k, &vec![wv; n * k], vec![1.0; n])
                    .expect("valid matrix");
                let expected = (i64::from(xv) * i64::from(wv) * k as i64) as i32 as f32;
                for tier in Tier::supported() {
                    for (i, v) in run(tier, &x, &w, None).iter().enumerate() {
                        assert_eq!(*v, expected, "{tier} k={k} x={xv} w={wv} element {i}");
                    }
                }
            }
        }
    }

    /// The VNNI tier cannot run on every host, so its arithmetic (the u8 shift, wrapping i32
    /// lanes, the `128·row_sum` correction) is also checked on a scalar model, with shifted sums
    /// past `i32::MAX`.
    #[test]
    fn vnni_shift_correction_is_exact() {
        let k = MAX_K / K_ALIGN * K_ALIGN;
        for (xv, wv) in [
            (127i8, 127i8),
            (-127, 127),
            (127, -127),
            (-127, -127),
            (0, 127),
        ] {
            let (x, w) = (vec![xv; k], vec![wv; k]);
            let row_sum: i32 = w.iter().map(|&v| i32::from(v)).sum();
            let shifted = x.iter().zip(&w).fold(0i32, |acc, (&a, &b)| {
                acc.wrapping_add(i32::from(a as u8 ^ 0x80) * i32::from(b))
            });
            let corrected = shifted.wrapping_sub(row_sum.wrapping_mul(128));
            assert_eq!(corrected, scalar::dot(&x, &w), "x={xv} w={wv}");
        }
    }

    #[test]
    fn dequantized_result_approximates_f32_matmul() {
        let (rows, n, k) = (9, 40, 300);
        let mut rng = Rng(3);
        let xf = rng.f32s(rows * k, 2.0);
        let wf = rng.f32s(n * k, 0.05);
        let w = Int8Matrix::quantize_rtn(&wf, n, k).expect("finite weights");
        let mut x = QuantizedRows::new();
        quantize_rows(&xf, rows, k, &mut x);
        let out = run(active_tier(), &x, &w, None);
        let (mut err2, mut ref2) = (0f64, 0f64);
        for t in 0..rows {
            for j in 0..n {
                let (xr, wr) = (&xf[t * k..(t + 1) * k], &wf[j * k..(j + 1) * k]);
                let exact: f64 = xr.iter().zip(wr).map(|(&a, &b)| f64::from(a * b)).sum();
                // With x = sx·(qx + ex) and w = sw·(qw + ew), |ex|, |ew| ≤ 1/2 (rounding):
                // |Σxw − sx·sw·Σqx·qw| ≤ Σ (|x−sx·qx|·|w| + sx·|qx|·|w−sw·qw|)
                //                      ≤ Σ (sx/2·|w| + sx·|qx|·sw/2),
                // plus f32 rounding of the epilogue and the reference (relative 1e-5 of Σ|xw|).
                let (sx, sw) = (f64::from(x.scales[t]), f64::from(w.scales[j]));
                let qx = &x.row(t)[..k];
                let bound: f64 = (0..k)
                    .map(|i| {
                        sx / 2.0 * f64::from(wr[i].abs()) + sx * f64::from(qx[i].abs()) * sw / 2.0
                    })
                    .sum::<f64>()
                    + 1e-5
                        * xr.iter()
                            .zip(wr)
                            .map(|(&a, &b)| f64::from((a * b).abs()))
                            .sum::<f64>();
                let got = f64::from(out[t * n + j]);
                assert!(
                    (got - exact).abs() <= bound,
                    "({t},{j}): {got} vs {exact}, bound {bound}"
                );
                err2 += (got - exact).powi(2);
                ref2 += exact.powi(2);
            }
        }
        // The worst-case bound is loose; the typical error must be small too (8-bit: ~1%).
        let relative_rms = (err2 / ref2).sqrt();
        assert!(relative_rms < 0.02, "relative RMS error {relative_rms}");
    }

    #[test]
    fn quantize_simd_matches_scalar() {
        let mut rng = Rng(4);
        let mut special = vec![127.0, 2.5, -2.5, 0.5, -0.5, 126.5, -126.5, 1.5, -0.0];
        special.extend([
            0.499_999_97,
            -0.499_999_97,
            3.499_999_8,
            1e-30,
            -1e-30,
            64.5,
        ]);
        let mut rows: Vec<Vec<f32>> = vec![special, vec![0.0; 40], vec![1e-45, -1e-45, 0.0]];
        rows.push(vec![1.0, f32::INFINITY, 2.0]);
        rows.push(vec![1.0, f32::NAN, -3.0]);
        for &k in &[1, 7, 8, 31, 32, 33, 100, 1024, 4097] {
            rows.push(rng.f32s(k, 3.0));
        }
        for tier in Tier::supported() {
            for x in &rows {
                let k = x.len();
                let smooth = rng.f32s(k, 2.0);
                for inv_smooth in [None, Some(smooth.as_slice())] {
                    let (mut a, mut b) = (QuantizedRows::new(), QuantizedRows::new());
                    quantize_rows_with_tier(Tier::Scalar, x, 1, k, inv_smooth, &mut a);
                    quantize_rows_with_tier(tier, x, 1, k, inv_smooth, &mut b);
                    assert_eq!(
                        a.data,
                        b.data,
                        "{tier} k={k} smooth={}",
                        inv_smooth.is_some()
                    );
                    assert_eq!(a.scales[0].to_bits(), b.scales[0].to_bits(), "{tier} k={k}");
                    assert!(b.data.iter().all(|&v| v != i8::MIN));
                }
            }
        }
    }

    #[test]
    fn quantize_rows_semantics() {
        let x = [127.0, 63.5, -63.5, 0.499, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0];
        let mut q = QuantizedRows::new();
        for tier in Tier::supported() {
            quantize_rows_with_tier(tier, &x, 2, 5, None, &mut q);
            assert_eq!((q.rows, q.k, q.k_padded, q.data.len()), (2, 5, 64, 128));
            assert_eq!(
                &q.data[..6],
                &[127, 64, -64, 0, -1, 0],
                "{tier}: half away from zero"
            );
            assert!(
                q.data[5..].iter().all(|&v| v == 0),
                "{tier}: padding and zero row"
            );
            assert_eq!(q.scales[0], 1.0);
            assert_eq!(q.scales[1], 1.0, "{tier}: an all-zero row gets scale 1");
            let smooth = [0.5, 2.0, 1.0, 1.0, 1.0];
            quantize_rows_with_tier(tier, &x[..5], 1, 5, Some(&smooth), &mut q);
            assert_eq!(
                &q.data[..5],
                &[64, 127, -64, 0, -1],
                "{tier}: smoothing applied first"
            );
            assert_eq!(
                q.data.len(),
                64,
                "{tier}: a reused buffer shrinks to the new shape"
            );
        }
        quantize_rows(&[1.0, f32::NAN], 1, 2, &mut q);
        assert!(
            q.scales[0].is_nan() && q.data.iter().all(|&v| v == 0),
            "NaN row → NaN scale"
        );
    }

    #[test]
    fn matrix_construction() {
        let m = Int8Matrix::from_quantized(2, 3, &[1, -2, 3, 127, -127, 5], vec![0.5, 2.0])
            .expect("valid");
        assert_eq!((m.k_padded, m.data.len()), (64, 128));
        assert_eq!(&m.row(1)[..4], &[127, -127, 5, 0]);
        assert_eq!(m.row_sums, vec![2, 5]);
        let err = Int8Matrix::from_quantized(1, 2, &[1, -128], vec![1.0]);
        assert_eq!(err, Err(Int8Error::WeightOutOfRange { row: 0, col: 1 }));
        assert!(matches!(
            Int8Matrix::from_quantized(2, 2, &[1, 2, 3], vec![1.0; 2]),
            Err(Int8Error::Length { .. })
        ));
        assert!(matches!(
            Int8Matrix::from_quantized(1, 1, &[1], vec![]),
            Err(Int8Error::Length { .. })
        ));
        assert!(matches!(
            Int8Matrix::from_quantized(1, MAX_K + 1, &[], vec![1.0]),
            Err(Int8Error::KTooLarge { .. })
        ));

        let r = Int8Matrix::quantize_rtn(&[0.5, -1.0, 0.25, 0.0, 0.0, 0.0], 2, 3).expect("finite");
        assert_eq!(r.scales, vec![1.0 / 127.0, 1.0]);
        assert_eq!(&r.row(0)[..3], &[64, -127, 32]);
        assert_eq!(&r.row(1)[..3], &[0, 0, 0]);
        assert_eq!(
            Int8Matrix::quantize_rtn(&[1.0, f32::NAN], 2, 1),
            Err(Int8Error::NonFinite {
                what: "weight",
                row: 1
            })
        );
    }

    #[test]
    fn tier_selection() {
        assert_eq!(resolve_tier(None, Tier::Avx2), Ok(Tier::Avx2));
        assert_eq!(resolve_tier(Some(""), Tier::Avx2), Ok(Tier::Avx2));
        assert_eq!(resolve_tier(Some("SCALAR"), Tier::Avx2), Ok(Tier::Scalar));
        assert_eq!(
            resolve_tier(Some("avx512"), Tier::Avx512Vnni),
            Ok(Tier::Avx512Vnni)
        );
        assert_eq!(
            resolve_tier(Some("avx512"), Tier::Avx2),
            Err(Int8Error::TierUnsupported(Tier::Avx512Vnni))
        );
        assert!(matches!(
            resolve_tier(Some("sse9"), Tier::Avx2),
            Err(Int8Error::UnknownTier(_))
        ));
        assert!(active_tier().is_supported());
        assert!(Tier::supported().contains(&Tier::Scalar));
    }

    #[test]
    fn column_chunks_cover_columns_once() {
        for (rows, n, kp, threads) in [(1, 14336, 4096, 2), (512, 4096, 4096, 8), (1, 3, 64, 2)]
            .into_iter()
            .chain([
                (7, 257, 1024, 3),
                (1, 100, 64, 1),
                (0, 5, 64, 2),
                (3, 0, 64, 2),
            ])
        {
            let chunks = column_chunks(rows, n, kp, threads);
            let mut next = 0;
            for c in &chunks {
                assert_eq!(c.start, next, "contiguous, disjoint");
                assert!(c.end > c.start);
                next = c.end;
            }
            assert_eq!(next, if rows == 0 { 0 } else { n }, "covers 0..n");
            assert!(chunks.len() <= threads.max(1) * 4);
        }
        assert_eq!(
            column_chunks(1, 14336, 4096, 2).len(),
            8,
            "large GEMV is split"
        );
    }

    #[test]
    fn empty_shapes() {
        let w = Int8Matrix::from_quantized(3, 0, &[], vec![1.0; 3]).expect("valid");
        let mut x = QuantizedRows::new();
        quantize_rows(&[], 2, 0, &mut x);
        for tier in Tier::supported() {
            assert_eq!(
                run(tier, &x, &w, Some(&[1.0, 2.0, 3.0])),
                vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0]
            );
        }
        quantize_rows(&[], 0, 4, &mut x);
        let w = random_matrix(&mut Rng(5), 3, 4);
        assert!(run(Tier::Scalar, &x, &w, None).is_empty());
    }
}
