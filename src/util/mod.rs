//! Small helpers with no better home.

pub mod membw;
pub(crate) mod memory;
pub mod rng;

pub use memory::peak_rss_bytes;
