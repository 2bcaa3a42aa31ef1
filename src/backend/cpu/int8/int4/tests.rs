//! Tests of the W4A8 kernels: the scalar reference against an independent f64 product of the
//! dequantized weights, and every tier the host supports against the scalar one, bit for bit.

use super::super::{quantize_rows_with_tier, QuantizedRows, Tier};
use super::*;
use crate::model::int4::round_scale;
use crate::util::rng::SplitMix64;

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("test thread pool")
}

fn random_matrix(rng: &mut SplitMix64, n: usize, k: usize, group: usize, asym: bool) -> Int4Matrix {
    let kg = k.div_ceil(group);
    let u: Vec<u8> = (0..n * k).map(|_| (rng.next_u64() % 16) as u8).collect();
    let scales: Vec<f32> = (0..n * kg)
        .map(|_| round_scale(0.001 + rng.normal().abs() * 0.01))
        .collect();
    let zeros: Vec<u8> = (0..n * kg).map(|_| (rng.next_u64() % 16) as u8).collect();
    Int4Matrix::from_quantized(n, k, group, &u, &scales, asym.then_some(&zeros[..]))
        .expect("valid matrix")
}

/// Rows of very different magnitudes, every fifth all zero.
fn random_activations(rng: &mut SplitMix64, rows: usize, k: usize) -> QuantizedRows {
    let mut x = Vec::with_capacity(rows * k);
    for t in 0..rows {
        let magnitude = if t % 5 == 4 {
            0.0
        } else {
            10f32.powi(t as i32 % 4 - 2)
        };
        x.extend((0..k).map(|_| rng.normal() * magnitude));
    }
    let mut q = QuantizedRows::new();
    quantize_rows_with_tier(Tier::Scalar, &x, rows, k, None, &mut q);
    q
}

fn run(
    tier: Tier,
    x: &QuantizedRows,
    w: &Int4Matrix,
    bias: Option<&[f32]>,
    threads: usize,
) -> Vec<f32> {
    let mut out = vec![f32::NAN; x.rows * w.n];
    gemm_with_tier(tier, &mut out, x, w, bias, &pool(threads));
    out
}

fn int4_tiers() -> Vec<Tier> {
    Tier::supported()
        .into_iter()
        .filter(|&t| int4_tier(t) == t)
        .collect()
}

const SHAPES: [(usize, usize, usize); 7] = [
    (1, 1, 1),
    (1, 16, 64),
    (1, 40, 576),
    (2, 33, 100),
    (5, 48, 1024),
    (9, 17, 130),
    (16, 64, 256),
];

#[test]
fn scalar_matches_an_f64_product_of_the_dequantized_weights() {
    let mut rng = SplitMix64::new(41);
    for &(rows, n, k) in &SHAPES {
        for group in crate::model::int4::GROUP_SIZES {
            for asym in [false, true] {
                let w = random_matrix(&mut rng, n, k, group, asym);
                let x = random_activations(&mut rng, rows, k);
                let bias: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
                let got = run(Tier::Scalar, &x, &w, Some(&bias), 1);
                for t in 0..rows {
                    for j in 0..n {
                        let wj = w.dequantize_row(j);
                        let terms = (0..k).map(|i| f64::from(x.row(t)[i]) * f64::from(wj[i]));
                        let mag: f64 = terms.clone().map(f64::abs).sum::<f64>();
                        let want = terms.sum::<f64>() * f64::from(x.scales[t]) + f64::from(bias[j]);
                        let tol = 1e-5 * mag * f64::from(x.scales[t])
                            + 1e-6 * f64::from(bias[j]).abs()
                            + 1e-7;
                        let g = f64::from(got[t * n + j]);
                        assert!(
                            (g - want).abs() <= tol,
                            "{rows}x{n}x{k} g{group} asym {asym} [{t}][{j}]: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn every_tier_is_bitwise_equal_to_scalar() {
    let tiers = int4_tiers();
    let mut rng = SplitMix64::new(7);
    for &(rows, n, k) in SHAPES.iter().chain(&[(20, 96, 704), (3, 130, 1536)]) {
        for group in crate::model::int4::GROUP_SIZES {
            for asym in [false, true] {
                let w = random_matrix(&mut rng, n, k, group, asym);
                let x = random_activations(&mut rng, rows, k);
                let bias: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
                for b in [None, Some(&bias[..])] {
                    let want = run(Tier::Scalar, &x, &w, b, 1);
                    for &tier in &tiers {
                        for threads in [1, 3] {
                            let got = run(tier, &x, &w, b, threads);
                            let same = got
                                .iter()
                                .zip(&want)
                                .all(|(a, b)| a.to_bits() == b.to_bits());
                            assert!(same, "{tier} ({threads} threads) differs: {rows}x{n}x{k} g{group} asym {asym}");
                        }
                    }
                }
            }
        }
    }
    eprintln!("int4 tiers checked against scalar: {tiers:?}");
}

#[test]
fn a_flipped_nibble_changes_the_output_in_every_tier() {
    // The comparison above can fail: a one-nibble change in the weights shows in every tier.
    let mut rng = SplitMix64::new(3);
    let (n, k) = (16, 256);
    let w = random_matrix(&mut rng, n, k, 64, false);
    let x = random_activations(&mut rng, 1, k);
    let mut data = w.data.to_vec();
    data[100] ^= 0x10;
    let w2 = Int4Matrix::from_parts(n, k, 64, data.into(), w.scales.clone(), None).unwrap();
    for tier in int4_tiers() {
        assert_ne!(
            run(tier, &x, &w, None, 1),
            run(tier, &x, &w2, None, 1),
            "{tier}"
        );
    }
}
