//! `xdpgate connectivity`: one answer for "would A reach B:port, and if not, why": the
//! load balancer and its backends' health, the NSG layers on both sides (Azure's order, from
//! the kernel's tables as `verify-flow` reads them), the NAT gateway, and the next hop
//! (`next-hop`), each judged in the order the dataplane meets them; the verdict is the first
//! step that blocks.

use anyhow::Result;
use serde::Serialize;
use xdpgate_dataplane::{PinDir, verify};
use xdpgate_policy::{Direction, reference::Packet};

use super::{
    OutputArgs, View, lower,
    nexthop::{self, FlowArgs, Forwarding, NextHop, Translation},
};

/// One step of the path.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// load_balancer, nsg, nat, next_hop or reply (the answers' way back).
    pub step: &'static str,
    /// Whether this step lets the flow through.
    pub ok: bool,
    pub detail: String,
}

/// An NSG layer's decision.
#[derive(Debug, Clone, Serialize)]
pub struct LayerHit {
    pub direction: Direction,
    pub layer: xdpgate_policy::Layer,
    pub access: xdpgate_policy::Access,
    pub nsg: Option<String>,
    pub rule: Option<String>,
    pub priority: Option<u32>,
}

/// What `connectivity` says.
#[derive(Debug, Clone, Serialize)]
pub struct Connectivity {
    pub reachable: bool,
    /// The first step that blocks, in words.
    pub blocked_by: Option<String>,
    pub steps: Vec<Step>,
    /// The NSG layers that had a rule for the flow, in evaluation order.
    pub nsg_layers: Vec<LayerHit>,
    pub next_hop: NextHop,
}

/// Judges `hop`'s flow.
pub fn check(pins: &PinDir, hop: NextHop) -> Result<Connectivity> {
    let mut steps = Vec::new();
    let mut layers = Vec::new();
    let flow = hop.flow;
    let through = hop.arrival.as_ref().is_some_and(|a| a.hook.is_some());
    if let Some(t) = &hop.translation
        && !matches!(t, Translation::NatGateway { .. })
    {
        steps.push(Step {
            step: "load_balancer",
            ok: hop.looked_up.is_some(),
            detail: t.describe(),
        });
    }
    // Dropped before any lookup, untranslated.
    if hop.forwarding == Forwarding::NatUntranslatable {
        steps.push(Step { step: "nat", ok: false, detail: hop.reason.clone() });
    }
    if let Some(seen) = hop.looked_up {
        if through || hop.arrival.is_none() {
            // The NSGs judge the private source and, behind a load balancer, the backend.
            let pkt = Packet {
                direction: if hop.arrival.as_ref().and_then(|a| a.role) == Some("external") {
                    Direction::Inbound
                } else {
                    Direction::Outbound
                },
                proto: flow.proto(),
                src: flow.src,
                dst: seen.dst,
                sport: flow.src_port,
                dport: seen.dst_port,
            };
            let translated = (seen.dst, seen.dst_port) != (flow.dst, flow.dst_port);
            steps.push(nsg_step(pins, &pkt, translated, &mut layers)?);
        } else {
            steps.push(Step {
                step: "nsg",
                ok: true,
                detail: format!(
                    "{} is not attached to xdpgate: no NSG judges this flow",
                    hop.arrival.as_ref().map_or("-", |a| a.interface.as_str())
                ),
            });
        }
        if let Some(t @ Translation::NatGateway { public_addresses, .. }) = &hop.translation {
            steps.push(Step {
                step: "nat",
                ok: !public_addresses.is_empty(),
                detail: t.describe(),
            });
        }
        let ok =
            matches!(hop.forwarding, Forwarding::Redirect | Forwarding::Stack | Forwarding::Local);
        steps.push(Step { step: "next_hop", ok, detail: hop.reason.clone() });
        if let Some(why) = &hop.reply_bypasses_gateway {
            steps.push(Step { step: "reply", ok: false, detail: why.clone() });
        }
    }
    let blocked_by = steps.iter().find(|s| !s.ok).map(|s| s.detail.clone());
    Ok(Connectivity {
        reachable: blocked_by.is_none(),
        blocked_by,
        steps,
        nsg_layers: layers,
        next_hop: hop,
    })
}

/// The NSG layers' verdict on `pkt`; `translated`: its destination is a backend's, not the
/// one asked about.
fn nsg_step(
    pins: &PinDir,
    pkt: &Packet,
    translated: bool,
    layers: &mut Vec<LayerHit>,
) -> Result<Step> {
    // Never attached here: no pinned maps (the directory alone may exist).
    if !pins.map(xdpgate_common::maps::ACTIVE_SLOT).exists() {
        let detail = format!("no dataplane under {}: nothing filters it", pins.path().display());
        return Ok(Step { step: "nsg", ok: true, detail });
    }
    if xdpgate_dataplane::apply::running(pins)?.is_none() {
        let detail = "no policy applied: nothing filters it".into();
        return Ok(Step { step: "nsg", ok: true, detail });
    }
    let answer = verify::verify_flow(pins, None, pkt)?;
    for (hit, name) in answer.decision.decided_by.iter().zip(&answer.names) {
        layers.push(LayerHit {
            direction: hit.direction,
            layer: hit.layer,
            access: hit.access,
            nsg: name.as_ref().map(|n| n.nsg.clone()),
            rule: name.as_ref().map(|n| n.rule.clone()),
            priority: name.as_ref().map(|n| n.priority),
        });
    }
    let rule = |h: &LayerHit| {
        let layer = format!("{} {} layer", lower(h.direction), lower(h.layer));
        match (&h.nsg, &h.rule, h.priority) {
            (Some(n), Some(r), Some(p)) => format!("{n}/{r} (priority {p}, {layer})"),
            _ => format!("a rule of the {layer} (names unknown)"),
        }
    };
    let to = if translated {
        format!("to {}: ", nexthop::endpoint_string(pkt.dst, pkt.dport))
    } else {
        String::new()
    };
    let detail = match layers.iter().find(|h| h.access == xdpgate_policy::Access::Deny) {
        Some(h) => format!("{to}denied by {}", rule(h)),
        None if layers.is_empty() => format!("{to}allowed: no NSG applies to either end"),
        None => {
            format!("{to}allowed by {}", layers.iter().map(rule).collect::<Vec<_>>().join(", "))
        }
    };
    Ok(Step { step: "nsg", ok: answer.decision.allowed, detail })
}

impl View for Connectivity {
    fn json(&self) -> Result<serde_json::Value> {
        super::to_json(self)
    }

    fn text(&self) -> String {
        let mut out = format!("flow           {}\n", self.next_hop.flow.describe());
        for s in &self.steps {
            let name = match s.step {
                "load_balancer" => "load balancer",
                "next_hop" => "next hop",
                other => other,
            };
            let verdict = if s.ok { "ok     " } else { "BLOCKED" };
            out += &format!("{name:<14} {verdict} {}\n", super::wrap(&s.detail, 23));
        }
        out += &match &self.blocked_by {
            None => "verdict        reachable\n".to_string(),
            Some(why) => {
                format!("verdict        {}\n", super::wrap(&format!("unreachable: {why}"), 15))
            }
        };
        out
    }
}

/// `xdpgate connectivity`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectivityArgs {
    #[command(flatten)]
    pub flow: FlowArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Exit status when the flow would not get through.
pub const UNREACHABLE: u8 = 1;

/// Prints the answer; true when the flow gets through.
pub fn run(pins: &PinDir, args: &ConnectivityArgs) -> Result<bool> {
    let flow = args.flow.flow()?;
    let hop = nexthop::resolve(pins, &flow, args.flow.iface.as_deref())?;
    let answer = check(pins, hop)?;
    super::print(&answer, args.output.format())?;
    Ok(answer.reachable)
}
