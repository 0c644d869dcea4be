//! The combined report (`README.md`) and the chart of the ratios (`ratios.svg`, written by
//! hand: a horizontal bar chart, one panel per kind of ratio).

use std::fmt::Write as _;

use crate::{
    Results, check,
    common::{Config, Family, Machine, thousands},
    events, flowlog, flows, forward, lb, memory, nat, nsg, peers, throughput,
};

/// One bar: label, value, colour.
type Bar = (String, f64, &'static str);

const NSG_COLOUR: &str = "#4e79a7";
const LB_COLOUR: &str = "#f28e2b";
const NAT_COLOUR: &str = "#59a14f";
const REF_COLOUR: &str = "#bab0ac";
const PEER_COLOUR: &str = "#e15759";
const PATH_COLOUR: &str = "#76b7b2";

fn testrun_bars(r: &Results) -> Vec<Bar> {
    let mut bars = Vec::new();
    if let Some(n) = &r.nsg {
        for case in nsg::Case::ALL {
            for row in n.results.iter().filter(|x| x.case == case && x.family == Family::IPv4) {
                bars.push((
                    format!("NSG {}, {} rules", case.label(), thousands(row.rules as u64)),
                    row.ratio,
                    NSG_COLOUR,
                ));
            }
        }
    }
    if let Some(l) = &r.lb {
        for row in &l.rows {
            let case = match row.case {
                lb::Case::FirstPacket => "first packet",
                lb::Case::Established => "established",
            };
            bars.push((
                format!("LB {case}, {} backends*", row.backends),
                row.figures.ratio,
                LB_COLOUR,
            ));
        }
        bars.push((
            "reference: NSG established, no rewrite*".into(),
            l.reference_established.ratio,
            REF_COLOUR,
        ));
    }
    if let Some(n) = &r.nat {
        for row in &n.rows {
            let (label, colour) = match row.case {
                nat::Case::FirstPacket => ("NAT first packet (port claim)*", NAT_COLOUR),
                nat::Case::Established => ("NAT established*", NAT_COLOUR),
                nat::Case::Reference => ("reference: no NAT, established*", REF_COLOUR),
            };
            bars.push((label.into(), row.figures.ratio, colour));
        }
    }
    if let Some(e) = &r.events {
        for row in &e.rows {
            let label = match row.case {
                events::Case::ConsumerOtherCpu => "first packet, event reader on other CPU*",
                events::Case::ConsumerSameCpu => "first packet, event reader on same CPU*",
                events::Case::NoConsumer => "first packet, no reader, ring has room*",
                events::Case::RingFull => "first packet, no reader, ring full*",
            };
            bars.push((label.into(), row.figures.ratio, NSG_COLOUR));
        }
    }
    if let Some(f) = &r.forward {
        for row in &f.rows {
            let (label, colour) = match row.case {
                forward::Case::Lb => ("LB established, forwarded*", LB_COLOUR),
                forward::Case::Nat => ("NAT established, forwarded*", NAT_COLOUR),
                forward::Case::NsgOnly => ("NSG-only established, forwarding on*", REF_COLOUR),
                forward::Case::LbForwardingOff => ("LB established, forwarding off*", LB_COLOUR),
                forward::Case::NatForwardingOff => ("NAT established, forwarding off*", NAT_COLOUR),
            };
            bars.push((label.into(), row.figures.ratio, colour));
        }
    }
    if let Some(f) = &r.flows {
        for row in f.rows.iter().filter(|x| !x.hot) {
            bars.push((
                format!("NSG established, {} live flows, cold*", thousands(row.live_flows.into())),
                row.figures.ratio,
                NSG_COLOUR,
            ));
        }
    }
    if let Some(Ok(f)) = r.peers.as_ref().map(|p| &p.xdp_filter) {
        for row in &f.rows {
            let who = if row.program.starts_with("xdp-filter") {
                "xdp-filter".to_string()
            } else {
                format!("xdpgate {}", row.rules.split(" +").next().unwrap_or(""))
            };
            let what = row.packet.split(' ').next().unwrap_or("");
            let colour = if who == "xdp-filter" { PEER_COLOUR } else { NSG_COLOUR };
            bars.push((format!("{who}, {what}"), row.figures.ratio, colour));
        }
    }
    bars
}

fn path_bars(r: &Results) -> Vec<Bar> {
    r.peers
        .as_ref()
        .map(|p| {
            peers::chart_rows(p)
                .into_iter()
                .map(|(label, v)| {
                    let colour =
                        if label.starts_with("xdpgate") { PATH_COLOUR } else { PEER_COLOUR };
                    (label, v, colour)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn throughput_bars(r: &Results) -> Vec<Bar> {
    let Some(t) = &r.throughput else { return Vec::new() };
    t.rows
        .iter()
        .filter(|x| x.case.kind != throughput::Kind::Plain && x.ratio.is_finite())
        .map(|x| {
            let colour = if x.label.starts_with("xdpgate") { PATH_COLOUR } else { PEER_COLOUR };
            (x.label.clone(), x.ratio, colour)
        })
        .collect()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The axis of a panel: linear from 0, or logarithmic (for ratios spanning decades).
struct Axis {
    lo: f64,
    top: f64,
    log: bool,
}

impl Axis {
    fn new(bars: &[Bar], log: bool) -> Self {
        let values = || bars.iter().map(|b| b.1).filter(|v| v.is_finite() && *v > 0.0);
        let max = values().fold(1.0, f64::max);
        // Round ends: 1, 2 or 5 times a power of ten.
        let round_up = |v: f64| {
            let mag = 10f64.powf(v.log10().floor());
            [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|t| *t >= v).unwrap_or(v)
        };
        let top = round_up(max);
        let lo = if log {
            let min = values().fold(1.0, f64::min);
            let mag = 10f64.powf(min.log10().floor());
            [5.0, 2.0, 1.0].iter().map(|m| m * mag).find(|t| *t <= min).unwrap_or(mag)
        } else {
            0.0
        };
        Self { lo, top, log }
    }

    /// The fraction of the bar width where `v` lies.
    fn at(&self, v: f64) -> f64 {
        let f = if self.log {
            (v.max(self.lo).log10() - self.lo.log10()) / (self.top.log10() - self.lo.log10())
        } else {
            v / self.top
        };
        f.clamp(0.0, 1.0)
    }

    fn ticks(&self) -> Vec<f64> {
        if !self.log {
            return (0..=4).map(|k| self.top * f64::from(k) / 4.0).collect();
        }
        let mut out = Vec::new();
        let mut mag = 10f64.powf(self.lo.log10().floor());
        while mag <= self.top * 1.0001 {
            for m in [1.0, 2.0, 5.0] {
                let t = m * mag;
                if t >= self.lo * 0.9999 && t <= self.top * 1.0001 {
                    out.push(t);
                }
            }
            mag *= 10.0;
        }
        out
    }
}

/// A horizontal bar panel starting at `y`; returns the SVG and its height.
fn panel(title: &str, note: &str, bars: &[Bar], y: f64, log: bool) -> (String, f64) {
    const LABEL_W: f64 = 360.0;
    const BAR_W: f64 = 440.0;
    const ROW: f64 = 18.0;
    let mut s = String::new();
    let axis = Axis::new(bars, log);
    let _ = writeln!(
        s,
        r##"<text x="10" y="{:.0}" font-size="15" font-weight="bold">{}</text>"##,
        y + 18.0,
        escape(title)
    );
    let _ = writeln!(
        s,
        r##"<text x="10" y="{:.0}" font-size="11" fill="#555">{}</text>"##,
        y + 34.0,
        escape(note)
    );
    let y0 = y + 46.0;
    let h = bars.len() as f64 * ROW;
    // Grid lines and their values.
    for v in axis.ticks() {
        let x = LABEL_W + BAR_W * axis.at(v);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{y0:.1}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" font-size="10" text-anchor="middle" fill="#555">{}</text>"##,
            y0 + h,
            y0 + h + 12.0,
            if v >= 10.0 || v == 0.0 || v.fract() == 0.0 {
                format!("{v:.0}")
            } else {
                format!("{v}")
            }
        );
    }
    // The line at 1: the no-op / no filter.
    if axis.lo <= 1.0 && 1.0 <= axis.top {
        let x = LABEL_W + BAR_W * axis.at(1.0);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{y0:.1}" x2="{x:.1}" y2="{:.1}" stroke="#333" stroke-dasharray="3,2"/>"##,
            y0 + h
        );
    }
    for (i, (label, v, colour)) in bars.iter().enumerate() {
        let by = y0 + i as f64 * ROW;
        let w = if v.is_finite() { BAR_W * axis.at(*v) } else { 0.0 };
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{}</text><rect x="{LABEL_W}" y="{:.1}" width="{w:.1}" height="{:.1}" fill="{colour}"/><text x="{:.1}" y="{:.1}" font-size="10">{}</text>"##,
            LABEL_W - 6.0,
            by + 12.5,
            escape(label),
            by + 2.0,
            ROW - 4.0,
            LABEL_W + w + 4.0,
            by + 12.5,
            if *v >= 10.0 { format!("{v:.1}") } else { format!("{v:.2}") }
        );
    }
    (s, 46.0 + h + 24.0)
}

pub fn svg(r: &Results) -> String {
    let testrun = testrun_bars(r);
    let path = path_bars(r);
    let mut body = String::new();
    let mut y = 0.0;
    if !testrun.is_empty() {
        let (s, h) = panel(
            "Cost per packet ÷ no-op XDP program (BPF_PROG_TEST_RUN)",
            "IPv4; median of per-run ratios; * one packet per test run (rewrites), ratio diluted by per-run overhead",
            &testrun,
            y,
            false,
        );
        body.push_str(&s);
        y += h;
    }
    if !path.is_empty() {
        let (s, h) = panel(
            "veth path: DUT CPU per packet ÷ no filter's (log scale)",
            "same run, same traffic; allowed: forwarded; denied: dropped; veth's own cost in every bar; see peers.md",
            &path,
            y,
            true,
        );
        body.push_str(&s);
        y += h;
    }
    let throughput = throughput_bars(r);
    if !throughput.is_empty() {
        let (s, h) = panel(
            "TCP throughput through a veth gateway ÷ kernel forwarding's (iperf3, 4 streams)",
            "same run, median of per-round ratios; higher is better; see throughput.md",
            &throughput,
            y,
            false,
        );
        body.push_str(&s);
        y += h;
    }
    if body.is_empty() {
        body.push_str(
            r##"<text x="10" y="20" font-size="13">No ratios were measured in this run.</text>"##,
        );
        y = 30.0;
    }
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"880\" height=\"{:.0}\" \
         font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{body}</svg>\n",
        y + 10.0
    )
}

pub fn readme(r: &Results, machine: &Machine, cfg: &Config, elapsed: f64) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# xdpgate benchmarks\n");
    md.push_str(&machine.header(cfg.quick));
    let _ = writeln!(
        md,
        "Run with `cargo xtask bench` (as root; `--quick` for a smoke test, `--only \
         nsg,lb,nat,memory,peers,events,forward,flows,flowlog,check,throughput` for some sections, `--runs \
         N`). This run took {elapsed:.0} s. Each section is also in its own file (`nsg.md`, \
         `lb.md`, `nat.md`, `memory.md`, `peers.md`, `events.md`, `forward.md`, `flows.md`, \
         `flowlog.md`, `check.md`, `throughput.md`, with the raw figures in the matching `.json`).\n\n\
         ![ratios](ratios.svg)\n"
    );
    if let Some(x) = &r.nsg {
        md.push_str(&strip_header(&nsg::markdown(x)));
    }
    if let Some(x) = &r.lb {
        md.push_str(&strip_header(&lb::markdown(x)));
    }
    if let Some(x) = &r.nat {
        md.push_str(&strip_header(&nat::markdown(x)));
    }
    if let Some(x) = &r.events {
        md.push_str(&strip_header(&events::markdown(x)));
    }
    if let Some(x) = &r.forward {
        md.push_str(&strip_header(&forward::markdown(x)));
    }
    if let Some(x) = &r.flows {
        md.push_str(&strip_header(&flows::markdown(x)));
    }
    if let Some(x) = &r.flowlog {
        md.push_str(&strip_header(&flowlog::markdown(x)));
    }
    if let Some(x) = &r.check {
        md.push_str(&strip_header(&check::markdown(x)));
    }
    if let Some(x) = &r.memory {
        md.push_str(&strip_header(&memory::markdown(x)));
    }
    if let Some(x) = &r.peers {
        md.push_str(&strip_header(&peers::markdown(x)));
    }
    if let Some(x) = &r.throughput {
        md.push_str(&strip_header(&throughput::markdown(x)));
    }
    md
}

/// A section's Markdown without its machine lines (the README states them once).
fn strip_header(md: &str) -> String {
    let mut out = String::new();
    let mut skip = false;
    for line in md.lines() {
        if line.starts_with("**Quick run") {
            skip = true;
            continue;
        }
        if line.starts_with("Linux ") {
            skip = true;
            continue;
        }
        if skip {
            // The line after the machine line (the claim), then the blank line.
            if line.is_empty() {
                skip = false;
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    out
}
