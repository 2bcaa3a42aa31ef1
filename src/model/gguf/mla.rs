//! DeepSeek's `kv_b_proj` as newer llama.cpp converters write it: split per head into
//! `attn_k_b` `[heads, kv_lora_rank, qk_nope_head_dim]` (the key rows, transposed, for the
//! absorbed decode) and `attn_v_b` `[heads, v_head_dim, kv_lora_rank]`. The loader asks for the
//! Hugging Face matrix `[heads · (nope + v), kv_lora_rank]`, head by head the key rows then the
//! value rows; it is put back together here (a copy: these matrices are small). Files of the
//! older layout hold `attn_kv_b` whole and are read as any other tensor.

use super::names::layer_parts;
use super::GgufFile;
use crate::error::{Error, Result};
use crate::model::weights::Stored;

impl GgufFile {
    /// The `attn_k_b` / `attn_v_b` pair behind `hf` when it is a `kv_b_proj` the file holds
    /// split (and not whole).
    pub(super) fn split_kv_b(&self, hf: &str) -> Option<(String, String)> {
        let (layer, module, suffix) = layer_parts(hf)?;
        if module != "self_attn.kv_b_proj" || suffix != "weight" {
            return None;
        }
        if self
            .info(&format!("blk.{layer}.attn_kv_b.weight"))
            .is_some()
        {
            return None;
        }
        let k = format!("blk.{layer}.attn_k_b.weight");
        let v = format!("blk.{layer}.attn_v_b.weight");
        (self.info(&k).is_some() && self.info(&v).is_some()).then_some((k, v))
    }

    /// `kv_b_proj` rebuilt from its split halves, checked against `shape`; `None` where the
    /// file does not split it.
    pub(super) fn joined_kv_b(
        &self,
        hf: &str,
        shape: &[usize],
        why: &str,
    ) -> Result<Option<Stored>> {
        let Some((kn, vn)) = self.split_kv_b(hf) else {
            return Ok(None);
        };
        let shape_of = |n: &str| self.info(n).map(|i| i.shape()).unwrap_or_default();
        let (ks, vs) = (shape_of(&kn), shape_of(&vn));
        // k_b [heads, rank, nope], v_b [heads, v, rank].
        if ks.len() != 3 || vs.len() != 3 || ks[0] != vs[0] || ks[1] != vs[2] {
            return Err(self.error(format!(
                "`{kn}` {ks:?} and `{vn}` {vs:?} are not a split kv_b_proj \
                 ([heads, kv_lora_rank, nope] and [heads, v_head_dim, kv_lora_rank])"
            )));
        }
        let (heads, rank, nope, v) = (ks[0], ks[1], ks[2], vs[1]);
        let joined = [heads * (nope + v), rank];
        if shape != joined {
            return Err(Error::ShapeMismatch {
                name: format!("{kn} + {vn}"),
                expected: shape.to_vec(),
                actual: joined.to_vec(),
                why: format!("`{hf}`, from GGUF metadata {why}"),
            });
        }
        let dims = (heads, rank, nope, v);
        Ok(Some(match (self.read(&kn)?, self.read(&vn)?) {
            (Stored::Half(a, kb), Stored::Half(b, vb)) if a == b => {
                Stored::Half(a, join(&kb, &vb, dims).into())
            }
            (k, v) => Stored::F32(join(&self.f32s(k, &kn)?, &self.f32s(v, &vn)?, dims).into()),
        }))
    }

    fn f32s(&self, s: Stored, name: &str) -> Result<Vec<f32>> {
        match s {
            Stored::F32(b) => Ok(b.to_vec()),
            Stored::Half(kind, b) => Ok(kind.widen(&b)),
            _ => Err(self.error(format!("`{name}` is not a floating-point tensor"))),
        }
    }
}

/// Head by head: the `nope` columns of `k` (`[rank, nope]`) as rows, then `v`'s `[vd, rank]`.
fn join<T: Copy>(
    k: &[T],
    v: &[T],
    (heads, rank, nope, vd): (usize, usize, usize, usize),
) -> Vec<T> {
    let mut out = Vec::with_capacity(heads * (nope + vd) * rank);
    for h in 0..heads {
        let kh = &k[h * rank * nope..(h + 1) * rank * nope];
        for j in 0..nope {
            out.extend((0..rank).map(|r| kh[r * nope + j]));
        }
        out.extend_from_slice(&v[h * vd * rank..(h + 1) * vd * rank]);
    }
    out
}

#[cfg(test)]
mod tests {
    /// llama.cpp's split (view as [heads, nope + v, rank], split, transpose the key part)
    /// followed by `join` is the identity.
    #[test]
    fn join_inverts_the_converters_split() {
        let (heads, rank, nope, vd) = (3, 4, 2, 5);
        let kv_b: Vec<usize> = (0..heads * (nope + vd) * rank).collect();
        let mut k = vec![0; heads * rank * nope];
        let mut v = vec![0; heads * vd * rank];
        for h in 0..heads {
            for row in 0..nope + vd {
                for r in 0..rank {
                    let x = kv_b[(h * (nope + vd) + row) * rank + r];
                    if row < nope {
                        k[(h * rank + r) * nope + row] = x;
                    } else {
                        v[(h * vd + row - nope) * rank + r] = x;
                    }
                }
            }
        }
        assert_eq!(super::join(&k, &v, (heads, rank, nope, vd)), kv_b);
    }
}
