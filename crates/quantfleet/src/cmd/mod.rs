pub mod crdgen;
pub mod plan;
