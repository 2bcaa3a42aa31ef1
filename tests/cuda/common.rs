//! Shared by the CUDA tests: the device (or why there is none), test data, uploads.

use edgemoe::backend::cpu::int8::{Int8Matrix, QuantizedRows};
use edgemoe::backend::cuda::kernels::{DeviceInt8, QuantAct};
use edgemoe::backend::cuda::CudaBackend;
use std::sync::OnceLock;

/// The device backend, or `None` after printing SKIPPED with the reason.
pub fn device(test: &str) -> Option<&'static CudaBackend> {
    static DEVICE: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    match DEVICE.get_or_init(|| CudaBackend::open().map_err(|e| e.to_string())) {
        Ok(b) => Some(b),
        Err(e) => {
            eprintln!("SKIPPED {test}: {e}");
            None
        }
    }
}

/// splitmix64: deterministic test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    pub fn f32s(&mut self, len: usize, magnitude: f32) -> Vec<f32> {
        (0..len).map(|_| self.unit() * magnitude).collect()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

pub fn random_matrix(rng: &mut Rng, n: usize, k: usize) -> Int8Matrix {
    let data: Vec<i8> = (0..n * k)
        .map(|_| ((rng.next_u64() % 255) as i32 - 127) as i8)
        .collect();
    let scales = (0..n).map(|_| 0.001 + rng.unit().abs() * 0.01).collect();
    Int8Matrix::from_quantized(n, k, &data, scales).expect("valid matrix")
}

/// Rows of very different magnitudes (every fifth all zero), quantized by the CPU.
pub fn random_activations(rng: &mut Rng, rows: usize, k: usize) -> (Vec<f32>, QuantizedRows) {
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
    edgemoe::backend::cpu::int8::quantize_rows(&x, rows, k, &mut q);
    (x, q)
}

pub fn upload_matrix(b: &CudaBackend, m: &Int8Matrix) -> DeviceInt8 {
    let g = b.gpu();
    DeviceInt8 {
        n: m.n,
        k: m.k,
        k_padded: m.k_padded,
        data: g.upload(&m.data[..], "test weights").unwrap(),
        scales: g.upload(&m.scales[..], "test scales").unwrap(),
    }
}

pub fn upload_quant(b: &CudaBackend, q: &QuantizedRows) -> QuantAct {
    let g = b.gpu();
    QuantAct {
        q: g.upload(&q.data, "test activations").unwrap(),
        scales: g.upload(&q.scales, "test activation scales").unwrap(),
        rows: q.rows,
        k: q.k,
        k_padded: q.k_padded,
    }
}

/// Largest |a - b| over max(1, max|b|).
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}
