pub mod crdgen;
pub mod fetch;
pub mod node;
pub mod operator;
pub mod plan;
