//! Deleting flows (`xdpgate flows delete`, `conntrack -D`): both directions' entries, and the
//! translation of a flow through a NAT gateway; above `flows` and `nat`, which it joins.

use anyhow::{Result, bail};
use serde::Serialize;
use xdpgate_common::maps::{EMBRYOS, FLOWS};

use crate::{
    PinDir,
    flows::{Flow, FlowState, matching, open},
    monotonic_ns, state,
};

/// What [`flows`] removed (or, dry, would remove).
#[derive(Debug, Serialize)]
pub struct Deleted {
    /// The flows matched, as they were just before.
    pub flows: Vec<Flow>,
    /// Flow-table entries removed (two per whole flow).
    pub entries: u64,
    /// NAT gateway translations ended (their ports cool down as the idle expiry's do).
    pub translations: u64,
}

/// Removes the flows in `state` (none: every state) for which `keep` holds (`conntrack -D`): both
/// directions' entries, in the
/// table each is in, and the translation of a flow through a NAT gateway (else the next
/// packet would rebuild the flow from it). A deleted flow's next packet is judged as a new
/// flow's first: the policy decides again, and a TCP segment other than a SYN is dropped
/// (`no_flow`) unless the policy picks flows up mid-stream. `dry_run`: removes nothing.
/// `policy`: the running policy (its NAT gateways' port cooldowns), needed when a matching
/// flow is translated. Holds the write lock (unless dry).
pub fn flows(
    pins: &PinDir,
    state: Option<FlowState>,
    keep: impl Fn(&Flow) -> bool,
    policy: Option<&xdpgate_policy::Policy>,
    dry_run: bool,
) -> Result<Deleted> {
    crate::migrate::ensure_done(pins)?;
    // One writer at a time: an apply, a drain or another delete waits for this one.
    let _lock = if dry_run { None } else { Some(state::WriteLock::acquire(pins)?) };
    let held = matching(pins, state, keep)?;
    // A NAT gateway's flow (not a load balancer's rewrite): its translation is stored under
    // the reply key, and must end with it, or the flow's next packet rebuilds the flow.
    let snat =
        |f: &Flow| f.load_balancer.is_none() && f.nat.as_ref().is_some_and(|n| n.kind == "snat");
    let translated = held.iter().filter(|h| snat(&h.flow)).count();
    let policy = match policy {
        Some(p) => Some(p),
        None if dry_run || translated == 0 => None,
        None => bail!(
            "{translated} of the flows to delete are translated by a NAT gateway, and ending \
             their translations needs the running policy (its gateways' port cooldowns), \
             whose record is missing or unreadable; nothing was deleted"
        ),
    };
    let mut out = Deleted { flows: Vec::new(), entries: 0, translations: 0 };
    let (mut established, mut embryos) = (open(pins, FLOWS)?, open(pins, EMBRYOS)?);
    let now = monotonic_ns();
    // Embryonic flows removed with both entries: counted apart, or they would pass for
    // evicted ones (one already missing a half is counted evicted, and stays so).
    let mut whole_embryos = 0;
    for h in held {
        if !dry_run {
            let entries = &mut out.entries;
            let whole_embryos = &mut whole_embryos;
            let mut remove_flow = || {
                let mut embryo_entries = 0;
                // A lone flow (`TCP_LONE`) is whole with its one entry.
                let lone =
                    h.flow.state.in_embryos() && embryos.get(&h.key, 0).is_ok_and(|v| v.lone());
                for (k, other) in [(h.key, h.reply_key), (h.reply_key, h.key)] {
                    // A flow read as embryonic may have been confirmed since: it is in the
                    // established table now, and must go from there, or it runs on (with
                    // its translation ended, its port free for another flow). Only its own
                    // entry: another flow's may share a tuple (a closed connection's reply
                    // entry, where two frontend ports reach one backend port).
                    let gone = if h.flow.state.in_embryos() {
                        let embryo = embryos.remove(&k).is_ok();
                        embryo_entries += u32::from(embryo);
                        embryo
                            | (established.get(&k, 0).is_ok_and(|v| k.twin(&v) == other)
                                && established.remove(&k).is_ok())
                    } else {
                        established.remove(&k).is_ok()
                    };
                    if gone {
                        *entries += 1;
                    }
                }
                if embryo_entries == 2 || (lone && embryo_entries == 1) {
                    *whole_embryos += 1;
                }
                Ok(())
            };
            match policy {
                Some(policy) if snat(&h.flow) => {
                    if crate::nat::end_translation(pins, policy, &h.reply_key, now, remove_flow)? {
                        out.translations += 1;
                    }
                }
                _ => remove_flow()?,
            }
        }
        out.flows.push(h.flow);
    }
    // The flows are gone whatever happens to their count: said, not an error (a retry would
    // find nothing to delete, and the list of what went would be lost).
    if let Err(e) = crate::counts::add_deleted_embryos(pins, whole_embryos) {
        log::warn!(
            "counting the {whole_embryos} deleted embryonic flows failed (`stats` shows them as \
             evicted): {e:#}"
        );
    }
    Ok(out)
}
