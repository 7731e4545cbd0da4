pub mod crdgen;
pub mod eval;
pub mod fetch;
pub mod node;
pub mod operator;
pub mod plan;
pub mod router;
pub mod up;
