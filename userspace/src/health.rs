//! Health probes of load-balancer backends, run by the agent on tokio.
//!
//! - [`probe_once`] runs one probe (TCP connect, HTTP or HTTPS `GET`) bounded by the probe's
//!   `timeout_ms`; its error is a short human-readable reason ("connection refused",
//!   "timeout after 500 ms", "HTTP 500", ...).
//! - [`Tracker`] is the per-target state machine: `threshold` consecutive failures take a
//!   healthy backend out, `threshold` consecutive successes put an unhealthy one back.
//! - [`Prober`] runs one task per [`Target`] every `interval_ms`, with at most
//!   `max_concurrent` probes in flight, keeps the current state of every target, and sends a
//!   [`Change`] for every transition.
//!
//! Initial state: every target starts [`Health::Healthy`] (as Azure's load balancer puts
//! backends in rotation before the first probe answers); the first probes count normally, so
//! a backend that is down at start is taken out after `threshold` failed probes, i.e. within
//! `interval_ms × (threshold − 1) + timeout_ms` of [`Prober::spawn`]. No [`Change`] is sent
//! for the initial state.
//!
//! HTTP(S) probes succeed only on status 200; redirects, errors, non-HTTP replies and
//! backends that accept but never answer fail. HTTPS does not verify the backend's
//! certificate (as Azure does not); it still checks the handshake signature against the
//! certificate presented. Every network operation runs inside the probe's timeout, so a
//! probe never outlives `timeout_ms`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

use xdpgate_dataplane::probes::{ProbeHealth, ProbeKey};
use xdpgate_policy::model::{Probe, ProbeKind};

/// One backend probed with one probe.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub backend: IpAddr,
    /// The load balancer the probe is one of.
    pub lb: String,
    pub probe: Probe,
}

impl Target {
    fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.backend, self.probe.port)
    }

    pub fn key(&self) -> ProbeKey {
        ProbeKey { backend: self.backend, lb: self.lb.clone(), probe: self.probe.name.clone() }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Health {
    Healthy,
    Unhealthy,
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        })
    }
}

/// A transition of one target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub key: ProbeKey,
    /// The new state.
    pub health: Health,
    /// The result of the probe that caused the transition: the failure reason when going
    /// unhealthy ("connection refused", "HTTP 500", ...), "connected" (TCP) or "HTTP 200"
    /// when going healthy.
    pub reason: String,
}

/// Runs one probe of `target`, bounded by `target.probe.timeout_ms` (at least 1 ms).
/// `Err` carries the reason of the failure.
pub async fn probe_once(target: &Target) -> Result<(), String> {
    let ms = target.probe.timeout_ms.max(1);
    match tokio::time::timeout(Duration::from_millis(u64::from(ms)), probe_inner(target)).await {
        Ok(r) => r,
        Err(_) => Err(format!("timeout after {ms} ms")),
    }
}

/// What a successful probe of this kind reports (the reason of a transition to healthy).
fn success_reason(kind: ProbeKind) -> &'static str {
    match kind {
        ProbeKind::Tcp => "connected",
        ProbeKind::Http | ProbeKind::Https => "HTTP 200",
    }
}

async fn probe_inner(target: &Target) -> Result<(), String> {
    let addr = target.addr();
    let request = match target.probe.kind {
        ProbeKind::Tcp => None,
        ProbeKind::Http | ProbeKind::Https => Some(http_request(&target.probe.path, addr)?),
    };
    let tcp = TcpStream::connect(addr).await.map_err(|e| io_reason("connect", &e))?;
    match target.probe.kind {
        ProbeKind::Tcp => Ok(()),
        ProbeKind::Http => http_exchange(tcp, request.as_deref().unwrap_or_default()).await,
        ProbeKind::Https => {
            let connector = tokio_rustls::TlsConnector::from(tls_config());
            let tls = connector
                .connect(ServerName::from(target.backend), tcp)
                .await
                .map_err(|e| format!("TLS handshake failed: {e}"))?;
            http_exchange(tls, request.as_deref().unwrap_or_default()).await
        }
    }
}

fn http_request(path: &str, addr: SocketAddr) -> Result<Vec<u8>, String> {
    if path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(format!("invalid probe path {path:?}"));
    }
    let path = if path.starts_with('/') { path.to_string() } else { format!("/{path}") };
    Ok(format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nUser-Agent: xdpgate-probe\r\n\r\n"
    )
    .into_bytes())
}

fn io_reason(what: &str, e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "connection refused".into(),
        ConnectionReset => "connection reset".into(),
        ConnectionAborted => "connection aborted".into(),
        HostUnreachable => "host unreachable".into(),
        NetworkUnreachable => "network unreachable".into(),
        _ => format!("{what}: {e}"),
    }
}

/// The longest status or header line accepted.
const MAX_STATUS_LINE: usize = 4096;

/// Interim responses skipped at most before the final one (a backend that sends them
/// without end is bounded by the probe's timeout as well).
const MAX_INTERIM: usize = 8;

/// Sends `request` and reads the final status line; Ok only on status 200. Interim
/// responses (1xx but 101, with their header lines) before it are skipped: RFC 9110 15.2
/// has a client parse them even when it did not ask for one (`103 Early Hints`).
async fn http_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    request: &[u8],
) -> Result<(), String> {
    s.write_all(request).await.map_err(|e| io_reason("send", &e))?;
    s.flush().await.map_err(|e| io_reason("send", &e))?;
    let mut buf = Vec::with_capacity(256);
    for interim in 0..=MAX_INTERIM {
        let line = match read_line(&mut s, &mut buf).await? {
            Some(line) => line,
            None if interim == 0 => return Err("connection closed without a response".into()),
            None => return Err("connection closed before the final response".into()),
        };
        match parse_status(&line) {
            Some(200) => return Ok(()),
            Some(code) if (100..200).contains(&code) && code != 101 && interim < MAX_INTERIM => {
                // Its header lines, up to the empty one that ends it.
                while read_line(&mut s, &mut buf).await?.is_some_and(|h| !h.is_empty()) {}
            }
            Some(code) => return Err(format!("HTTP {code}")),
            None => return Err(not_http(&line)),
        }
    }
    unreachable!("the last round returns")
}

/// The next line of the response (without its CR LF), taken from `buf` and read into it as
/// needed; `None` when the stream ends before any byte of it.
async fn read_line<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> Result<Option<Vec<u8>>, String> {
    let mut chunk = [0u8; 512];
    loop {
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = buf.drain(..=end).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(Some(line));
        }
        if buf.len() >= MAX_STATUS_LINE {
            return Err(not_http(buf));
        }
        match s.read(&mut chunk).await {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => return Err(not_http(buf)),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            // A whole line that came before the error was taken above; part of one (a
            // backend that crashed mid-reply) is no answer.
            Err(e) => return Err(io_reason("receive", &e)),
        }
    }
}

/// The status code of an HTTP/1.x status line.
fn parse_status(line: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    let version = parts.next()?;
    let code = parts.next()?;
    if !version.starts_with("HTTP/") || code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    code.parse().ok()
}

fn not_http(data: &[u8]) -> String {
    let shown: String = String::from_utf8_lossy(&data[..data.len().min(64)])
        .chars()
        .map(|c| if c.is_control() { '.' } else { c })
        .collect();
    format!("not an HTTP response: {shown:?}")
}

/// The TLS client configuration of HTTPS probes: `ring`, TLS 1.2 and 1.3, no certificate
/// verification, no client authentication.
fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let verifier = AcceptAnyCert(provider.signature_verification_algorithms);
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("the ring provider supports the default protocol versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

/// Accepts any server certificate (health probes, like Azure's, do not verify it) but checks
/// that the handshake is signed by the key of the certificate presented.
#[derive(Debug)]
struct AcceptAnyCert(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// The state machine of one target: consecutive successes and failures since the last
/// opposite result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tracker {
    health: Health,
    successes: u32,
    failures: u32,
}

impl Default for Tracker {
    fn default() -> Self {
        Self::new(Health::Healthy)
    }
}

impl Tracker {
    pub fn new(initial: Health) -> Self {
        Self { health: initial, successes: 0, failures: 0 }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// Records one probe result; returns the new state if it changed. A `threshold` of 0 is
    /// treated as 1.
    pub fn record(&mut self, ok: bool, threshold: u32) -> Option<Health> {
        let threshold = threshold.max(1);
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if self.health == Health::Unhealthy && self.successes >= threshold {
                self.health = Health::Healthy;
                return Some(Health::Healthy);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.health == Health::Healthy && self.failures >= threshold {
                self.health = Health::Unhealthy;
                return Some(Health::Unhealthy);
            }
        }
        None
    }
}

/// Each target's count, with its probe, shared by its task and the [`Prober`].
type States = Arc<Mutex<HashMap<ProbeKey, (Probe, Tracker)>>>;

/// Where each target's count stood when its prober stopped, with its probe.
pub type Found = HashMap<ProbeKey, (Probe, Tracker)>;

/// The targets a prober starts with and where each one's count starts, and the targets
/// found under another name (old key, new key).
pub struct Start(Vec<(Target, Tracker)>, Vec<(ProbeKey, ProbeKey)>);

impl Start {
    /// `targets` (a key's first only), each going on from where a stopped prober `found`
    /// it: with its count while its probe is the same, else only its state (a changed
    /// probe counts afresh); a target not found starts down if `down` has it, else
    /// healthy. A target found only under another name (its probe or load balancer
    /// renamed, the probe itself the same) is the one found: a rename starts no backend
    /// afresh (as unanswered, a BGP node withdrew its frontends until the first answer).
    pub fn new(targets: Vec<Target>, found: &Found, down: &BTreeSet<ProbeKey>) -> Self {
        let mut seen = HashSet::new();
        let mut renamed = Vec::new();
        let wanted: HashSet<ProbeKey> = targets.iter().map(Target::key).collect();
        let start = targets
            .into_iter()
            .filter(|t| seen.insert(t.key()))
            .map(|t| {
                let tracker = match found.get(&t.key()).or_else(|| {
                    let (old, found) = renamed_from(&t, found, &wanted)?;
                    renamed.push((old.clone(), t.key()));
                    Some(found)
                }) {
                    Some((probe, tracker)) if same_probe(probe, &t.probe) => tracker.clone(),
                    Some((_, tracker)) => Tracker::new(tracker.health()),
                    None if down.contains(&t.key()) => Tracker::new(Health::Unhealthy),
                    None => Tracker::new(Health::Healthy),
                };
                (t, tracker)
            })
            .collect();
        Self(start, renamed)
    }

    /// The targets that start down.
    pub fn down(&self) -> BTreeSet<ProbeKey> {
        self.0
            .iter()
            .filter(|(_, t)| t.health() == Health::Unhealthy)
            .map(|(t, _)| t.key())
            .collect()
    }

    /// The health the tables are built from as these start, as agent `pid` saves it.
    pub fn health(&self, pid: u32) -> ProbeHealth {
        let probed = self.0.iter().map(|(t, _)| t.key()).collect();
        ProbeHealth { pid, down: self.down(), probed }
    }
}

/// Whether two probes probe alike, whatever their names.
fn same_probe(a: &Probe, b: &Probe) -> bool {
    Probe { name: String::new(), ..a.clone() } == Probe { name: String::new(), ..b.clone() }
}

/// The target `found` holds for `t` under another name: of the same backend and probe, and
/// gone from the targets `wanted` now, the one of its load balancer, or else the only one.
/// None when that is not one target: then `t` is a new probe.
fn renamed_from<'f>(
    t: &Target,
    found: &'f Found,
    wanted: &HashSet<ProbeKey>,
) -> Option<(&'f ProbeKey, &'f (Probe, Tracker))> {
    let alike: Vec<_> = found
        .iter()
        .filter(|(k, (p, _))| {
            k.backend == t.backend && same_probe(p, &t.probe) && !wanted.contains(*k)
        })
        .collect();
    let same_lb: Vec<_> = alike.iter().filter(|(k, _)| k.lb == t.lb).copied().collect();
    match (same_lb.as_slice(), alike.as_slice()) {
        ([one], _) | ([], [one]) => Some(*one),
        _ => None,
    }
}

/// How one target's probes went, since the agent started (kept across reloads).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProbeCounts {
    pub successes: u64,
    pub failures: u64,
    /// Time all its probes took, failed ones included (a timeout counts its full wait).
    pub seconds_total: f64,
    /// Time the last probe took.
    pub last_seconds: f64,
}

/// Every target's [`ProbeCounts`], shared by the probers and the metrics server.
#[derive(Clone, Debug, Default)]
pub struct ProbeStats(Arc<Mutex<BTreeMap<ProbeKey, ProbeCounts>>>);

impl ProbeStats {
    fn record(&self, key: ProbeKey, ok: bool, took: Duration) {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let c = all.entry(key).or_default();
        if ok {
            c.successes += 1;
        } else {
            c.failures += 1;
        }
        c.seconds_total += took.as_secs_f64();
        c.last_seconds = took.as_secs_f64();
    }

    /// Moves the counts of each target renamed (old key, new key) to its new name.
    fn rename(&self, renamed: &[(ProbeKey, ProbeKey)]) {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for (old, new) in renamed {
            if let Some(counts) = all.get(old).copied() {
                all.entry(new.clone()).or_insert(counts);
            }
        }
    }

    /// Forgets the targets not in `keep` (no longer probed: their series end).
    fn keep(&self, keep: &HashSet<ProbeKey>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).retain(|k, _| keep.contains(k));
    }

    /// Every target probed so far, sorted by (backend, load balancer, probe).
    pub fn snapshot(&self) -> Vec<(ProbeKey, ProbeCounts)> {
        let all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        all.iter().map(|(k, c)| (k.clone(), *c)).collect()
    }
}

/// Probes a set of targets periodically. Dropping it (or [`Prober::stop`]) stops the probes.
pub struct Prober {
    states: States,
    tasks: Vec<JoinHandle<()>>,
}

impl Prober {
    /// Starts one task per target on the current tokio runtime (panics outside a runtime).
    /// Each task probes immediately and then every `interval_ms` (at least 1 ms; a probe that
    /// was delayed, e.g. by the concurrency limit, delays the next ones rather than bursting).
    /// At most `max_concurrent` (at least 1) probes run at once over all targets. Targets are
    /// identified by their [`ProbeKey`]; duplicates after the first are ignored.
    /// Targets start healthy, but those in `down`, which need `threshold` good probes to
    /// come back. Transitions are sent on `changes`; if the receiver is gone, probing goes
    /// on and [`Prober::health`] stays current.
    pub fn spawn(
        targets: Vec<Target>,
        down: &BTreeSet<ProbeKey>,
        max_concurrent: usize,
        changes: mpsc::Sender<Change>,
    ) -> Prober {
        let start = Start::new(targets, &Found::new(), down);
        Self::spawn_counted(start, max_concurrent, changes, ProbeStats::default())
    }

    /// [`Prober::spawn`] from `start`, adding each probe's result and duration to `stats`.
    pub fn spawn_counted(
        start: Start,
        max_concurrent: usize,
        changes: mpsc::Sender<Change>,
        stats: ProbeStats,
    ) -> Prober {
        stats.rename(&start.1);
        stats.keep(&start.0.iter().map(|(t, _)| t.key()).collect());
        let limit = Arc::new(Semaphore::new(max_concurrent.max(1)));
        let states: States = Arc::new(Mutex::new(
            start
                .0
                .iter()
                .map(|(t, tracker)| (t.key(), (t.probe.clone(), tracker.clone())))
                .collect(),
        ));
        let tasks = start
            .0
            .into_iter()
            .map(|(target, _)| {
                let run =
                    run(target, limit.clone(), states.clone(), changes.clone(), stats.clone());
                tokio::spawn(run)
            })
            .collect();
        Prober { states, tasks }
    }

    /// The current state of a backend under a probe; `None` for a target this prober does
    /// not run.
    pub fn health(&self, key: &ProbeKey) -> Option<Health> {
        let s = self.states.lock().unwrap_or_else(|e| e.into_inner());
        s.get(key).map(|(_, t)| t.health())
    }

    /// Every target's current state, sorted by (backend, load balancer, probe).
    pub fn snapshot(&self) -> Vec<(ProbeKey, Health)> {
        let s = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = s.iter().map(|(k, (_, t))| (k.clone(), t.health())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Stops every probe task (a probe in flight is cancelled); returns where each target's
    /// count stood, for a prober to go on from.
    pub fn stop(self) -> Found {
        for t in &self.tasks {
            t.abort();
        }
        std::mem::take(&mut *self.states.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn run(
    target: Target,
    limit: Arc<Semaphore>,
    states: States,
    changes: mpsc::Sender<Change>,
    stats: ProbeStats,
) {
    let period = Duration::from_millis(u64::from(target.probe.interval_ms.max(1)));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let result = {
            let Ok(_permit) = limit.acquire().await else {
                return; // the semaphore is never closed
            };
            let start = Instant::now();
            let result = probe_once(&target).await;
            stats.record(target.key(), result.is_ok(), start.elapsed());
            result
        };
        let changed = {
            let mut s = states.lock().unwrap_or_else(|e| e.into_inner());
            let Some((_, tracker)) = s.get_mut(&target.key()) else { return };
            tracker.record(result.is_ok(), target.probe.threshold)
        };
        let Some(health) = changed else { continue };
        let reason = match result {
            Ok(()) => success_reason(target.probe.kind).to_string(),
            Err(e) => e,
        };
        let key = target.key();
        log::info!("backend {} probe {key}: {health} ({reason})", target.backend);
        let change = Change { key, health, reason };
        // A closed receiver only means nobody listens; keep the state current.
        let _ = changes.send(change).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;
    use tokio::net::TcpListener;

    const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn probe(
        kind: ProbeKind,
        port: u16,
        interval_ms: u32,
        timeout_ms: u32,
        threshold: u32,
    ) -> Probe {
        Probe {
            name: "p".into(),
            kind,
            port,
            path: "/health".into(),
            interval_ms,
            timeout_ms,
            threshold,
        }
    }

    /// The key of probe `probe` of `target`'s (and the tests') load balancer.
    fn key(probe: &str) -> ProbeKey {
        ProbeKey { backend: LOCALHOST, lb: "lb".into(), probe: probe.into() }
    }

    fn target(kind: ProbeKind, port: u16, timeout_ms: u32) -> Target {
        Target { backend: LOCALHOST, lb: "lb".into(), probe: probe(kind, port, 100, timeout_ms, 2) }
    }

    /// A port on which nothing listens (bound then released).
    async fn closed_port() -> u16 {
        let l = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
        l.local_addr().unwrap().port()
    }

    /// Reads an HTTP request head (up to the blank line).
    async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> String {
        let mut buf = Vec::new();
        let mut b = [0u8; 256];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&b[..n]),
            }
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Writes `reply` and closes the stream.
    async fn answer<S: AsyncWrite + Unpin>(s: &mut S, reply: &[u8]) {
        let _ = s.write_all(reply).await;
        let _ = s.shutdown().await;
    }

    fn status(code: u16) -> Vec<u8> {
        format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").into_bytes()
    }

    /// An HTTP server on an ephemeral loopback port; `reply(n)` is the raw reply to the n-th
    /// connection (from 0). Returns the port, the last request head and the connection count.
    struct Server {
        port: u16,
        last_request: Arc<Mutex<String>>,
        connections: Arc<AtomicUsize>,
        task: JoinHandle<()>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn http_server(reply: impl Fn(usize) -> Vec<u8> + Send + Sync + 'static) -> Server {
        let l = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
        let port = l.local_addr().unwrap().port();
        let last_request = Arc::new(Mutex::new(String::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let reply = Arc::new(reply);
        let (lr, c) = (last_request.clone(), connections.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let n = c.fetch_add(1, Ordering::SeqCst);
                let (lr, reply) = (lr.clone(), reply.clone());
                tokio::spawn(async move {
                    let head = read_head(&mut s).await;
                    *lr.lock().unwrap() = head;
                    answer(&mut s, &reply(n)).await;
                });
            }
        });
        Server { port, last_request, connections, task }
    }

    /// A server that accepts and never answers (keeps every connection open until dropped).
    async fn silent_server() -> Server {
        let l = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
        let port = l.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let c = connections.clone();
        let task = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                open.push(s);
            }
        });
        Server { port, last_request: Arc::default(), connections, task }
    }

    #[tokio::test]
    async fn tcp_success_and_refused() {
        let s = silent_server().await;
        assert_eq!(probe_once(&target(ProbeKind::Tcp, s.port, 500)).await, Ok(()));
        let port = closed_port().await;
        assert_eq!(
            probe_once(&target(ProbeKind::Tcp, port, 500)).await,
            Err("connection refused".to_string())
        );
    }

    #[tokio::test]
    async fn http_200_succeeds_and_request_is_well_formed() {
        let s = http_server(|_| status(200)).await;
        assert_eq!(probe_once(&target(ProbeKind::Http, s.port, 500)).await, Ok(()));
        let req = s.last_request.lock().unwrap().clone();
        assert_eq!(
            req,
            format!(
                "GET /health HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\nUser-Agent: xdpgate-probe\r\n\r\n",
                s.port
            )
        );
    }

    #[tokio::test]
    async fn http_non_200_fails_with_reason() {
        for (code, reason) in [(500, "HTTP 500"), (301, "HTTP 301"), (404, "HTTP 404")] {
            let s = http_server(move |_| status(code)).await;
            assert_eq!(
                probe_once(&target(ProbeKind::Http, s.port, 500)).await,
                Err(reason.to_string())
            );
        }
    }

    #[tokio::test]
    async fn http_non_http_reply_and_empty_reply_fail() {
        let s = http_server(|_| b"SSH-2.0-OpenSSH_9.6\r\n".to_vec()).await;
        let r = probe_once(&target(ProbeKind::Http, s.port, 500)).await;
        assert!(r.as_ref().unwrap_err().starts_with("not an HTTP response"), "{r:?}");
        let s = http_server(|_| Vec::new()).await;
        let r = probe_once(&target(ProbeKind::Http, s.port, 500)).await;
        assert_eq!(r, Err("connection closed without a response".to_string()));
    }

    /// A server that answers `reply` to the request and then resets the connection.
    async fn resetting_server(reply: &'static [u8]) -> u16 {
        let l = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                read_head(&mut s).await;
                let _ = s.write_all(reply).await;
                let _ = s.flush().await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                // A zero linger: the close resets at once (the drop does not block).
                #[allow(deprecated)]
                let _ = s.set_linger(Some(Duration::ZERO));
            }
        });
        port
    }

    /// A status line counts once it is whole: one cut short by a reset (a backend that
    /// crashed mid-reply) fails; a whole one before the reset passes.
    #[tokio::test]
    async fn a_status_line_cut_short_by_a_reset_fails() {
        let cut = resetting_server(b"HTTP/1.1 200").await;
        let r = probe_once(&target(ProbeKind::Http, cut, 500)).await;
        assert_eq!(r, Err("connection reset".to_string()));
        let whole = resetting_server(b"HTTP/1.1 200 OK\r\n").await;
        assert_eq!(probe_once(&target(ProbeKind::Http, whole, 500)).await, Ok(()));
    }

    /// Interim responses (`100 Continue`, `103 Early Hints`) come before the final one, which
    /// alone judges the backend (RFC 9110 15.2: a client parses them even unasked).
    #[tokio::test]
    async fn interim_responses_are_skipped_for_the_final_status() {
        let hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n";
        let up = http_server(move |_| [&hints[..], &status(200)].concat()).await;
        assert_eq!(probe_once(&target(ProbeKind::Http, up.port, 1000)).await, Ok(()));
        let twice = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n\r\n";
        let down = http_server(move |_| [&twice[..], &status(503)].concat()).await;
        let r = probe_once(&target(ProbeKind::Http, down.port, 1000)).await;
        assert_eq!(r, Err("HTTP 503".to_string()));
        let alone = http_server(move |_| hints.to_vec()).await;
        let r = probe_once(&target(ProbeKind::Http, alone.port, 1000)).await;
        assert_eq!(r, Err("connection closed before the final response".to_string()));
    }

    #[tokio::test]
    async fn silent_server_times_out_within_bound() {
        let s = silent_server().await;
        for kind in [ProbeKind::Http, ProbeKind::Https] {
            let start = Instant::now();
            let r = probe_once(&target(kind, s.port, 300)).await;
            let took = start.elapsed();
            assert_eq!(r, Err("timeout after 300 ms".to_string()));
            assert!(took >= Duration::from_millis(300), "{took:?}");
            assert!(took <= Duration::from_millis(500), "{kind:?} took {took:?}");
        }
    }

    #[test]
    fn tracker_thresholds() {
        // Alternating results with threshold 2 never change the state.
        let mut t = Tracker::default();
        for i in 0..20 {
            assert_eq!(t.record(i % 2 == 1, 2), None);
            assert_eq!(t.health(), Health::Healthy);
        }
        // Two failures in a row do; further failures do not report again.
        assert_eq!(t.record(false, 2), None);
        assert_eq!(t.record(false, 2), Some(Health::Unhealthy));
        assert_eq!(t.record(false, 2), None);
        // One success is not enough, a failure resets the count, two successes recover.
        assert_eq!(t.record(true, 2), None);
        assert_eq!(t.record(false, 2), None);
        assert_eq!(t.record(true, 2), None);
        assert_eq!(t.record(true, 2), Some(Health::Healthy));
        // Threshold 1 reacts to every change.
        let mut t = Tracker::default();
        assert_eq!(t.record(false, 1), Some(Health::Unhealthy));
        assert_eq!(t.record(true, 1), Some(Health::Healthy));
    }

    #[tokio::test]
    async fn flapping_server_does_not_flap_state_but_two_failures_do() {
        // Connections 0..10 alternate 500/200; from 10 on, always 500.
        let s = http_server(|n| status(if n < 10 && n % 2 == 1 { 200 } else { 500 })).await;
        let t = target(ProbeKind::Http, s.port, 500);
        let mut tracker = Tracker::default();
        for _ in 0..10 {
            let r = probe_once(&t).await;
            assert_eq!(tracker.record(r.is_ok(), 2), None);
        }
        assert!(probe_once(&t).await.is_err());
        assert_eq!(tracker.record(false, 2), None);
        let r = probe_once(&t).await;
        assert_eq!(r, Err("HTTP 500".to_string()));
        assert_eq!(tracker.record(false, 2), Some(Health::Unhealthy));
    }

    #[tokio::test]
    async fn prober_on_flapping_server_sends_one_change_after_two_failures() {
        // Probes 0..8 alternate 500/200 (no change), then 500 for good.
        let s = http_server(|n| status(if n < 8 && n % 2 == 1 { 200 } else { 500 })).await;
        let (tx, mut rx) = mpsc::channel(16);
        let t = Target {
            backend: LOCALHOST,
            lb: "lb".into(),
            probe: probe(ProbeKind::Http, s.port, 50, 50, 2),
        };
        let prober = Prober::spawn(vec![t], &BTreeSet::new(), 4, tx);
        let change = tokio::time::timeout(Duration::from_secs(3), rx.recv())
            .await
            .expect("a change")
            .unwrap();
        // The transition is caused by the 2 failures after the alternating run.
        assert!(s.connections.load(Ordering::SeqCst) >= 10);
        assert_eq!(change.health, Health::Unhealthy);
        assert_eq!(change.reason, "HTTP 500");
        assert_eq!(prober.health(&key("p")), Some(Health::Unhealthy));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(rx.try_recv().is_err(), "only one change");
        prober.stop();
    }

    #[tokio::test]
    async fn a_target_that_starts_down_needs_threshold_good_probes() {
        let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { while listener.accept().await.is_ok() {} });
        let (tx, mut rx) = mpsc::channel(16);
        let t = Target {
            backend: LOCALHOST,
            lb: "lb".into(),
            probe: probe(ProbeKind::Tcp, port, 50, 100, 3),
        };
        let down = BTreeSet::from([key("p")]);
        let prober = Prober::spawn(vec![t], &down, 1, tx);
        assert_eq!(prober.health(&key("p")), Some(Health::Unhealthy));
        let start = Instant::now();
        let c = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await.unwrap().unwrap();
        assert_eq!((c.health, c.reason.as_str()), (Health::Healthy, "connected"));
        // Probes at 0, 50 and 100 ms: the third success brings it back.
        assert!(start.elapsed() >= Duration::from_millis(90), "{:?}", start.elapsed());
        assert_eq!(prober.health(&key("p")), Some(Health::Healthy));
    }

    /// A prober started from where a stopped one found its targets goes on counting: two
    /// failures of three found, one more takes the target down; a changed probe counts
    /// afresh. Probes come every 10 s, so a change within seconds comes from the count
    /// carried over.
    #[tokio::test]
    async fn a_prober_goes_on_from_the_counts_a_stopped_one_found() {
        let port = closed_port().await;
        let t = Target {
            backend: LOCALHOST,
            lb: "lb".into(),
            probe: probe(ProbeKind::Tcp, port, 10_000, 100, 3),
        };
        // One probe, one failure: the stopped prober hands its count on.
        let (tx, _rx) = mpsc::channel(16);
        let prober = Prober::spawn(vec![t.clone()], &BTreeSet::new(), 1, tx);
        let found = loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let s = prober.states.lock().unwrap().get(&key("p")).unwrap().1.clone();
            if s.failures == 1 {
                break prober.stop();
            }
        };
        assert_eq!(found[&key("p")].1.failures, 1);
        // Two failures found: the next probe, the first of the new prober, is the third.
        let two = Tracker { health: Health::Healthy, successes: 0, failures: 2 };
        let found: Found = [(key("p"), (t.probe.clone(), two))].into();
        let (tx, mut rx) = mpsc::channel(16);
        let start = Start::new(vec![t.clone()], &found, &BTreeSet::new());
        let _prober = Prober::spawn_counted(start, 1, tx, ProbeStats::default());
        let c = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(c.expect("down at the first probe").unwrap().health, Health::Unhealthy);
        // The probe changed (another port): its count starts again, its state stays.
        let moved = Target { probe: Probe { port: port + 1, ..t.probe.clone() }, ..t.clone() };
        let (tx, mut rx) = mpsc::channel(16);
        let start = Start::new(vec![moved], &found, &BTreeSet::new());
        assert!(start.down().is_empty());
        let _prober = Prober::spawn_counted(start, 1, tx, ProbeStats::default());
        assert!(tokio::time::timeout(Duration::from_secs(1), rx.recv()).await.is_err());
    }

    /// A probe (or load balancer) renamed by a reload is the same target: it goes on from
    /// the state and counts found under its old name, which ends. (Before: a new target,
    /// healthy but unanswered, for which a BGP node withdrew every frontend it served
    /// until its first answer, whatever the backends' health. Seen failing.) A probe that
    /// changed besides its name starts afresh.
    #[tokio::test]
    async fn a_renamed_probe_goes_on_from_its_state_and_counts() {
        let old = target(ProbeKind::Tcp, closed_port().await, 100);
        let down = Tracker { health: Health::Unhealthy, successes: 0, failures: 2 };
        let found: Found = [(key("p"), (old.probe.clone(), down))].into();
        let stats = ProbeStats::default();
        stats.record(key("p"), true, Duration::from_millis(1));
        let renamed =
            Target { probe: Probe { name: "q".into(), ..old.probe.clone() }, ..old.clone() };
        let start = Start::new(vec![renamed.clone()], &found, &BTreeSet::new());
        assert_eq!(start.down(), [key("q")].into(), "its state goes on");
        let (tx, _rx) = mpsc::channel(16);
        let _prober = Prober::spawn_counted(start, 1, tx, stats.clone());
        let counts: Vec<_> =
            stats.snapshot().into_iter().map(|(k, c)| (k.probe, c.successes)).collect();
        assert_eq!(counts, [("q".to_owned(), 1)], "its counts go on under the new name");
        let changed = Target { probe: Probe { port: old.probe.port + 1, ..renamed.probe }, ..old };
        assert!(Start::new(vec![changed], &found, &BTreeSet::new()).down().is_empty());
    }

    /// A prober started without a target forgets its counts: their series end (seen
    /// failing: a removed backend's probe series stayed until the agent restarted).
    #[tokio::test]
    async fn a_target_no_longer_probed_leaves_the_counts() {
        let stats = ProbeStats::default();
        stats.record(key("gone"), true, Duration::from_millis(1));
        let t = target(ProbeKind::Tcp, closed_port().await, 100);
        let (tx, _rx) = mpsc::channel(16);
        let start = Start::new(vec![t], &Found::new(), &BTreeSet::new());
        let _prober = Prober::spawn_counted(start, 1, tx, stats.clone());
        assert!(stats.snapshot().iter().all(|(k, _)| *k != key("gone")), "{:?}", stats.snapshot());
    }

    #[tokio::test]
    async fn prober_reports_down_and_up_once_within_bound() {
        let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let serve = |l: TcpListener| {
            tokio::spawn(async move {
                while let Ok((s, _)) = l.accept().await {
                    drop(s);
                }
            })
        };
        let up = serve(listener);
        let (interval, timeout, threshold) = (100u32, 100u32, 2u32);
        let bound = Duration::from_millis(u64::from(interval * threshold + timeout));
        let (tx, mut rx) = mpsc::channel(16);
        let t = Target {
            backend: LOCALHOST,
            lb: "lb".into(),
            probe: probe(ProbeKind::Tcp, port, interval, timeout, threshold),
        };
        let prober = Prober::spawn(vec![t], &BTreeSet::new(), 1, tx);
        assert_eq!(prober.health(&key("p")), Some(Health::Healthy));
        assert_eq!(prober.health(&key("other")), None);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(rx.try_recv().is_err(), "no change while healthy");

        // Down: the listener is closed, connections are refused.
        up.abort();
        let _ = up.await;
        let start = Instant::now();
        let c = tokio::time::timeout(bound, rx.recv())
            .await
            .expect("unhealthy within interval × threshold + timeout")
            .unwrap();
        println!("down detected after {:?} (bound {bound:?})", start.elapsed());
        assert_eq!(
            c,
            Change {
                key: key("p"),
                health: Health::Unhealthy,
                reason: "connection refused".into(),
            }
        );
        assert_eq!(prober.health(&key("p")), Some(Health::Unhealthy));
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(rx.try_recv().is_err(), "exactly one unhealthy change");

        // Up again on the same port.
        let up = serve(TcpListener::bind((LOCALHOST, port)).await.unwrap());
        let start = Instant::now();
        let c = tokio::time::timeout(bound, rx.recv())
            .await
            .expect("healthy within interval × threshold + timeout")
            .unwrap();
        println!("recovery detected after {:?} (bound {bound:?})", start.elapsed());
        assert_eq!(c.health, Health::Healthy);
        assert_eq!(c.reason, "connected");
        assert_eq!(prober.health(&key("p")), Some(Health::Healthy));
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(rx.try_recv().is_err(), "exactly one healthy change");
        prober.stop();
        up.abort();
    }

    #[tokio::test]
    async fn prober_limits_concurrency() {
        // 4 targets against a silent server, each probe hangs for its whole 100 ms timeout.
        // With one probe at a time, at most ~1 probe per 100 ms runs in total.
        let s = silent_server().await;
        let targets: Vec<Target> = (0..4)
            .map(|i| Target {
                backend: LOCALHOST,
                lb: "lb".into(),
                probe: Probe {
                    name: format!("p{i}"),
                    ..probe(ProbeKind::Http, s.port, 100, 100, 2)
                },
            })
            .collect();
        let (tx, _rx) = mpsc::channel(16);
        let prober = Prober::spawn(targets, &BTreeSet::new(), 1, tx);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        prober.stop();
        let n = s.connections.load(Ordering::SeqCst);
        println!("{n} probes in 1 s with max_concurrent 1");
        assert!((5..=11).contains(&n), "{n} probes");
    }

    #[tokio::test]
    async fn duplicate_targets_run_once() {
        let s = http_server(|_| status(200)).await;
        let t = Target {
            backend: LOCALHOST,
            lb: "lb".into(),
            probe: probe(ProbeKind::Http, s.port, 1000, 500, 2),
        };
        let (tx, _rx) = mpsc::channel(1);
        let prober = Prober::spawn(vec![t.clone(), t], &BTreeSet::new(), 4, tx);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(s.connections.load(Ordering::SeqCst), 1);
        assert_eq!(prober.snapshot(), vec![(key("p"), Health::Healthy)]);
    }

    fn tls_acceptor() -> tokio_rustls::TlsAcceptor {
        let ck = rcgen::generate_simple_self_signed(vec!["backend.invalid".to_string()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    async fn https_server(code: u16) -> Server {
        let acceptor = tls_acceptor();
        let l = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
        let port = l.local_addr().unwrap().port();
        let last_request = Arc::new(Mutex::new(String::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (lr, c) = (last_request.clone(), connections.clone());
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (acceptor, lr) = (acceptor.clone(), lr.clone());
                tokio::spawn(async move {
                    let Ok(mut s) = acceptor.accept(s).await else {
                        return;
                    };
                    *lr.lock().unwrap() = read_head(&mut s).await;
                    answer(&mut s, &status(code)).await;
                });
            }
        });
        Server { port, last_request, connections, task }
    }

    #[tokio::test]
    async fn https_self_signed() {
        let s = https_server(200).await;
        assert_eq!(probe_once(&target(ProbeKind::Https, s.port, 2000)).await, Ok(()));
        assert!(s.last_request.lock().unwrap().starts_with("GET /health HTTP/1.1\r\n"));
        let s = https_server(500).await;
        assert_eq!(
            probe_once(&target(ProbeKind::Https, s.port, 2000)).await,
            Err("HTTP 500".to_string())
        );
        // HTTPS against a plain-HTTP server (which answers 400 to the ClientHello) fails at
        // the handshake.
        let l = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
        let port = l.local_addr().unwrap().port();
        let plain = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut b = [0u8; 64];
                let _ = s.read(&mut b).await;
                answer(&mut s, &status(400)).await;
            }
        });
        let r = probe_once(&target(ProbeKind::Https, port, 2000)).await;
        assert!(r.as_ref().unwrap_err().starts_with("TLS handshake failed"), "{r:?}");
        plain.abort();
    }

    #[test]
    fn status_line_parsing() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK"), Some(200));
        assert_eq!(parse_status(b"HTTP/1.0 503 Service Unavailable"), Some(503));
        assert_eq!(parse_status(b"HTTP/1.1 200"), Some(200));
        assert_eq!(parse_status(b"HTTP/1.1 20 OK"), None);
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH"), None);
        assert_eq!(parse_status(b""), None);
        assert!(http_request("/a b", "127.0.0.1:80".parse().unwrap()).is_err());
        assert!(http_request("/a\r\nX: y", "127.0.0.1:80".parse().unwrap()).is_err());
        let r = http_request("x", "[::1]:8080".parse().unwrap()).unwrap();
        assert!(
            String::from_utf8(r).unwrap().starts_with("GET /x HTTP/1.1\r\nHost: [::1]:8080\r\n")
        );
    }
}
