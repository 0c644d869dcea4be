//! The flow log's writes when the file takes only part of a batch: a file-size limit
//! (RLIMIT_FSIZE) stops a write part-way, and a handler of the SIGXFSZ that comes with it
//! lifts the limit, so that the one retry succeeds. A test binary of its own: the limit and
//! the handler are the whole process's.

use std::fs;

use serde_json::{Value, json};
use xdpgate::flowlog::{Lines, Sink};

extern "C" fn lift_the_limit(_: libc::c_int) {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &unlimited) };
}

fn file_limit() -> libc::rlim_t {
    let mut now = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut now) }, 0);
    now.rlim_cur
}

/// A batch whose write stops at 48 KiB, in the middle of a line: the retry writes the rest
/// from the first line that did not land whole, so every line is in the file once, whole
/// and in order (seen failing with the retry starting over: 154 lines twice; and with it
/// counting one line too many as landed: one missing).
#[test]
fn a_write_cut_short_is_finished_without_loss_or_duplicates() {
    let dir = std::env::temp_dir().join(format!("xgcutshort{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join("flows.jsonl");
    let mut sink = Sink::open(path.to_str().unwrap(), 1 << 30, 1).unwrap();
    let mut lines = Lines::default();
    (0..2000u64).for_each(|i| lines.push(&json!({"i": i, "pad": "x".repeat(300)})));

    let handler = lift_the_limit as extern "C" fn(libc::c_int);
    assert_ne!(
        unsafe { libc::signal(libc::SIGXFSZ, handler as libc::sighandler_t) },
        libc::SIG_ERR
    );
    let limit = libc::rlimit { rlim_cur: 48 << 10, rlim_max: libc::RLIM_INFINITY };
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &limit) }, 0);
    let written = sink.write_lines(&lines);
    // The limit stopped a write: the handler lifted it.
    assert_eq!(file_limit(), libc::RLIM_INFINITY, "the write was never cut short");
    written.unwrap();

    let text = fs::read_to_string(&path).unwrap();
    let got: Vec<u64> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["i"].as_u64().unwrap())
        .collect();
    let twice = got.len() - got.iter().collect::<std::collections::BTreeSet<_>>().len();
    let missing = (0..2000).filter(|i| !got.contains(i)).count();
    assert!(
        got == (0..2000).collect::<Vec<_>>(),
        "{} lines, {twice} twice, {missing} missing",
        got.len()
    );
    let _ = fs::remove_dir_all(&dir);
}
