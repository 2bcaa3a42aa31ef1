//! The W4A8 kernel against the CPU's scalar reference, bit for bit (the f32 part is the same
//! operations in the same order on both sides).

use super::common::*;
use edgemoe::backend::cpu::int8::int4::gemm_with_tier;
use edgemoe::backend::cpu::int8::Tier;
use edgemoe::backend::cuda::kernels::DeviceInt4;
use edgemoe::model::int4::{round_scale, Int4Matrix, GROUP_SIZES};

fn random_int4(rng: &mut Rng, n: usize, k: usize, group: usize, asym: bool) -> Int4Matrix {
    let kg = k.div_ceil(group);
    let u: Vec<u8> = (0..n * k).map(|_| rng.below(16) as u8).collect();
    let scales: Vec<f32> = (0..n * kg)
        .map(|_| round_scale(0.001 + rng.unit().abs() * 0.01))
        .collect();
    let zeros: Vec<u8> = (0..n * kg).map(|_| rng.below(16) as u8).collect();
    Int4Matrix::from_quantized(n, k, group, &u, &scales, asym.then_some(&zeros[..])).unwrap()
}

#[test]
fn w4a8_gemm_is_bit_exact_against_the_cpu() {
    let Some(b) = device("w4a8_gemm") else { return };
    let g = b.gpu();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let mut rng = Rng(29);
    let shapes = [
        (1, 1, 1),
        (1, 33, 65),
        (2, 17, 100),
        (7, 129, 576),
        (8, 300, 1000),
        (9, 127, 63),
        (64, 256, 1024),
        (129, 64, 2816),
    ];
    for &(m, n, k) in &shapes {
        for group in GROUP_SIZES {
            for asym in [false, true] {
                let (_, x) = random_activations(&mut rng, m, k);
                let w = random_int4(&mut rng, n, k, group, asym);
                let bias = rng.f32s(n, 1.0);
                let mut cpu = vec![0f32; m * n];
                gemm_with_tier(Tier::Scalar, &mut cpu, &x, &w, Some(&bias), &pool);
                let dw = DeviceInt4 {
                    n,
                    k,
                    k_padded: w.k_padded,
                    group,
                    data: g.upload(&w.data[..], "w4 values").unwrap(),
                    scales: g.upload(&w.scales[..], "w4 scales").unwrap(),
                    zeros: w
                        .zeros
                        .as_ref()
                        .map(|z| g.upload(&z[..], "w4 zeros").unwrap()),
                };
                let dbias = g.upload(&bias, "bias").unwrap();
                let out = g
                    .gemm_w4a8(&upload_quant(b, &x), &dw, Some(&dbias))
                    .unwrap();
                let out = g.download(&out, m * n, "out").unwrap();
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&out),
                    bits(&cpu),
                    "m {m} n {n} k {k} group {group} asym {asym}"
                );
            }
        }
    }
}
