//! Dates as the CLI, the agent's records and the flow log print them (the dataplane's
//! monotonic clock among them, as wall-clock time), and spans of time as the CLI reads them.

/// `secs` since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC, RFC 3339).
pub fn rfc3339(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .unwrap_or(jiff::Timestamp::MAX)
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// The dataplane's monotonic nanoseconds as wall-clock seconds since the Unix epoch.
pub fn wall_clock(mono_ns: u64) -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    now - (xdpgate_dataplane::monotonic_ns().saturating_sub(mono_ns)) as f64 / 1e9
}

/// Seconds since the Unix epoch as RFC 3339 in UTC with milliseconds.
pub fn rfc3339_millis(unix: f64) -> String {
    let ms = (unix.max(0.0) * 1e3).round() as u64;
    let whole = rfc3339(ms / 1000);
    format!("{}.{:03}Z", whole.trim_end_matches('Z'), ms % 1000)
}

/// The longest span a `SECONDS` flag takes: a year. Larger values overflowed the clocks
/// they were added to, and the commands panicked after they had changed something (an
/// agent after installing its policy, a capture after emptying its file).
pub const MAX_SECONDS: u64 = 365 * 86_400;

/// A `SECONDS` flag's value: whole seconds, at most [`MAX_SECONDS`].
pub fn seconds(s: &str) -> Result<u64, String> {
    let n: u64 = s.parse().map_err(|e| format!("not a number of seconds: {e}"))?;
    if n > MAX_SECONDS {
        return Err(format!("at most {MAX_SECONDS} (a year)"));
    }
    Ok(n)
}

/// A `SECONDS` flag's value that may have a fraction: from 0 to [`MAX_SECONDS`].
pub fn fractional_seconds(s: &str) -> Result<f64, String> {
    let n: f64 = s.parse().map_err(|e| format!("not a number of seconds: {e}"))?;
    if !(0.0..=MAX_SECONDS as f64).contains(&n) {
        return Err(format!("from 0 to {MAX_SECONDS} (a year)"));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(4_107_542_399), "2100-02-28T23:59:59Z");
    }
}
