pub mod crdgen;
pub mod operator;
pub mod plan;
