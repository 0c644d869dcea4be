//! The names behind the numbers in the dataplane's tables, saved with each generation so
//! that views and flow logs name rules, services and gateways without recompiling a policy.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{
    Access, Direction, Layer, Policy,
    compile::{Compiled, TableRule},
};

/// The name of one rule of a compiled table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RuleName {
    pub nsg: String,
    pub rule: String,
    pub direction: Direction,
    pub layer: Layer,
    pub priority: u32,
    pub access: Access,
}

impl RuleName {
    pub fn of(r: &TableRule) -> Self {
        Self {
            nsg: r.nsg.clone(),
            rule: r.rule.name.clone(),
            direction: r.rule.direction,
            layer: r.layer,
            priority: r.rule.priority,
            access: r.rule.access,
        }
    }

    /// What makes two generations' rules the same rule (for counters that carry over).
    pub fn id(&self) -> (&str, &str, Direction, Layer) {
        (&self.nsg, &self.rule, self.direction, self.layer)
    }
}

/// What one generation installed, by name.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub generation: u64,
    /// The policy slot this generation's NSG tables were written to.
    pub slot: u32,
    /// Seconds since the Unix epoch.
    pub applied_unix: u64,
    /// The policy's YAML source.
    pub source: String,
    /// Rule names of each table of the slot, in bit order.
    pub tables: Vec<Vec<RuleName>>,
    /// Load-balancing services, by service id.
    pub services: Vec<ServiceName>,
    /// Backend addresses, by backend id.
    pub backends: Vec<IpAddr>,
    /// NAT gateways as (name, public addresses), by gateway id.
    pub nat_gateways: Vec<(String, Vec<IpAddr>)>,
}

/// A load-balancing service as the views name it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceName {
    pub lb: String,
    pub rule: String,
    /// `ADDR:PORT/PROTO` of each frontend.
    pub frontends: Vec<String>,
    /// Backend ids: the pool, then the fixed backends of inbound NAT rules.
    pub members: Vec<u32>,
    /// The health probe of a load-balancing rule; none for inbound NAT rules and rules
    /// without one (their backends' health is not known). Absent in older records.
    #[serde(default)]
    pub probe: Option<String>,
}

impl Record {
    pub fn new(
        generation: u64,
        slot: u32,
        source: &str,
        policy: &Policy,
        nsg: &Compiled,
        services: Vec<ServiceName>,
        backends: Vec<IpAddr>,
    ) -> Self {
        let tables =
            nsg.tables.iter().map(|t| t.rules.iter().map(RuleName::of).collect()).collect();
        let applied_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            generation,
            slot,
            applied_unix,
            source: source.to_owned(),
            tables,
            services,
            backends,
            nat_gateways: policy
                .nat_gateways
                .iter()
                .map(|g| (g.name.clone(), g.public_addresses.clone()))
                .collect(),
        }
    }
}
