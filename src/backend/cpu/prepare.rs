//! How the CPU backend holds a model's weights: int8 and bf16/f16 matrices in place as
//! stored; f32 matrices packed into column panels ([`PackedF32`]), which the f32 kernel
//! reads without horizontal sums. Embedding tables stay row-major (looked up a row at a time).

use super::packed::{PackedF32, PANEL};
use crate::model::buf::release_pages;
use crate::model::weights::{Linear, LinearWeight, PreparedMatrix, Weights};
use std::any::Any;
use std::sync::Arc;

impl PreparedMatrix for PackedF32 {
    fn to_rows(&self) -> Vec<f32> {
        PackedF32::to_rows(self)
    }

    fn bytes(&self) -> usize {
        PackedF32::bytes(self)
    }

    fn row_read_bytes(&self) -> usize {
        // A row of a panel is strided: every cache line of its panel.
        4 * PANEL * self.k()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The CPU's panels of `lin`, where it holds them.
pub fn packed(lin: &Linear) -> Option<&PackedF32> {
    match &lin.weight {
        LinearWeight::Prepared(w) => w.as_any().downcast_ref(),
        _ => None,
    }
}

/// Packs `lin`'s row-major f32 weights into panels, in place where the process owns them (no
/// second copy); mapped ones are copied and their file pages given back. Other forms are left
/// as they are.
pub fn prepare_linear(lin: &mut Linear) {
    let LinearWeight::F32Rows(w) = &mut lin.weight else {
        return;
    };
    let mapping = w.mapping().map(|(map, at, len)| (map.clone(), at, len));
    let rows = std::mem::take(w.make_mut());
    // The file pages the copy came from are no longer needed.
    if let Some((map, at, len)) = mapping {
        release_pages(&map, at, len);
    }
    let panels = PackedF32::from_row_vec(rows, lin.out_features, lin.in_features);
    lin.weight = LinearWeight::Prepared(Arc::new(panels));
}

/// Prepares every f32 matrix of `weights` but the embedding table.
pub fn prepare_weights(weights: &mut Weights) {
    for lin in weights.projections_mut() {
        prepare_linear(lin);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packed and row-major weights are the same matrix to everything but the kernels.
    #[test]
    fn packing_keeps_the_matrix() {
        let (n, k) = (13, 6);
        let w: Vec<f32> = (0..n * k).map(|i| i as f32 * 0.5 - 3.0).collect();
        let mut packed_lin = Linear::new("p", n, k, w.clone(), None);
        let mut rows = Linear::new("r", n, k, w.clone(), None);
        prepare_linear(&mut packed_lin);
        assert!(packed(&packed_lin).is_some());
        assert!(matches!(rows.weight, LinearWeight::F32Rows(_)));
        assert_eq!(packed_lin.f32_rows(), Some(w.clone()));
        assert_eq!(rows.f32_rows(), Some(w.clone()));
        for lin in [&mut packed_lin, &mut rows] {
            lin.map_input_channel(2, |v| v * 10.0);
            lin.map_input_channel(5, |v| -v);
        }
        let want: Vec<f32> = w
            .iter()
            .enumerate()
            .map(|(at, &v)| match at % k {
                2 => v * 10.0,
                5 => -v,
                _ => v,
            })
            .collect();
        assert!(matches!(&packed_lin.weight, LinearWeight::F32Rows(r) if **r == *want));
        assert_eq!(rows.f32_rows(), Some(want.clone()));
        prepare_linear(&mut rows);
        assert_eq!(rows.f32_rows(), Some(want));
        assert_eq!(rows.weight_bytes(), 2 * 8 * k * 4);
        assert_eq!(rows.row_read_bytes(), 4 * PANEL * k);
    }
}
