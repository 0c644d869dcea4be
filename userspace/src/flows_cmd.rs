//! `xdpgate flows` and `xdpgate flows delete`: one set of filter flags for listing flows and
//! for deleting them (as `conntrack -L` and `conntrack -D` share theirs).

use std::{fmt::Write as _, net::IpAddr};

use anyhow::{Context as _, Result, bail};
use xdpgate_dataplane::{
    PinDir, apply,
    delete::{self, Deleted},
    flows::{self, Flow, FlowState},
};

use crate::{
    filter::{self, FlowFilter, Subject, Verdict},
    views::{self, OutputArgs, View},
};

/// Which flows: every flag given must match (none: every flow). The shared filter flags
/// (`filter::FlowFilter`, as `observe` and `capture` take them), and two of the flow table's.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FilterArgs {
    #[command(flatten)]
    pub shared: FlowFilter,
    /// Only flows with this address at either end (a load-balanced flow's backend and a NAT
    /// gateway flow's public address count as ends).
    #[arg(long, value_name = "IP")]
    pub addr: Option<IpAddr>,
    /// Only flows in this state: embryonic, assured (confirmed, waiting for room in a full
    /// established table) or established.
    #[arg(long, value_name = "STATE")]
    pub state: Option<FlowState>,
}

impl FilterArgs {
    /// Refuses what selects no flow: a flow in the table was allowed, never dropped, and
    /// decided by a rule its generation's record names.
    fn check(&self, pins: &PinDir) -> Result<()> {
        // A rule in none of the kept records (a typo) matches no flow, which a listing and
        // above all a deletion must not pass over in silence.
        if let Some(want) = &self.shared.rule {
            let names = flows::Names::read(pins)?;
            if !names.all_rules().any(|r| filter::named(want, &r.nsg, &r.rule)) {
                bail!(
                    "--rule {want}: no rule of that name in the running policy, nor in the \
                     generations before it that flows may still carry (a rule is named RULE or \
                     NSG/RULE; `xdpgate rules` lists them)"
                );
            }
        }
        if let Some(r) = &self.shared.reason {
            bail!("--reason {r} selects drops; the flow tables hold allowed flows only");
        }
        if let Some(v) =
            self.shared.verdict.filter(|v| !matches!(v, Verdict::Allowed | Verdict::Translated))
        {
            bail!(
                "--verdict {} selects no flow: the flow tables hold allowed (or translated) \
                 flows only",
                v.name()
            );
        }
        Ok(())
    }

    fn matches(&self, f: &Flow) -> bool {
        flows::Filter { addr: self.addr, ..Default::default() }.matches(f)
            && self.shared.matches(&Subject::of_flow(f))
    }

    fn is_empty(&self) -> bool {
        self.shared.is_empty() && self.addr.is_none() && self.state.is_none()
    }
}

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    action: Option<Action>,
    /// Show at most N flows, 0 for all. Default: 20 in the table (which says how many it
    /// left out), all with --json.
    #[arg(long, value_name = "N")]
    top: Option<usize>,
    #[command(flatten)]
    filter: FilterArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Delete the matching flows (like `conntrack -D`): both directions' entries, and the
    /// translation of a flow through a NAT gateway (its port cools down as after an idle
    /// expiry). A writer, as `apply` is: waits up to 30 s for another. The next packet of a deleted flow is judged as a new flow's first: the
    /// running policy decides again, and a TCP segment other than a SYN is dropped
    /// (`no_flow`) unless the policy picks flows up mid-stream.
    ///
    /// Example: xdpgate flows delete --addr 203.0.113.7 --port 22
    Delete(DeleteArgs),
}

#[derive(Debug, clap::Args)]
struct DeleteArgs {
    #[command(flatten)]
    filter: FilterArgs,
    /// Delete every flow (required when no filter is given).
    #[arg(long, conflicts_with_all = ["addr", "state", "src", "dst", "port", "protocol", "rule"])]
    all: bool,
    /// List what would be deleted, and delete nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    output: OutputArgs,
}

pub fn run(pins: &PinDir, args: Args) -> Result<()> {
    match args.action {
        None => {
            let f = &args.filter;
            f.check(pins)?;
            let all = flows::list_where(pins, f.state, |flow| f.matches(flow), 0)?;
            let format = args.output.format();
            let running = apply::active(pins).map_or(0, |(_, c)| c.generation);
            views::print(&views::flows::Listed::new(all, args.top, format, running), format)
        }
        Some(Action::Delete(d)) => {
            d.filter.check(pins)?;
            if d.filter.is_empty() && !d.all {
                bail!(
                    "flows delete needs a filter (--addr, --src, --dst, --port, --protocol, \
                     --rule, --state) or --all to delete every flow"
                );
            }
            // The running policy's NAT gateways (their port cooldowns); none before any apply.
            let policy = match apply::applied_source(pins) {
                None => None,
                Some((path, src)) => {
                    Some(xdpgate_policy::load_str(&src, &path.display().to_string()).with_context(
                        || format!("reading the running policy from {}", path.display()),
                    )?)
                }
            };
            let f = &d.filter;
            let deleted =
                delete::flows(pins, f.state, |flow| f.matches(flow), policy.as_ref(), d.dry_run)?;
            views::print(&DeleteReport { deleted, dry_run: d.dry_run }, d.output.format())
        }
    }
}

struct DeleteReport {
    deleted: Deleted,
    dry_run: bool,
}

impl View for DeleteReport {
    fn json(&self) -> Result<serde_json::Value> {
        let mut v = views::to_json(&self.deleted)?;
        v["dry_run"] = self.dry_run.into();
        Ok(v)
    }

    fn text(&self) -> String {
        let d = &self.deleted;
        let mut out = if self.dry_run {
            format!("would delete {} flows (dry run: nothing deleted)\n", d.flows.len())
        } else {
            format!(
                "deleted {} flows ({} entries, {} NAT translations)\n",
                d.flows.len(),
                d.entries,
                d.translations
            )
        };
        if !d.flows.is_empty() {
            out.push('\n');
            let _ = write!(out, "{}", d.flows.as_slice().text());
        }
        out
    }
}
