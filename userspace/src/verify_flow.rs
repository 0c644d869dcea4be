//! `xdpgate verify-flow`: would a flow be allowed, and by which rule (Azure's IP flow
//! verify). One flow from the flags, or many with `--batch` (one per line, JSON lines out),
//! all answered from one reading of the policy.

use std::{
    io::BufRead,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::{Context, Result, anyhow, bail};
use xdpgate_dataplane::{
    PinDir,
    flows::protocol_name,
    verify::{Answer, Verifier},
};
use xdpgate_policy::{Direction, reference::Packet};

use crate::views::{self, OutputArgs, View as _};

/// Exit status: the flow was denied (0 is allowed).
pub const DENIED: u8 = 1;
/// Exit status: nothing was answered (or, with --batch, some line was not).
pub const ERROR: u8 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DirectionArg {
    /// Remote to local: the flow's first packet arrives from the other side.
    Inbound,
    /// Local to remote: the flow's first packet leaves the protected side.
    Outbound,
}

/// Would this flow be allowed, and by which rule? Like Azure's IP flow verify.
///
/// Answered from the NSG tables the kernel is using (the active slot's pinned maps, read
/// without running the program: no flow is created, no counter moves), evaluated as the
/// dataplane does; the answer names the generation and slot it asked. Rules are named
/// from the saved policy when its tables are the kernel's, and otherwise it says so.
/// With --policy FILE it compiles that file instead and says so.
///
/// With --batch FILE (or - for standard input), one flow per line as
/// `DIRECTION PROTOCOL LOCAL REMOTE` (e.g. `inbound tcp 198.51.100.10:80 203.0.113.7:40000`;
/// blank lines and lines starting with # are skipped), it prints one JSON object per line
/// for each flow, or {"line": N, "input": .., "error": ..} for a line it cannot read, and
/// goes on. The policy is read once for the whole batch.
///
/// Exit status: 0 allowed, 1 denied, 2 error (nothing was answered). With --batch: 0 when
/// every line was answered, 2 when some line was an error.
///
/// Example: xdpgate verify-flow --direction inbound --protocol tcp
///          --local 198.51.100.10:80 --remote 203.0.113.7:40000
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Which way the flow's first packet goes: inbound (remote to local) or outbound
    /// (local to remote). Both sides' NSGs judge it: the source's outbound layers, then
    /// the destination's inbound layers.
    #[arg(long, value_enum, required_unless_present = "batch", conflicts_with = "batch")]
    direction: Option<DirectionArg>,
    /// tcp, udp, icmp (ICMPv6 for IPv6 addresses), icmpv6, esp, ah, sctp or a protocol
    /// number.
    #[arg(long, required_unless_present = "batch", conflicts_with = "batch")]
    protocol: Option<String>,
    /// Address of the protected side, with :PORT for TCP and UDP ([v6]:PORT).
    #[arg(long, required_unless_present = "batch", conflicts_with = "batch")]
    local: Option<String>,
    /// Address of the other side, with :PORT for TCP and UDP ([v6]:PORT).
    #[arg(long, required_unless_present = "batch", conflicts_with = "batch")]
    remote: Option<String>,
    /// Answer every flow of FILE (- for standard input), one per line as
    /// `DIRECTION PROTOCOL LOCAL REMOTE`; prints JSON lines (so -o table is refused).
    #[arg(long, value_name = "FILE", conflicts_with = "output")]
    batch: Option<String>,
    /// Compile this policy file and ask it instead of the kernel.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    #[command(flatten)]
    output: OutputArgs,
}

/// `IP` or `IP:PORT` (`[IPv6]:PORT`).
fn endpoint(s: &str) -> Result<(IpAddr, Option<u16>)> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok((sa.ip(), Some(sa.port())));
    }
    s.parse().map(|a| (a, None)).map_err(|_| match s.rsplit_once(':') {
        // Two colons or more and no brackets: an IPv6 address, perhaps with a port.
        Some((addr, port)) if addr.contains(':') && !s.contains('[') => anyhow!(
            "{s:?} is not an address or address:port; an IPv6 address with a port is \
             written [ADDRESS]:PORT, e.g. [{addr}]:{port}"
        ),
        _ => anyhow!("{s:?} is not an address or address:port"),
    })
}

/// `s` read as an IPv6 address and a port, when its last group could be one
/// (`2001:db8::10:80`): the hint for a TCP or UDP endpoint given without a port.
fn unbracketed_port(s: &str) -> Option<String> {
    let (addr, port) = s.rsplit_once(':')?;
    (addr.parse::<std::net::Ipv6Addr>().is_ok() && port.parse::<u16>().is_ok())
        .then(|| format!("[{addr}]:{port}"))
}

/// The flow's first packet, from the four things an operator names; every mistake is an
/// error that says what to write instead.
pub fn packet(
    direction: DirectionArg,
    protocol: &str,
    local: &str,
    remote: &str,
) -> Result<Packet> {
    let (local_ip, local_port) = endpoint(local).context("local")?;
    let (remote_ip, remote_port) = endpoint(remote).context("remote")?;
    if local_ip.is_ipv4() != remote_ip.is_ipv4() {
        bail!("local and remote must be of the same address family");
    }
    let v6 = local_ip.is_ipv6();
    let proto =
        crate::filter::protocol_number(protocol, if v6 { 6 } else { 4 }).map_err(|e| anyhow!(e))?;
    let name = protocol_name(if v6 { 6 } else { 4 }, proto);
    if proto == 6 || proto == 17 {
        for (side, text, port) in [("local", local, local_port), ("remote", remote, remote_port)] {
            if port.is_none() {
                let hint = unbracketed_port(text).map_or(String::new(), |w| {
                    format!(" (an IPv6 address with a port is written [ADDRESS]:PORT: {w})")
                });
                bail!("{name} needs a port on {side}: write ADDRESS:PORT{hint}");
            }
        }
    } else if let Some((side, _)) =
        [("local", local_port), ("remote", remote_port)].into_iter().find(|(_, p)| p.is_some())
    {
        bail!(
            "{side} has a port, but {name} has no ports (only tcp and udp do): give the \
             address alone"
        );
    }
    let (src, sport, dst, dport, direction) = match direction {
        DirectionArg::Inbound => (remote_ip, remote_port, local_ip, local_port, Direction::Inbound),
        DirectionArg::Outbound => {
            (local_ip, local_port, remote_ip, remote_port, Direction::Outbound)
        }
    };
    Ok(Packet { direction, proto, src, dst, sport, dport })
}

/// The answer as JSON, with the flow it is about in the shared vocabulary (`src`,
/// `src_port`, `dst`, `dst_port`, `protocol`, `direction`).
pub fn answer_json(pkt: &Packet, answer: &Answer) -> Result<serde_json::Value> {
    let family = if pkt.src.is_ipv6() { 6 } else { 4 };
    let mut out = serde_json::json!({
        "direction": views::lower(pkt.direction),
        "protocol": protocol_name(family, pkt.proto),
        "src": pkt.src,
        "src_port": pkt.sport,
        "dst": pkt.dst,
        "dst_port": pkt.dport,
    });
    let object = out.as_object_mut().expect("an object");
    match answer.json()? {
        serde_json::Value::Object(a) => object.extend(a),
        other => bail!("verify-flow's answer is not a JSON object: {other}"),
    }
    Ok(out)
}

/// One line of a batch: `DIRECTION PROTOCOL LOCAL REMOTE`.
fn batch_line(line: &str) -> Result<Packet> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let [direction, protocol, local, remote] = words[..] else {
        bail!("expected DIRECTION PROTOCOL LOCAL REMOTE, found {} words", words.len());
    };
    let direction = <DirectionArg as clap::ValueEnum>::from_str(direction, true)
        .map_err(|_| anyhow!("direction {direction:?} is neither inbound nor outbound"))?;
    packet(direction, protocol, local, remote)
}

/// Answers every line of `input`, writing one JSON object per line to `out`; returns
/// whether every line was answered. A line that cannot be read or answered gets an error
/// object and the batch goes on; an error reading or writing ends it.
pub fn batch(
    verifier: &mut Verifier,
    input: impl BufRead,
    mut out: impl std::io::Write,
) -> Result<bool> {
    let mut all = true;
    for (n, line) in input.split(b'\n').enumerate() {
        let line = line.context("reading the batch")?;
        // A line that is not UTF-8 is a bad line like any other.
        let (line, utf8) = match String::from_utf8(line) {
            Ok(line) => (line, true),
            Err(e) => (String::from_utf8_lossy(e.as_bytes()).into_owned(), false),
        };
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let parsed = if utf8 { batch_line(text) } else { Err(anyhow!("the line is not UTF-8")) };
        let answered =
            parsed.and_then(|pkt| answer_json(&pkt, &verifier.answer(&pkt)?)).map(|mut v| {
                v["line"] = (n + 1).into();
                v
            });
        let value = answered.unwrap_or_else(|e| {
            all = false;
            serde_json::json!({"line": n + 1, "input": text, "error": format!("{e:#}")})
        });
        serde_json::to_writer(&mut out, &value).context("writing JSON")?;
        out.write_all(b"\n").context("writing JSON")?;
    }
    out.flush().context("writing JSON")?;
    Ok(all)
}

pub fn run(pins: &PinDir, args: Args) -> Result<ExitCode> {
    if let Some(file) = &args.batch {
        let mut verifier = Verifier::new(pins, args.policy.as_deref())?;
        let stdout = std::io::stdout().lock();
        let all = if file == "-" {
            batch(&mut verifier, std::io::stdin().lock(), stdout)?
        } else {
            let f = std::fs::File::open(file).with_context(|| format!("opening {file}"))?;
            batch(&mut verifier, std::io::BufReader::new(f), stdout)?
        };
        return Ok(if all { ExitCode::SUCCESS } else { ExitCode::from(ERROR) });
    }
    let field = |v: Option<String>, flag: &str| v.ok_or_else(|| anyhow!("--{flag} is required"));
    let pkt = packet(
        args.direction.ok_or_else(|| anyhow!("--direction is required"))?,
        &field(args.protocol, "protocol")?,
        &field(args.local, "local")?,
        &field(args.remote, "remote")?,
    )?;
    let answer = Verifier::new(pins, args.policy.as_deref())?.answer(&pkt)?;
    match args.output.format() {
        views::Format::Table => views::print(&answer, views::Format::Table)?,
        views::Format::Json => {
            views::print(&Json(answer_json(&pkt, &answer)?), views::Format::Json)?
        }
    }
    Ok(if answer.decision.allowed { ExitCode::SUCCESS } else { ExitCode::from(DENIED) })
}

/// A JSON value printed as a view.
struct Json(serde_json::Value);

impl views::View for Json {
    fn json(&self) -> Result<serde_json::Value> {
        Ok(self.0.clone())
    }
    fn text(&self) -> String {
        self.0.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(d: DirectionArg, p: &str, l: &str, r: &str) -> String {
        format!("{:#}", packet(d, p, l, r).expect_err("an error"))
    }

    #[test]
    fn a_port_on_a_portless_protocol_is_an_error_that_says_so() {
        let e = err(DirectionArg::Inbound, "icmp", "198.51.100.2:80", "203.0.113.9");
        assert!(e.contains("local has a port, but icmp has no ports"), "{e}");
        let e = err(DirectionArg::Outbound, "esp", "198.51.100.2", "203.0.113.9:500");
        assert!(e.contains("remote has a port, but esp has no ports"), "{e}");
        let e = err(DirectionArg::Inbound, "icmp", "[2001:db8::1]:0", "2001:db8::2");
        assert!(e.contains("icmpv6 has no ports"), "{e}");
        let p = packet(DirectionArg::Inbound, "icmp", "198.51.100.2", "203.0.113.9").unwrap();
        assert_eq!((p.proto, p.sport, p.dport), (1, None, None));
    }

    /// `icmpv6`, the name the answers (and `flows --json`) give ICMPv6, is read back, also
    /// in a batch (before: "unknown protocol \"icmpv6\"").
    #[test]
    fn the_protocol_names_printed_are_read() {
        let p = packet(DirectionArg::Inbound, "icmpv6", "2001:db8::1", "2001:db8::2").unwrap();
        assert_eq!(p.proto, 58);
        assert_eq!(batch_line("outbound icmpv6 2001:db8::1 2001:db8::2").unwrap().proto, 58);
        assert_eq!(batch_line("inbound sctp 198.51.100.2 203.0.113.9").unwrap().proto, 132);
    }

    #[test]
    fn an_unbracketed_ipv6_with_a_port_gets_a_hint() {
        // Parses as an address (the port is read as its last group): TCP then lacks a port.
        let e = err(DirectionArg::Inbound, "tcp", "2001:db8::10:80", "[2001:db8::2]:4000");
        assert!(e.contains("tcp needs a port on local"), "{e}");
        assert!(e.contains("written [ADDRESS]:PORT: [2001:db8::10]:80"), "{e}");
        // Does not parse at all (a port above the last group's range).
        let e = err(DirectionArg::Inbound, "udp", "[2001:db8::1]:53", "2001:db8::2:65535");
        assert!(e.contains("remote") && e.contains("e.g. [2001:db8::2]:65535"), "{e}");
        let e = err(DirectionArg::Inbound, "udp", "[2001:db8::1]:53", "2001:db8:::7");
        assert!(e.contains("[ADDRESS]:PORT"), "{e}");
        let p =
            packet(DirectionArg::Outbound, "tcp", "[2001:db8::1]:80", "[2001:db8::2]:9").unwrap();
        assert_eq!((p.sport, p.dport, p.proto), (Some(80), Some(9), 6));
    }

    #[test]
    fn a_batch_takes_no_flow_flags_and_no_table() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let parse = |more: &[&str]| {
            Cli::try_parse_from(["verify-flow"].iter().chain(more))
                .map(|_| ())
                .map_err(|e| e.kind())
        };
        assert_eq!(parse(&["--batch", "-"]), Ok(()));
        assert_eq!(parse(&["--batch", "-", "--json"]), Ok(()));
        assert_eq!(
            parse(&["--batch", "-", "-o", "table"]),
            Err(clap::error::ErrorKind::ArgumentConflict)
        );
        assert_eq!(
            parse(&["--batch", "-", "--protocol", "tcp"]),
            Err(clap::error::ErrorKind::ArgumentConflict)
        );
        assert_eq!(
            parse(&["--protocol", "tcp"]),
            Err(clap::error::ErrorKind::MissingRequiredArgument)
        );
    }

    #[test]
    fn batch_lines_read_and_misread() {
        let p = batch_line("  inbound  TCP 198.51.100.2:80 203.0.113.9:4000 ").unwrap();
        assert_eq!(
            (p.src.to_string(), p.sport, p.dport),
            ("203.0.113.9".into(), Some(4000), Some(80))
        );
        let e = format!(
            "{:#}",
            batch_line("sideways tcp 198.51.100.2:80 203.0.113.9:4000").unwrap_err()
        );
        assert!(e.contains("\"sideways\" is neither inbound nor outbound"), "{e}");
        let e = format!("{:#}", batch_line("inbound tcp 198.51.100.2:80").unwrap_err());
        assert!(e.contains("found 3 words"), "{e}");
    }
}
