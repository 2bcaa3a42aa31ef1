//! Masked split-KV attention against an f64 reference: GQA, a sliding window, invalid slots,
//! a slot → position map that is not the identity (as after eviction), prefill and decode,
//! forced small splits (the log-sum-exp merge), and the per-slot attention mass.

use super::common::*;
use edgemoe::backend::cuda::kernels::{AttnInputs, AttnShape};

struct Case {
    rows: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    slots: usize,
    window: usize,
    split_len: usize,
}

/// (output rows × heads·d, mass per slot) in f64.
#[allow(clippy::too_many_arguments)]
fn reference(
    c: &Case,
    q: &[f32],
    qpos: &[usize],
    k: &[f32],
    v: &[f32],
    spos: &[usize],
    valid: &[u8],
) -> (Vec<f32>, Vec<f32>) {
    let (d, kvd) = (c.d, c.kv_heads * c.d);
    let mut out = vec![0f32; c.rows * c.heads * d];
    let mut mass = vec![0f64; c.slots];
    for r in 0..c.rows {
        for h in 0..c.heads {
            let kh = h / (c.heads / c.kv_heads);
            let qr = &q[(r * c.heads + h) * d..(r * c.heads + h + 1) * d];
            let seen: Vec<usize> = (0..c.slots)
                .filter(|&s| {
                    valid[s] != 0
                        && spos[s] <= qpos[r]
                        && (c.window == 0 || qpos[r] - spos[s] < c.window)
                })
                .collect();
            let scores: Vec<f64> = seen
                .iter()
                .map(|&s| {
                    let kr = &k[s * kvd + kh * d..s * kvd + (kh + 1) * d];
                    qr.iter()
                        .zip(kr)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
            let sum: f64 = e.iter().sum();
            for (i, &s) in seen.iter().enumerate() {
                let p = e[i] / sum;
                mass[s] += p;
                for j in 0..d {
                    out[(r * c.heads + h) * d + j] += (p * v[s * kvd + kh * d + j] as f64) as f32;
                }
            }
        }
    }
    (out, mass.iter().map(|&m| m as f32).collect())
}

#[test]
fn masked_split_kv_attention_matches_the_reference() {
    let Some(b) = device("attention") else { return };
    let g = b.gpu();
    let mut rng = Rng(23);
    let cases = [
        Case {
            rows: 1,
            heads: 8,
            kv_heads: 2,
            d: 64,
            slots: 1000,
            window: 0,
            split_len: 0,
        },
        Case {
            rows: 1,
            heads: 8,
            kv_heads: 8,
            d: 128,
            slots: 333,
            window: 0,
            split_len: 37,
        },
        Case {
            rows: 1,
            heads: 9,
            kv_heads: 3,
            d: 64,
            slots: 65,
            window: 20,
            split_len: 16,
        },
        Case {
            rows: 17,
            heads: 4,
            kv_heads: 1,
            d: 32,
            slots: 17,
            window: 0,
            split_len: 0,
        },
        Case {
            rows: 40,
            heads: 6,
            kv_heads: 2,
            d: 80,
            slots: 90,
            window: 31,
            split_len: 7,
        },
        Case {
            rows: 3,
            heads: 2,
            kv_heads: 2,
            d: 256,
            slots: 5000,
            window: 0,
            split_len: 0,
        },
    ];
    for c in &cases {
        let kvd = c.kv_heads * c.d;
        // Slots hold positions 0..slots in a shuffled order (the map decides, not the index);
        // every seventh slot is invalid (evicted), except the queries' own tokens.
        let mut spos: Vec<usize> = (0..c.slots).collect();
        for i in (1..c.slots).rev() {
            spos.swap(i, rng.below(i + 1));
        }
        let qpos: Vec<usize> = (c.slots - c.rows..c.slots).collect();
        let valid: Vec<u8> = (0..c.slots)
            .map(|s| (s % 7 != 3 || qpos.contains(&spos[s])) as u8)
            .collect();
        let q = rng.f32s(c.rows * c.heads * c.d, 1.0);
        let k = rng.f32s(c.slots * kvd, 1.0);
        let v = rng.f32s(c.slots * kvd, 1.0);
        let (want, want_mass) = reference(c, &q, &qpos, &k, &v, &spos, &valid);
        let dq = g.upload(&q, "q").unwrap();
        let (dk, dv) = (g.upload(&k, "k").unwrap(), g.upload(&v, "v").unwrap());
        let dpos = g
            .upload(&spos.iter().map(|&p| p as i32).collect::<Vec<_>>(), "pos")
            .unwrap();
        let dvalid = g.upload(&valid, "valid").unwrap();
        let inputs = AttnInputs {
            q: dq.slice(..),
            q_positions: &qpos,
            keys: &dk,
            values: &dv,
            slot_positions: &dpos,
            valid: &dvalid,
            slots: c.slots,
        };
        let shape = AttnShape {
            num_heads: c.heads,
            num_kv_heads: c.kv_heads,
            head_dim: c.d,
            window: c.window,
            split_len: c.split_len,
        };
        let n = c.rows * c.heads * c.d;
        let mut out = g.zeros::<f32>(n, "out").unwrap();
        let mut mass = g.zeros::<f32>(c.slots, "mass").unwrap();
        g.attention(shape, &inputs, &mut out.slice_mut(..), Some(&mut mass))
            .unwrap();
        let got = g.download(&out, n, "out").unwrap();
        let got_mass = g.download(&mass, c.slots, "mass").unwrap();
        let what = format!(
            "rows {} heads {}/{} d {} slots {} window {} split {}",
            c.rows, c.heads, c.kv_heads, c.d, c.slots, c.window, c.split_len
        );
        assert!(
            rel_err(&got, &want) < 1e-3,
            "output, {what}: {}",
            rel_err(&got, &want)
        );
        assert!(rel_err(&got_mass, &want_mass) < 1e-3, "mass, {what}");
        // Total mass is one per (row, head).
        let total: f32 = got_mass.iter().sum();
        assert!(
            (total - (c.rows * c.heads) as f32).abs() < 1e-2 * (c.rows * c.heads) as f32,
            "{what}"
        );
    }
}
