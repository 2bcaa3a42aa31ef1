//! Half-precision weight kernels: `out = x · Wᵀ (+ bias)` with W stored as bf16 or f16, read in
//! place (a memory-mapped checkpoint) instead of from an f32 copy, so a decode step streams half
//! the bytes.
//!
//! Activations and sums are f32; each weight is widened to f32 in a register, exactly (both
//! formats are subsets of f32), and multiplied in with a fused multiply-add.
//!
//! Tiers ([`Tier`]): a portable scalar reference, AVX2 + FMA + F16C (8 lanes) and AVX-512 F/BW
//! (16 lanes). A SIMD step takes `2·LANES` weights of a row in one load and widens them into two
//! vectors. For f16 those are the two halves (`vcvtph2ps`). For bf16 they are the even and odd
//! elements, as the load's 32-bit lanes shifted left by 16 and masked to their high half: two
//! integer ops per `2·LANES` weights instead of a zero-extend and a shift per `LANES`. The
//! activations are copied once per call into the same order (see `Prepared`; f16 rows that
//! are whole steps already are read in place), zero padded to a whole step, so the kernels only
//! pad the weights' last partial step.
//!
//! Within a tier every output is summed in the same order whatever the register tile, thread
//! split or number of rows, so a sequence decoded alone or in a batch gets the same bits. Tiers
//! differ from each other only by f32 rounding (their lane counts differ).

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::parallel::kernel_threads;
use super::simd::SendPtr;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod blocking;
mod scalar;

#[cfg(target_arch = "x86_64")]
use blocking::tiled;

/// Environment variable that forces a lower tier: `scalar`, `avx2` or `avx512`.
pub const TIER_ENV: &str = "EDGEMOE_HALF_TIER";

/// Below this many multiply-adds a task switch costs more than it saves: run on the caller
/// (as `packed` and `matmul` decide).
const PARALLEL_MIN_MACS: usize = 1 << 17;

pub use crate::model::buf::HalfKind;

/// Row-major `[n, k]` half-precision weights borrowed from wherever they are stored.
#[derive(Clone, Copy)]
pub struct HalfView<'a> {
    pub kind: HalfKind,
    /// Output channels (rows).
    pub n: usize,
    /// Input channels (row length).
    pub k: usize,
    /// `n × k` values, row-major.
    pub data: &'a [u16],
}

impl<'a> HalfView<'a> {
    /// Checks that `data` is `n × k` long.
    pub fn new(kind: HalfKind, n: usize, k: usize, data: &'a [u16]) -> Result<Self, HalfError> {
        let expected = n.checked_mul(k).ok_or(HalfError::ShapeOverflow { n, k })?;
        if data.len() != expected {
            return Err(HalfError::Length {
                expected,
                actual: data.len(),
            });
        }
        Ok(Self { kind, n, k, data })
    }

    /// Output channel `j`'s weights.
    pub fn row(&self, j: usize) -> &'a [u16] {
        &self.data[j * self.k..(j + 1) * self.k]
    }

    /// Bytes a multiply streams.
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(self.data)
    }
}

/// The shape, not the (possibly hundreds of megabytes of) values.
impl fmt::Debug for HalfView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HalfView")
            .field("kind", &self.kind)
            .field("n", &self.n)
            .field("k", &self.k)
            .finish_non_exhaustive()
    }
}

/// Errors from describing weights or choosing a tier.
#[derive(Clone, Debug, PartialEq)]
pub enum HalfError {
    /// The data's length is not `n × k`.
    Length { expected: usize, actual: usize },
    /// `n × k` does not fit in `usize`.
    ShapeOverflow { n: usize, k: usize },
    /// A tier name that is not `scalar`, `avx2` or `avx512`.
    UnknownTier(String),
    /// A tier this CPU cannot run.
    TierUnsupported(Tier),
}

impl fmt::Display for HalfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Length { expected, actual } => {
                write!(f, "half weights: expected {expected} values, got {actual}")
            }
            Self::ShapeOverflow { n, k } => write!(f, "half matrix {n}x{k} is too large"),
            Self::UnknownTier(s) => {
                write!(
                    f,
                    "unknown half tier {s:?}; expected scalar, avx2 or avx512"
                )
            }
            Self::TierUnsupported(t) => write!(f, "this CPU cannot run the {t} half kernels"),
        }
    }
}

impl std::error::Error for HalfError {}

/// A kernel implementation. Ordered: each tier's CPU features include the lower tiers'.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    /// Portable reference.
    Scalar,
    /// AVX2 + FMA + F16C, 8 lanes.
    Avx2,
    /// AVX-512 F + BW, 16 lanes.
    Avx512,
}

impl Tier {
    /// Every tier, lowest first.
    pub const ALL: [Tier; 3] = [Tier::Scalar, Tier::Avx2, Tier::Avx512];

    /// The name [`TIER_ENV`] uses.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Scalar => "scalar",
            Tier::Avx2 => "avx2",
            Tier::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run the tier.
    pub fn is_supported(self) -> bool {
        match self {
            Tier::Scalar => true,
            Tier::Avx2 => cpu_has_avx2(),
            // AVX2 too, so the order above holds.
            Tier::Avx512 => cpu_has_avx2() && cpu_has_avx512(),
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
    type Err = HalfError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tier::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| HalfError::UnknownTier(s.to_owned()))
    }
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_avx512() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_avx2() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_avx512() -> bool {
    false
}

/// The tier [`matmul_half`] uses: the best this CPU has, or a lower one forced with
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
            eprintln!("edgemoe: {TIER_ENV}: {e}; using the {best} half kernels");
            best
        })
    })
}

/// The tier to use given a requested name (`None` or empty: no request) and the best supported
/// tier. Requests above `best` are refused, never honoured.
pub fn resolve_tier(requested: Option<&str>, best: Tier) -> Result<Tier, HalfError> {
    match requested.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(best),
        Some(name) => {
            let tier: Tier = name.parse()?;
            if tier > best {
                Err(HalfError::TierUnsupported(tier))
            } else {
                Ok(tier)
            }
        }
    }
}

/// `out[t*n + j] = Σ_i x[t*k + i]·w[j][i] (+ bias[j])` for `t < rows`, `j < w.n`, on the
/// [`active_tier`], split over output channels on the current rayon pool (callers run it inside
/// `pool.install`; inside `parallel::serially` it stays on the calling thread).
///
/// # Panics
/// If `x` is shorter than `rows × w.k`, `out` than `rows × w.n`, `bias` than `w.n`, or
/// `w.data` is not `w.n × w.k` long.
pub fn matmul_half(x: &[f32], rows: usize, w: HalfView, bias: Option<&[f32]>, out: &mut [f32]) {
    matmul_half_with_tier(active_tier(), x, rows, w, bias, out);
}

/// [`matmul_half`] on a given tier.
///
/// # Panics
/// If the CPU cannot run `tier`, or as [`matmul_half`].
pub fn matmul_half_with_tier(
    tier: Tier,
    x: &[f32],
    rows: usize,
    w: HalfView,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    assert!(
        tier.is_supported(),
        "the {tier} half tier is not supported by this CPU"
    );
    let (n, k) = (w.n, w.k);
    assert_eq!(Some(w.data.len()), n.checked_mul(k), "w.data is not n × k");
    assert!(
        rows.checked_mul(k).is_some_and(|len| x.len() >= len),
        "matmul_half: x shorter than rows × k"
    );
    assert!(
        rows.checked_mul(n).is_some_and(|len| out.len() >= len),
        "matmul_half: out shorter than rows × n"
    );
    if let Some(b) = bias {
        assert!(b.len() >= n, "matmul_half: bias shorter than n");
    }
    if rows == 0 || n == 0 {
        return;
    }
    let x = &x[..rows * k];
    let prepared = match tier {
        Tier::Scalar => None,
        // SAFETY (both arms): the tier's features were asserted above.
        #[cfg(target_arch = "x86_64")]
        Tier::Avx2 => Some(Prepared::new::<8>(w.kind, x, rows, k, |s, d| unsafe {
            avx2::deinterleave(s, d)
        })),
        #[cfg(target_arch = "x86_64")]
        Tier::Avx512 => Some(Prepared::new::<16>(w.kind, x, rows, k, |s, d| unsafe {
            avx512::deinterleave(s, d)
        })),
        #[cfg(not(target_arch = "x86_64"))]
        Tier::Avx2 | Tier::Avx512 => unreachable!("only the scalar tier exists here"),
    };
    let target = SendPtr(out.as_mut_ptr());
    let run = |cols: Range<usize>| {
        // SAFETY: `out` holds rows × n floats (asserted above) and stays mutably borrowed by this
        // call until every task has returned; the column ranges below are disjoint.
        let sink = unsafe { Sink::new(target, rows, n, bias, cols.clone()) };
        columns(tier, x, prepared.as_ref(), w, cols, &sink);
    };
    let threads = kernel_threads();
    if threads == 1 || rows.saturating_mul(n).saturating_mul(k) < PARALLEL_MIN_MACS {
        run(0..n);
    } else {
        // Several chunks per thread even out unequal finishing; whole tiles of four channels.
        let chunk = n.div_ceil(threads * 4).next_multiple_of(4);
        (0..n.div_ceil(chunk))
            .into_par_iter()
            .for_each(|c| run(c * chunk..((c + 1) * chunk).min(n)));
    }
    if let Some(Prepared {
        data: Cow::Owned(buf),
        ..
    }) = prepared
    {
        SPARE.set(buf);
    }
}

fn columns(
    tier: Tier,
    x: &[f32],
    prepared: Option<&Prepared>,
    w: HalfView,
    cols: Range<usize>,
    sink: &Sink,
) {
    let prepared = || prepared.expect("SIMD tiers get prepared activations");
    match tier {
        Tier::Scalar => scalar::columns(x, sink.rows, w, cols, sink),
        // SAFETY (both arms): `matmul_half_with_tier` asserted `tier.is_supported()`.
        #[cfg(target_arch = "x86_64")]
        Tier::Avx2 => unsafe { tiled::<avx2::Avx2>(prepared(), w, cols, sink) },
        #[cfg(target_arch = "x86_64")]
        Tier::Avx512 => unsafe { tiled::<avx512::Avx512>(prepared(), w, cols, sink) },
        #[cfg(not(target_arch = "x86_64"))]
        Tier::Avx2 | Tier::Avx512 => unreachable!("only the scalar tier exists here"),
    }
}

/// The activations as the SIMD kernels read them: each row zero padded to a whole number of
/// steps of `2·lanes` values and, for bf16, each step reordered to its even then its odd
/// elements, matching how the kernels widen a step of bf16 weights. f16 rows that need no
/// padding are read in place.
struct Prepared<'a> {
    data: Cow<'a, [f32]>,
    rows: usize,
    k_pad: usize,
}

thread_local! {
    /// The last call's activation buffer, reused: a fresh one of a prefill's size would be a
    /// new memory map, page faults included, on every call. (It keeps the largest activations
    /// a thread has passed allocated: rows × k floats.)
    static SPARE: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

impl<'a> Prepared<'a> {
    /// `deinterleave(src, dst)` reorders whole steps (both `2·LANES` long) for bf16.
    fn new<const LANES: usize>(
        kind: HalfKind,
        x: &'a [f32],
        rows: usize,
        k: usize,
        deinterleave: impl Fn(&[f32], &mut [f32]),
    ) -> Self {
        let step = 2 * LANES;
        let k_pad = k.next_multiple_of(step);
        if kind == HalfKind::F16 && k == k_pad {
            let data = Cow::Borrowed(x);
            return Self { data, rows, k_pad };
        }
        let mut data = SPARE.take();
        // Every value is written below; `resize` only fills what it adds.
        data.resize(rows * k_pad, 0.0);
        let whole = k - k % step;
        for (src, row) in x
            .chunks_exact(k.max(1))
            .zip(data.chunks_exact_mut(k_pad.max(1)))
        {
            match kind {
                HalfKind::F16 => {
                    row[..k].copy_from_slice(src);
                    row[k..].fill(0.0);
                }
                HalfKind::Bf16 => {
                    deinterleave(&src[..whole], &mut row[..whole]);
                    // The last, partial step: zero padded to a whole one, then reordered.
                    row[whole..].fill(0.0);
                    for (e, &v) in src[whole..].iter().enumerate() {
                        row[whole + e / 2 + (e % 2) * LANES] = v;
                    }
                }
            }
        }
        Self {
            data: Cow::Owned(data),
            rows,
            k_pad,
        }
    }

    fn row(&self, t: usize) -> &[f32] {
        &self.data[t * self.k_pad..(t + 1) * self.k_pad]
    }
}

/// Where a column task writes its results: `out[t*n + j]` for its own channels `j ∈ cols`.
struct Sink<'a> {
    out: SendPtr<f32>,
    rows: usize,
    n: usize,
    bias: Option<&'a [f32]>,
    cols: Range<usize>,
}

impl<'a> Sink<'a> {
    /// # Safety
    /// `out` must point to `rows × n` floats that are writable for the sink's lifetime and that
    /// nothing else reads or writes meanwhile, except other sinks with disjoint `cols`.
    unsafe fn new(
        out: SendPtr<f32>,
        rows: usize,
        n: usize,
        bias: Option<&'a [f32]>,
        cols: Range<usize>,
    ) -> Self {
        assert!(cols.end <= n, "columns {cols:?} outside 0..{n}");
        Self {
            out,
            rows,
            n,
            bias,
            cols,
        }
    }

    /// Writes `out[t][j] = acc (+ bias[j])`.
    #[inline]
    fn store(&self, t: usize, j: usize, acc: f32) {
        assert!(
            t < self.rows && self.cols.contains(&j),
            "({t}, {j}) outside this task"
        );
        let value = match self.bias {
            Some(b) => acc + b[j],
            None => acc,
        };
        // SAFETY: t < rows and j < n, so the index is inside `out` (`new`'s contract), and j is
        // one of this sink's channels, which no other live sink writes.
        unsafe { self.out.get().add(t * self.n + j).write(value) };
    }

    /// Stores a register tile: rows `t0..t0 + r`, channels `js`.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    #[inline]
    fn store_tile(&self, t0: usize, r: usize, js: &[usize], sums: &blocking::Sums) {
        assert!(
            t0 + r <= self.rows && js.iter().all(|j| self.cols.contains(j)),
            "tile ({t0}+{r}, {js:?}) outside this task"
        );
        for (i, row) in sums[..r].iter().enumerate() {
            for (&j, &acc) in js.iter().zip(row) {
                let value = match self.bias {
                    Some(b) => acc + b[j],
                    None => acc,
                };
                // SAFETY: as in `store`, with the bounds checked once above.
                unsafe { self.out.get().add((t0 + i) * self.n + j).write(value) };
            }
        }
    }
}

#[cfg(test)]
mod tests;
