//! What executes the ops. `cpu` is the reference and the first-class path.

pub mod cpu;
