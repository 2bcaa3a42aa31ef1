//! Every kernel but attention against the CPU engine's own code or a plain loop.

use super::common::*;
use edgemoe::backend::cpu::int8::{gemm_with_tier, quantize_rows_smoothed, QuantizedRows, Tier};
use edgemoe::backend::cpu::ops::{gated_activation, norm_rows, Rope};
use edgemoe::backend::cpu::routing::route_rows;
use edgemoe::backend::cuda::kernels::{GemmKernel, OutType};
use edgemoe::backend::cuda::params::*;
use edgemoe::model::config::Activation;
use edgemoe::model::weights::Norm;
use std::mem::{offset_of, size_of};

#[test]
fn params_layout_agrees_between_nvcc_and_rust() {
    let Some(b) = device("params_layout") else {
        return;
    };
    let got = b.gpu().params_layout().unwrap();
    let want = [
        size_of::<EmGemmParams>(),
        offset_of!(EmGemmParams, m),
        offset_of!(EmGemmParams, n),
        offset_of!(EmGemmParams, k_padded),
        offset_of!(EmGemmParams, ldc),
        offset_of!(EmGemmParams, out_type),
        offset_of!(EmGemmParams, write_acc),
        offset_of!(EmGemmParams, has_bias),
        size_of::<EmQuantParams>(),
        offset_of!(EmQuantParams, rows),
        offset_of!(EmQuantParams, cols),
        offset_of!(EmQuantParams, k_padded),
        offset_of!(EmQuantParams, rms_norm),
        offset_of!(EmQuantParams, eps),
        offset_of!(EmQuantParams, has_smooth),
        size_of::<EmAttnParams>(),
        offset_of!(EmAttnParams, q_rows),
        offset_of!(EmAttnParams, num_heads),
        offset_of!(EmAttnParams, num_kv_heads),
        offset_of!(EmAttnParams, head_dim),
        offset_of!(EmAttnParams, slots),
        offset_of!(EmAttnParams, split_len),
        offset_of!(EmAttnParams, splits),
        offset_of!(EmAttnParams, window),
        offset_of!(EmAttnParams, scale),
        offset_of!(EmAttnParams, want_mass),
        size_of::<EmRouteParams>(),
        offset_of!(EmRouteParams, rows),
        offset_of!(EmRouteParams, experts),
        offset_of!(EmRouteParams, top_k),
        offset_of!(EmRouteParams, renormalize),
    ];
    let got: Vec<usize> = got[..want.len()].iter().map(|&v| v as usize).collect();
    assert_eq!(got, want, "nvcc's layout of params.h differs from Rust's");
}

/// Plain int32 dot products of padded rows: the reference for the accumulators.
fn reference_acc(x: &QuantizedRows, w: &edgemoe::backend::cpu::int8::Int8Matrix) -> Vec<i32> {
    let mut acc = vec![0i32; x.rows * w.n];
    for t in 0..x.rows {
        for j in 0..w.n {
            acc[t * w.n + j] = x
                .row(t)
                .iter()
                .zip(w.row(j))
                .map(|(&a, &b)| a as i32 * b as i32)
                .sum();
        }
    }
    acc
}

#[test]
fn w8a8_gemm_is_bit_exact_on_odd_shapes_for_every_kernel() {
    let Some(b) = device("w8a8_gemm") else { return };
    let g = b.gpu();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let mut rng = Rng(17);
    let shapes = [
        (1, 1, 1),
        (1, 33, 65),
        (2, 17, 100),
        (3, 128, 64),
        (7, 129, 191),
        (8, 300, 1000),
        (9, 127, 63),
        (33, 255, 129),
        (64, 64, 4096),
        (65, 130, 200),
        (127, 1, 64),
        (128, 128, 128),
        (129, 257, 320),
        (300, 77, 96),
        (513, 200, 1024),
    ];
    for &(m, n, k) in &shapes {
        let (_, x) = random_activations(&mut rng, m, k);
        let w = random_matrix(&mut rng, n, k);
        let bias = rng.f32s(n, 1.0);
        let acc_ref = reference_acc(&x, &w);
        let mut cpu = vec![0f32; m * n];
        gemm_with_tier(Tier::Scalar, &mut cpu, &x, &w, Some(&bias), &pool);
        let (dx, dw) = (upload_quant(b, &x), upload_matrix(b, &w));
        let dbias = g.upload(&bias, "bias").unwrap();
        let kernels: &[GemmKernel] = if m <= 8 {
            &[GemmKernel::Gemv, GemmKernel::Small, GemmKernel::Large]
        } else {
            &[GemmKernel::Small, GemmKernel::Large]
        };
        for &kernel in kernels {
            let mut out = g.zeros::<f32>(m * n, "out").unwrap();
            let mut acc = g.zeros::<i32>(m * n, "acc").unwrap();
            g.gemm_w8a8(
                kernel,
                &dx,
                &dw,
                Some(&dbias),
                OutType::F32,
                &mut out,
                Some(&mut acc),
            )
            .unwrap();
            let acc = g.download(&acc, m * n, "acc").unwrap();
            let out = g.download(&out, m * n, "out").unwrap();
            assert_eq!(acc, acc_ref, "{kernel:?} accumulators, m {m} n {n} k {k}");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&out),
                bits(&cpu),
                "{kernel:?} f32 outputs, m {m} n {n} k {k}"
            );
        }
        // The half-precision epilogues round the same f32 value once.
        for (ty, conv) in [
            (
                OutType::F16,
                (|v: f32| half::f16::from_f32(v).to_bits()) as fn(f32) -> u16,
            ),
            (OutType::Bf16, |v: f32| half::bf16::from_f32(v).to_bits()),
        ] {
            let mut out = g.zeros::<u16>(m * n, "out").unwrap();
            g.gemm_w8a8(GemmKernel::Auto, &dx, &dw, Some(&dbias), ty, &mut out, None)
                .unwrap();
            let out = g.download(&out, m * n, "out").unwrap();
            let want: Vec<u16> = cpu.iter().map(|&v| conv(v)).collect();
            assert_eq!(out, want, "{ty:?} outputs, m {m} n {n} k {k}");
        }
    }
}

#[test]
fn quantization_matches_the_cpu_byte_for_byte() {
    let Some(b) = device("quantize") else { return };
    let g = b.gpu();
    let mut rng = Rng(5);
    for &(rows, cols) in &[(1, 1), (3, 63), (5, 64), (9, 577), (17, 4096)] {
        let mut x = Vec::new();
        for t in 0..rows {
            let mag = [1e-3, 1.0, 300.0, 0.0][t % 4];
            x.extend(rng.f32s(cols, mag));
        }
        if rows > 2 {
            x[cols + cols / 2] = f32::NAN; // row 1 becomes all zeros with scale NaN
        }
        let smooth: Vec<f32> = (0..cols).map(|_| 0.5 + rng.unit().abs()).collect();
        for with_smooth in [false, true] {
            let s = with_smooth.then_some(&smooth[..]);
            let mut want = QuantizedRows::new();
            quantize_rows_smoothed(&x, rows, cols, s, &mut want);
            let dx = g.upload(&x, "x").unwrap();
            let ds = g.upload(&smooth, "smooth").unwrap();
            let q = g
                .quantize(&dx, rows, cols, None, with_smooth.then_some(&ds))
                .unwrap();
            assert_eq!(
                g.download(&q.q, rows * q.k_padded, "q").unwrap(),
                want.data,
                "rows {rows} cols {cols}"
            );
            let sbits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                sbits(&g.download(&q.scales, rows, "s").unwrap()),
                sbits(&want.scales)
            );
        }
        // Fused RMS norm + quantization: the normalized rows within f32 summation-order noise
        // of the CPU's, and their quantization exactly the CPU's quantization of them.
        let x: Vec<f32> = x
            .iter()
            .map(|v| if v.is_nan() { 0.5 } else { *v })
            .collect();
        let weight = rng.f32s(cols, 2.0);
        let norm = Norm::Rms {
            name: "n".into(),
            weight: weight.clone(),
            eps: 1e-5,
        };
        let mut cpu_normed = vec![0f32; rows * cols];
        norm_rows(&norm, &x, cols, &mut cpu_normed);
        let (dx, dw) = (g.upload(&x, "x").unwrap(), g.upload(&weight, "w").unwrap());
        let mut normed = g.zeros::<f32>(rows * cols, "normed").unwrap();
        let q = g
            .quantize(&dx, rows, cols, Some((&dw, 1e-5, &mut normed)), None)
            .unwrap();
        let normed = g.download(&normed, rows * cols, "normed").unwrap();
        assert!(
            rel_err(&normed, &cpu_normed) < 1e-5,
            "fused norm, rows {rows} cols {cols}"
        );
        let mut want = QuantizedRows::new();
        quantize_rows_smoothed(&normed, rows, cols, None, &mut want);
        assert_eq!(g.download(&q.q, rows * q.k_padded, "q").unwrap(), want.data);
    }
}

#[test]
fn norms_rope_activations_and_adds_match_the_cpu() {
    let Some(b) = device("elementwise") else {
        return;
    };
    let g = b.gpu();
    let mut rng = Rng(9);
    let (rows, dim) = (7, 320);
    let x = rng.f32s(rows * dim, 3.0);
    let dx = g.upload(&x, "x").unwrap();
    let (w, bias) = (rng.f32s(dim, 1.5), rng.f32s(dim, 0.5));
    for norm in [
        Norm::Rms {
            name: "r".into(),
            weight: w.clone(),
            eps: 1e-6,
        },
        Norm::Layer {
            name: "l".into(),
            weight: w.clone(),
            bias: bias.clone(),
            eps: 1e-5,
        },
    ] {
        let mut want = vec![0f32; rows * dim];
        norm_rows(&norm, &x, dim, &mut want);
        let dw = g.upload(&w, "w").unwrap();
        let db = g.upload(&bias, "b").unwrap();
        let is_layer = matches!(norm, Norm::Layer { .. });
        let got = g
            .norm(
                &dx,
                rows,
                dim,
                &dw,
                is_layer.then_some(&db),
                if is_layer { 1e-5 } else { 1e-6 },
            )
            .unwrap();
        assert!(rel_err(&g.download(&got, rows * dim, "n").unwrap(), &want) < 1e-5);
    }
    // RoPE: bit-exact (the same angles, the same four roundings).
    let (head_dim, heads) = (64, 5);
    let positions: Vec<usize> = (0..rows).map(|i| 3 + 7 * i).collect();
    let mut xr = rng.f32s(rows * heads * head_dim, 2.0);
    let table = Rope::new(head_dim, 10000.0).table(&positions);
    let backend_rope = edgemoe::backend::Backend::rope_table(b, head_dim, 10000.0, &positions);
    let mut dev = edgemoe::backend::cuda::DeviceRows::from_host(b, &xr, heads * head_dim);
    edgemoe::backend::Backend::apply_rope(b, &mut dev, &backend_rope, 0);
    for r in 0..rows {
        table.apply(r, &mut xr[r * heads * head_dim..(r + 1) * heads * head_dim]);
    }
    let got = edgemoe::backend::Backend::to_host(b, &dev).into_owned();
    assert_eq!(
        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        xr.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    // Gated activations (expf vs the CPU's exp: a few ulps) and the residual add (exact).
    for act in [
        Activation::Silu,
        Activation::Relu,
        Activation::Gelu,
        Activation::GeluTanh,
    ] {
        let (gate, up) = (rng.f32s(1000, 6.0), rng.f32s(1000, 2.0));
        let mut want = gate.clone();
        gated_activation(act, &mut want, &up);
        let mut dg = g.upload(&gate, "g").unwrap();
        let du = g.upload(&up, "u").unwrap();
        let id = edgemoe::backend::cuda::kernels::activation_id(act);
        g.gated_act(&mut dg, &du, 1000, id).unwrap();
        assert!(
            rel_err(&g.download(&dg, 1000, "g").unwrap(), &want) < 1e-5,
            "{act:?}"
        );
    }
    let (a, c) = (rng.f32s(999, 1.0), rng.f32s(999, 1.0));
    let mut da = g.upload(&a, "a").unwrap();
    g.add(&mut da, &g.upload(&c, "c").unwrap(), 999).unwrap();
    let want: Vec<f32> = a.iter().zip(&c).map(|(x, y)| x + y).collect();
    assert_eq!(g.download(&da, 999, "a").unwrap(), want);
    // The block Hadamard transform of a rotated model's down-projection input (sums in another
    // order than the CPU's butterflies: within 1e-5 relative).
    for (rows, width, block) in [(3usize, 1536usize, 512usize), (2, 4096, 4096), (5, 96, 32)] {
        let x = rng.f32s(rows * width, 3.0);
        let mut want = x.clone();
        edgemoe::backend::cpu::ops::hadamard_in_blocks(&mut want, block);
        let mut dx = g.upload(&x, "h").unwrap();
        g.hadamard(&mut dx, rows * width, block).unwrap();
        let got = g.download(&dx, rows * width, "h").unwrap();
        assert!(rel_err(&got, &want) < 1e-5, "hadamard {width}/{block}");
    }
    // Embedding gather and the weighted scatter-add of expert outputs.
    let table = rng.f32s(50 * 24, 1.0);
    let index = [3usize, 49, 0, 3, 17];
    let got = g
        .gather_rows(&g.upload(&table, "t").unwrap(), 50, 24, &index)
        .unwrap();
    let want: Vec<f32> = index
        .iter()
        .flat_map(|&i| table[i * 24..(i + 1) * 24].to_vec())
        .collect();
    assert_eq!(g.download(&got, want.len(), "e").unwrap(), want);
    let (out0, y) = (rng.f32s(6 * 24, 1.0), rng.f32s(3 * 24, 1.0));
    let (prow, pw) = ([4usize, 0, 2], [0.25f32, 0.5, 0.125]);
    let mut dout = g.upload(&out0, "o").unwrap();
    g.mix_rows(&mut dout, 6, 24, &g.upload(&y, "y").unwrap(), &prow, &pw)
        .unwrap();
    let mut want = out0.clone();
    for (i, (&r, &wt)) in prow.iter().zip(&pw).enumerate() {
        for j in 0..24 {
            want[r * 24 + j] += wt * y[i * 24 + j];
        }
    }
    assert_eq!(g.download(&dout, 6 * 24, "o").unwrap(), want);
}

#[test]
fn device_routing_and_expert_sort_match_the_cpu() {
    let Some(b) = device("route") else { return };
    let g = b.gpu();
    let mut rng = Rng(3);
    for &(rows, experts, top_k) in &[(1, 8, 2), (37, 8, 2), (5, 60, 4), (64, 64, 8), (3, 4, 1)] {
        let mut logits = rng.f32s(rows * experts, 4.0);
        logits[1] = logits[0]; // a tie: the lower expert wins on both
        for renorm in [false, true] {
            let want = route_rows(&logits, experts, top_k, renorm, 0);
            let (ids, ws) = g
                .route(
                    &g.upload(&logits, "l").unwrap(),
                    rows,
                    experts,
                    top_k,
                    renorm,
                )
                .unwrap();
            let ids = g.download(&ids, rows * top_k, "ids").unwrap();
            let ws = g.download(&ws, rows * top_k, "ws").unwrap();
            for (i, p) in want.iter().enumerate() {
                assert_eq!(
                    ids[i] as usize,
                    p.expert,
                    "row {} pick {}",
                    p.row,
                    i % top_k
                );
                assert!(
                    (ws[i] - p.weight).abs() <= 1e-6 * p.weight.abs().max(1e-3),
                    "weight {i}"
                );
            }
            // The stable sort by expert that grouped execution runs on.
            let n = rows * top_k;
            let (offsets, order) = g
                .moe_sort(&g.upload(&ids, "ids").unwrap(), n, experts)
                .unwrap();
            let offsets = g.download(&offsets, experts + 1, "off").unwrap();
            let order = g.download(&order, n, "order").unwrap();
            let mut want_order: Vec<i32> = (0..n as i32).collect();
            want_order.sort_by_key(|&i| ids[i as usize]);
            assert_eq!(order, want_order);
            for e in 0..experts {
                let count = ids.iter().filter(|&&x| x as usize == e).count() as i32;
                assert_eq!(offsets[e + 1] - offsets[e], count);
            }
        }
    }
}

#[test]
fn grouped_expert_gemm_equals_one_gemm_per_expert() {
    let Some(b) = device("grouped_gemm") else {
        return;
    };
    let g = b.gpu();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let mut rng = Rng(11);
    let (experts, n, k) = (6, 200, 320);
    let counts = [5usize, 0, 40, 1, 33, 7];
    let mats: Vec<_> = (0..experts)
        .map(|_| random_matrix(&mut rng, n, k))
        .collect();
    let total: usize = counts.iter().sum();
    let (_, x) = random_activations(&mut rng, total, k);
    let mut offsets = vec![0usize];
    for c in counts {
        offsets.push(offsets.last().unwrap() + c);
    }
    let dev: Vec<_> = mats.iter().map(|m| upload_matrix(b, m)).collect();
    let refs: Vec<_> = dev.iter().collect();
    let doff = g
        .upload(
            &offsets.iter().map(|&o| o as i32).collect::<Vec<_>>(),
            "off",
        )
        .unwrap();
    let got = g
        .gemm_grouped(&upload_quant(b, &x), &refs, &doff, &offsets, None)
        .unwrap();
    let got = g.download(&got, total * n, "out").unwrap();
    for e in 0..experts {
        let (r0, r1) = (offsets[e], offsets[e + 1]);
        if r0 == r1 {
            continue;
        }
        let part = QuantizedRows {
            data: x.data[r0 * x.k_padded..r1 * x.k_padded].to_vec(),
            scales: x.scales[r0..r1].to_vec(),
            rows: r1 - r0,
            k: x.k,
            k_padded: x.k_padded,
        };
        let mut want = vec![0f32; (r1 - r0) * n];
        gemm_with_tier(Tier::Scalar, &mut want, &part, &mats[e], None, &pool);
        assert_eq!(&got[r0 * n..r1 * n], &want[..], "expert {e}");
    }
}
