//! What an attention call over the caches is given: the model's attention geometry, and per
//! sequence the query rows and the layer cache they read.

use super::LayerCache;

/// The attention geometry of a model's layer.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape<'a> {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// Floats of each key (query heads read theirs against it).
    pub head_dim: usize,
    /// Floats of each value, and of each head's output: `head_dim`, or fewer where the values
    /// are the first `value_dim` floats of the key rows (multi-head latent attention's
    /// latent, [`super::KvLayout::key_prefix`]).
    pub value_dim: usize,
    pub sliding_window: Option<usize>,
    /// One logit per query head that joins its softmax denominator and takes no value
    /// (GPT-OSS's attention sinks); `None`: none.
    pub sink_logits: Option<&'a [f32]>,
}

/// One sequence's part of an attention call: query rows `rows` attend over `cache` (which
/// already holds their own keys and values).
pub struct Segment<'a> {
    pub rows: std::ops::Range<usize>,
    pub cache: &'a LayerCache,
}
