//! Network security group policies: the YAML format, its validated and expanded model, and a
//! reference evaluator of NSG semantics.

pub mod model;
pub mod reference;
pub mod tree;
pub mod yaml;

pub use model::*;
pub use yaml::{PolicyError, PolicyErrors, load_file, load_str};
