//! `xdpgate set`: list the named address sets of the running policy, and add elements to
//! or delete them from a set in the kernel without a re-apply (`xdpgate_dataplane::sets`).

use anyhow::{Result, anyhow};
use xdpgate_dataplane::{
    PinDir,
    sets::{self, Change, SetReport},
};
use xdpgate_policy::sets::Element;

use crate::views::{self, Grid, OutputArgs, View};

#[derive(Debug, clap::Args)]
pub struct SetArgs {
    #[command(subcommand)]
    pub action: SetAction,
}

#[derive(Debug, clap::Subcommand)]
pub enum SetAction {
    /// Show each set of the running policy: its elements, and those added or removed at
    /// run time.
    List {
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Add elements to a set in the running tables (no re-apply). A deny rule naming the
    /// set then matches more (stronger); an allow rule naming it matches more too (wider).
    ///
    /// Example: xdpgate set add blocklist 203.0.113.7 198.51.100.0/24
    Add(Elements),
    /// Delete elements from a set in the running tables (each as it is listed: a prefix
    /// inside an element is not cut out of it).
    Del(Elements),
    /// Forget a set's run-time changes: it holds the policy file's elements again.
    Reset {
        /// The set's name in the policy (`sets:`).
        name: String,
    },
}

#[derive(Debug, clap::Args)]
pub struct Elements {
    /// The set's name in the policy (`sets:`).
    pub name: String,
    /// Addresses, prefixes (no host bits) or ranges (A-B).
    #[arg(required = true, value_name = "PREFIX")]
    pub elements: Vec<String>,
}

impl Elements {
    /// Every element parsed, each once (one written twice is one element, and counted so),
    /// or an error naming each bad one (nothing is changed).
    fn parse(&self) -> Result<Vec<Element>> {
        let mut parsed = Vec::new();
        let mut bad = Vec::new();
        for text in &self.elements {
            match text.parse::<Element>() {
                Ok(e) if parsed.contains(&e) => {}
                Ok(e) => parsed.push(e),
                Err(e) => bad.push(e),
            }
        }
        if bad.is_empty() {
            Ok(parsed)
        } else {
            Err(anyhow!("{}; nothing was changed", bad.join("; ")))
        }
    }
}

pub fn run(pins: &PinDir, args: SetArgs) -> Result<()> {
    let (name, elements, verb) = match &args.action {
        SetAction::List { output } => {
            return views::print(sets::list(pins)?.as_slice(), output.format());
        }
        SetAction::Add(e) => (&e.name, e.parse()?, "added to"),
        SetAction::Del(e) => (&e.name, e.parse()?, "deleted from"),
        SetAction::Reset { name } => (name, Vec::new(), "reset"),
    };
    let change = match &args.action {
        SetAction::Add(_) => Change::Add(&elements),
        SetAction::Del(_) => Change::Del(&elements),
        _ => Change::Reset,
    };
    let done = sets::change(pins, name, change)?;
    let mut what = match (&args.action, elements.len() - done.already.len()) {
        (SetAction::Reset { .. }, _) => format!("set {name} {verb} the policy file's elements"),
        (_, 0) => format!("no element {verb} set {name}"),
        (_, 1) => format!("1 element {verb} set {name}"),
        (_, n) => format!("{n} elements {verb} set {name}"),
    };
    if !done.already.is_empty() {
        let listed: Vec<String> = done.already.iter().map(Element::to_string).collect();
        what += &format!(" ({} there already)", listed.join(" "));
    }
    println!(
        "{what}: {} NSG table entries written, {} removed in {:.1} ms (compile {:.1} ms); \
         generation {}",
        done.entries_written,
        done.entries_removed,
        done.write.as_secs_f64() * 1e3,
        done.compile.as_secs_f64() * 1e3,
        done.generation
    );
    Ok(())
}

impl View for [SetReport] {
    fn json(&self) -> Result<serde_json::Value> {
        views::to_json(&self)
    }

    fn text(&self) -> String {
        let mut g = Grid::new(&["SET", "ELEMENTS", "ADDED", "REMOVED"]);
        for s in self {
            let join =
                |v: &[Element]| v.iter().map(Element::to_string).collect::<Vec<_>>().join(" ");
            g.row([s.name.clone(), join(&s.elements), join(&s.added), join(&s.removed)]);
        }
        let mut out = g.render();
        if self.is_empty() {
            out += "(no sets in the running policy)\n";
        }
        out
    }
}
