//! Policies, with no kernel access: the YAML format, its validated and expanded model, the
//! reference evaluator of NSG semantics, and the compiled images the dataplane crate
//! writes (NSG tables, load balancers with their Maglev tables, NAT gateways), with the
//! names saved beside each generation.

pub mod compile;
pub mod evaluate;
pub mod lb;
pub mod maglev;
pub mod model;
pub mod names;
pub mod nat;
pub mod reference;
pub mod sets;
pub mod tree;
pub mod yaml;

use std::path::Path;

use anyhow::{Context, Result, anyhow};
pub use model::*;
pub use yaml::{
    PolicyError, PolicyErrors, load_file, load_str, load_str_with_sets, parse_set_element,
};

/// Loads a policy file; every validation error is listed as file:line: field: reason.
pub fn load(file: &Path) -> Result<(Policy, String)> {
    load_with_sets(file, &sets::SetChanges::default())
}

/// Loads a policy file with the sets changed at run time laid over its own (what runs).
pub fn load_with_sets(file: &Path, changes: &sets::SetChanges) -> Result<(Policy, String)> {
    let source =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let policy = load_str_with_sets(&source, &file.display().to_string(), changes)
        .map_err(|errors| anyhow!("invalid policy, nothing changed:\n{errors}"))?;
    Ok((policy, source))
}

/// Compiles every part of a policy and checks it fits the dataplane's tables, touching
/// nothing: what `xdpgate check` runs, and what `apply` does before it changes anything.
pub fn compile_all(policy: &Policy) -> Result<(compile::Compiled, lb::CompiledLb)> {
    let tables = compile::compile(policy)?;
    let lbs = lb::compile(policy)?;
    nat::check(policy)?;
    Ok((tables, lbs))
}
