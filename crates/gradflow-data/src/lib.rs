//! Training data for gradflow workers (readers being written by a helper).

pub mod batch;

pub use batch::Batch;
