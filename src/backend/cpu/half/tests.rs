//! Tests of the half kernels: every tier the host supports against an f64 reference and against
//! the scalar tier, over odd shapes, plus the non-finite cases and tier selection.

use super::*;
use crate::util::rng::SplitMix64;

const KINDS: [HalfKind; 2] = [HalfKind::Bf16, HalfKind::F16];

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("test thread pool")
}

/// Normal weights of several magnitudes (well inside f16's range), rounded to `kind`.
fn weights(rng: &mut SplitMix64, kind: HalfKind, n: usize, k: usize) -> Vec<u16> {
    (0..n * k)
        .map(|i| kind.from_f32(rng.normal() * [0.02, 1.0, 30.0][i % 3]))
        .collect()
}

fn f32s(rng: &mut SplitMix64, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.normal()).collect()
}

fn run(tier: Tier, x: &[f32], rows: usize, w: HalfView, bias: Option<&[f32]>) -> Vec<f32> {
    let mut out = vec![f32::NAN; rows * w.n];
    matmul_half_with_tier(tier, x, rows, w, bias, &mut out);
    out
}

/// The exact product (f64 sums of exactly widened weights) and `Σ|x·w| + |bias|` per output.
fn reference(x: &[f32], rows: usize, w: HalfView, bias: Option<&[f32]>) -> (Vec<f64>, Vec<f64>) {
    let (n, k) = (w.n, w.k);
    let mut exact = vec![0f64; rows * n];
    let mut scale = vec![0f64; rows * n];
    for t in 0..rows {
        for j in 0..n {
            let b = bias.map_or(0.0, |b| f64::from(b[j]));
            let (mut s, mut a) = (b, b.abs());
            for (&xv, &wv) in x[t * k..(t + 1) * k].iter().zip(w.row(j)) {
                let p = f64::from(xv) * f64::from(w.kind.to_f32(wv));
                s += p;
                a += p.abs();
            }
            exact[t * n + j] = s;
            scale[t * n + j] = a;
        }
    }
    (exact, scale)
}

/// Error bound of an f32 sum: every term passes through at most `k + 5` roundings (a product
/// or FMA per step, at most 4 adds of a 16-lane horizontal sum, the bias), so the classic
/// bound |ŝ − s| ≤ γ_m·Σ|terms| with γ_m = m·u / (1 − m·u), u = 2⁻²⁴, holds for any order.
/// A dropped, doubled or misplaced term (even of the tail) costs ~Σ|terms|/k, far above it.
fn gamma(k: usize) -> f64 {
    let mu = (k + 5) as f64 * f64::from(f32::EPSILON) / 2.0;
    mu / (1.0 - mu)
}

#[test]
fn every_tier_matches_the_f64_reference_and_the_scalar_tier() {
    let mut rng = SplitMix64::new(1);
    let pool = pool(2);
    let tiers = Tier::supported();
    let mut row_counts: Vec<usize> = (1..=9).collect();
    row_counts.extend([17, 64]);
    for kind in KINDS {
        for k in [1, 7, 31, 64, 100, 1000] {
            for n in [1, 3, 7, 13, 64, 100] {
                let data = weights(&mut rng, kind, n, k);
                let w = HalfView::new(kind, n, k, &data).unwrap();
                let b = f32s(&mut rng, n);
                for &rows in &row_counts {
                    let x = f32s(&mut rng, rows * k);
                    for bias in [None, Some(b.as_slice())] {
                        let (exact, scale) = reference(&x, rows, w, bias);
                        let what =
                            format!("{kind:?} rows={rows} n={n} k={k} bias={}", bias.is_some());
                        let scalar = pool.install(|| run(Tier::Scalar, &x, rows, w, bias));
                        for &tier in &tiers {
                            let got = pool.install(|| run(tier, &x, rows, w, bias));
                            for i in 0..rows * n {
                                let tol = gamma(k) * scale[i] + 1e-30;
                                let err = (f64::from(got[i]) - exact[i]).abs();
                                assert!(
                                    err <= tol,
                                    "{tier} {what} [{i}]: {} vs {}",
                                    got[i],
                                    exact[i]
                                );
                                let diff = (f64::from(got[i]) - f64::from(scalar[i])).abs();
                                assert!(diff <= 2.0 * tol, "{tier} vs scalar {what} [{i}]");
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn results_do_not_depend_on_batch_tile_or_threads() {
    let mut rng = SplitMix64::new(2);
    let (one, two) = (pool(1), pool(2));
    for kind in KINDS {
        for (rows, n, k) in [(9, 37, 100), (8, 130, 1000), (20, 70, 64), (5, 13, 333)] {
            let data = weights(&mut rng, kind, n, k);
            let w = HalfView::new(kind, n, k, &data).unwrap();
            let x = f32s(&mut rng, rows * k);
            for tier in Tier::supported() {
                let what = format!("{tier} {kind:?} {rows}x{n}x{k}");
                let all = two.install(|| run(tier, &x, rows, w, None));
                assert_eq!(
                    one.install(|| run(tier, &x, rows, w, None)),
                    all,
                    "{what}: threads"
                );
                let serial = two.install(|| {
                    crate::backend::cpu::parallel::serially(|| run(tier, &x, rows, w, None))
                });
                assert_eq!(serial, all, "{what}: serially");
                for t in 0..rows {
                    let alone = two.install(|| run(tier, &x[t * k..(t + 1) * k], 1, w, None));
                    assert_eq!(alone, all[t * n..(t + 1) * n], "{what}: row {t} alone");
                }
            }
        }
    }
}

#[test]
fn a_nan_activation_reaches_every_output_of_its_row() {
    let mut rng = SplitMix64::new(3);
    for kind in KINDS {
        for k in [1, 7, 31, 64, 100] {
            let (rows, n) = (3, 9);
            let data = weights(&mut rng, kind, n, k);
            let w = HalfView::new(kind, n, k, &data).unwrap();
            for at in [0, k / 2, k - 1] {
                let mut x = f32s(&mut rng, rows * k);
                x[k + at] = f32::NAN; // row 1
                for tier in Tier::supported() {
                    let out = run(tier, &x, rows, w, None);
                    for (i, v) in out.iter().enumerate() {
                        let in_row_1 = i / n == 1;
                        assert_eq!(
                            v.is_nan(),
                            in_row_1,
                            "{tier} {kind:?} k={k} at={at} [{i}]: {v}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn an_infinite_weight_is_never_hidden() {
    let mut rng = SplitMix64::new(4);
    let infinities = [
        (HalfKind::F16, 0x7c00, 0xfc00),
        (HalfKind::Bf16, 0x7f80, 0xff80),
    ];
    for (kind, pos, neg) in infinities {
        assert_eq!(kind.to_f32(pos), f32::INFINITY);
        assert_eq!(kind.to_f32(neg), f32::NEG_INFINITY);
        for k in [1, 7, 31, 64, 100] {
            let (rows, n) = (2, 5);
            for at in [0, k - 1] {
                let mut data = weights(&mut rng, kind, n, k);
                data[2 * k + at] = pos; // channel 2
                data[4 * k + at] = neg; // channel 4
                let w = HalfView::new(kind, n, k, &data).unwrap();
                let mut x = f32s(&mut rng, rows * k);
                x[at] = 1.5; // row 0: ±inf
                x[k + at] = 0.0; // row 1: 0·inf = NaN
                for tier in Tier::supported() {
                    let out = run(tier, &x, rows, w, None);
                    let what = format!("{tier} {kind:?} k={k} at={at}");
                    assert_eq!(out[2], f32::INFINITY, "{what}");
                    assert_eq!(out[4], f32::NEG_INFINITY, "{what}");
                    assert!(out[n + 2].is_nan() && out[n + 4].is_nan(), "{what}");
                    for j in [0, 1, 3] {
                        assert!(out[j].is_finite() && out[n + j].is_finite(), "{what} [{j}]");
                    }
                }
            }
        }
    }
}

#[test]
fn widening_is_exact_for_special_values() {
    // f16: smallest subnormal, largest normal, -0, NaN; bf16: the same bits as f32's top half.
    assert_eq!(HalfKind::F16.to_f32(0x0001), 2f32.powi(-24));
    assert_eq!(HalfKind::F16.to_f32(0x7bff), 65504.0);
    assert_eq!(HalfKind::F16.to_f32(0x8000).to_bits(), (-0f32).to_bits());
    assert!(HalfKind::F16.to_f32(0x7e00).is_nan());
    assert_eq!(HalfKind::Bf16.to_f32(0x3f80), 1.0);
    assert_eq!(HalfKind::Bf16.to_f32(0x0001), f32::from_bits(0x0001_0000));
    // Every SIMD tier widens the same way: a one-hot x reads each weight back exactly.
    for kind in KINDS {
        let k = 40;
        let data: Vec<u16> = (0..k as u16)
            .map(|i| [0x0001, 0x03ff, 0x8001, 0x3c01][i as usize % 4] + i)
            .collect();
        let w = HalfView::new(kind, 1, k, &data).unwrap();
        for tier in Tier::supported() {
            for i in 0..k {
                let mut x = vec![0f32; k];
                x[i] = 1.0;
                let got = run(tier, &x, 1, w, None)[0];
                assert_eq!(got, kind.to_f32(data[i]), "{tier} {kind:?} weight {i}");
            }
        }
    }
}

#[test]
fn empty_shapes_and_zero_k() {
    let data = [0u16; 0];
    for tier in Tier::supported() {
        let w = HalfView::new(HalfKind::Bf16, 3, 0, &data).unwrap();
        let mut out = vec![f32::NAN; 6];
        matmul_half_with_tier(tier, &[], 2, w, Some(&[1.0, 2.0, 3.0]), &mut out);
        assert_eq!(
            out,
            [1.0, 2.0, 3.0, 1.0, 2.0, 3.0],
            "{tier}: k = 0 gives the bias"
        );
        let w = HalfView::new(HalfKind::F16, 0, 4, &data).unwrap();
        matmul_half_with_tier(tier, &[0.0; 8], 2, w, None, &mut []);
        matmul_half_with_tier(tier, &[], 0, w, None, &mut []);
    }
}

#[test]
#[should_panic(expected = "out shorter")]
fn a_short_output_panics() {
    let data = [0u16; 12];
    let w = HalfView::new(HalfKind::F16, 3, 4, &data).unwrap();
    matmul_half(&[0.0; 8], 2, w, None, &mut [0.0; 5]);
}

#[test]
fn views_check_their_length() {
    let data = [0u16; 12];
    assert!(HalfView::new(HalfKind::Bf16, 3, 4, &data).is_ok());
    assert_eq!(
        HalfView::new(HalfKind::Bf16, 4, 4, &data).unwrap_err(),
        HalfError::Length {
            expected: 16,
            actual: 12
        }
    );
    assert!(matches!(
        HalfView::new(HalfKind::F16, usize::MAX, 2, &data),
        Err(HalfError::ShapeOverflow { .. })
    ));
}

#[test]
fn tier_names_parse_and_unknown_names_are_errors() {
    for tier in Tier::ALL {
        assert_eq!(tier.name().parse::<Tier>(), Ok(tier));
        assert_eq!(tier.name().to_uppercase().parse::<Tier>(), Ok(tier));
    }
    assert_eq!(" avx2 ".parse::<Tier>(), Ok(Tier::Avx2));
    assert_eq!(
        "avx512bf16".parse::<Tier>(),
        Err(HalfError::UnknownTier("avx512bf16".into()))
    );
    let best = Tier::Avx512;
    assert_eq!(resolve_tier(None, best), Ok(best));
    assert_eq!(resolve_tier(Some(""), best), Ok(best));
    assert_eq!(resolve_tier(Some("scalar"), best), Ok(Tier::Scalar));
    assert_eq!(resolve_tier(Some("avx2"), best), Ok(Tier::Avx2));
    assert!(matches!(
        resolve_tier(Some("sse"), best),
        Err(HalfError::UnknownTier(_))
    ));
    assert_eq!(
        resolve_tier(Some("avx512"), Tier::Avx2),
        Err(HalfError::TierUnsupported(Tier::Avx512))
    );
    assert!(active_tier().is_supported());
    assert!(Tier::supported().contains(&Tier::Scalar));
}
