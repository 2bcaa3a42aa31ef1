//! Tests of the int8 kernels: every tier the host supports against the scalar reference.

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
                .map(|i| sx / 2.0 * f64::from(wr[i].abs()) + sx * f64::from(qx[i].abs()) * sw / 2.0)
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
    let m =
        Int8Matrix::from_quantized(2, 3, &[1, -2, 3, 127, -127, 5], vec![0.5, 2.0]).expect("valid");
    assert_eq!((m.k_padded, m.data.len()), (64, 128));
    assert_eq!(&m.row(1)[..4], &[127, -127, 5, 0]);
    assert_eq!(&*m.row_sums, &[2, 5]);
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
    assert_eq!(&*r.scales, &[1.0 / 127.0, 1.0]);
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
        Err(TierError::TierUnsupported(Tier::Avx512Vnni))
    );
    assert!(matches!(
        resolve_tier(Some("sse9"), Tier::Avx2),
        Err(TierError::UnknownTier(_))
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
    // 1536 × 576 is worth three chunks by size; two threads get two, not a 2 : 1 split.
    assert_eq!(
        column_chunks(1, 1536, 576, 2).len(),
        2,
        "whole chunks per thread"
    );
}

/// One token's GEMV goes through `dot_runs` in blocks of runs with a narrow tile left over:
/// several blocks, a partial block and every remainder width, on every tier.
#[test]
fn one_token_runs_match_scalar_bitwise() {
    let mut rng = Rng(5);
    for &n in &[4, 515, 1030, 2051, 2052, 2053] {
        for &k in &[64, 130] {
            let w = random_matrix(&mut rng, n, k);
            let bias = rng.f32s(n, 1.0);
            let x = random_activations(&mut rng, 1, k);
            let reference = run(Tier::Scalar, &x, &w, Some(&bias));
            for tier in Tier::supported() {
                let what = format!("{tier} n={n} k={k}");
                assert_bitwise_eq(&run(tier, &x, &w, Some(&bias)), &reference, &what);
            }
        }
    }
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

/// Stored parts are taken unread; `validate` finds each value a crafted or corrupt file could
/// hold that the kernels do not expect.
#[test]
fn stored_parts_are_validated_on_request() {
    let w: Vec<f32> = (0..3 * 70).map(|i| (i as f32 * 0.37).sin()).collect();
    let good = Int8Matrix::quantize_rtn(&w, 3, 70).unwrap();
    let parts = |m: &Int8Matrix| {
        Int8Matrix::from_parts(
            m.n,
            m.k,
            m.data.to_vec().into(),
            m.scales.to_vec().into(),
            m.row_sums.to_vec().into(),
        )
        .unwrap()
    };
    assert_eq!(parts(&good).validate(), Ok(()));
    let kp = good.k_padded;
    let mut bad = parts(&good);
    bad.data.make_mut()[kp + 5] = i8::MIN;
    assert_eq!(
        bad.validate(),
        Err(Int8Error::WeightOutOfRange { row: 1, col: 5 })
    );
    let mut bad = parts(&good);
    bad.data.make_mut()[2 * kp + 71] = 1;
    assert_eq!(bad.validate(), Err(Int8Error::Padding { row: 2, col: 71 }));
    let mut bad = parts(&good);
    bad.row_sums.make_mut()[0] += 1;
    assert_eq!(bad.validate(), Err(Int8Error::RowSum { row: 0 }));
    let mut bad = parts(&good);
    bad.scales.make_mut()[2] = f32::NAN;
    assert!(matches!(
        bad.validate(),
        Err(Int8Error::NonFinite { row: 2, .. })
    ));
    // Lengths are checked at once.
    let short = Int8Matrix::from_parts(
        3,
        70,
        vec![0; 10].into(),
        vec![1.0; 3].into(),
        vec![0; 3].into(),
    );
    assert!(short.is_err());
}
