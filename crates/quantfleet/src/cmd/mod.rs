pub mod crdgen;
pub mod fetch;
pub mod operator;
pub mod plan;
