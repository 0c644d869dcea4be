//! An agent (`xdpgate run`) in a test's network namespace, with a policy and a node file of
//! its own; stopped, and its files removed, when dropped (a failing test included).

use std::{path::PathBuf, process::Child};

use super::{Netns, Pins, unique};

pub struct NodeAgent {
    child: Child,
    dir: PathBuf,
}

impl NodeAgent {
    /// Starts `xdpgate run` in `ns` against `pins` with `policy` and the node file `node`
    /// (texts), metrics off, its log kept (`log`).
    pub fn start(ns: &Netns, pins: &Pins, policy: &str, node: &str) -> Self {
        let dir = std::env::temp_dir().join(unique("node"));
        std::fs::create_dir_all(&dir).unwrap();
        let (policy_file, node_file) = (dir.join("policy.yaml"), dir.join("node.yaml"));
        std::fs::write(&policy_file, policy).unwrap();
        std::fs::write(&node_file, node).unwrap();
        let mut command = pins.agent(&policy_file);
        match &pins.netns {
            Some(theirs) => assert_eq!(theirs, &ns.name, "the agent runs where its pins are"),
            None => {
                command.args(["--netns", &ns.name]);
            }
        }
        let child = command
            .arg("--node")
            .arg(&node_file)
            .stderr(std::fs::File::create(dir.join("agent.log")).unwrap())
            .spawn()
            .expect("spawn xdpgate run");
        Self { child, dir }
    }
}

impl NodeAgent {
    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// The policy file it runs (a reload reads it again).
    pub fn policy_file(&self) -> PathBuf {
        self.dir.join("policy.yaml")
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status if it exits within `within` (polled), else none.
    pub fn exits_within(
        &mut self,
        within: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Stops the agent as an operator or systemd does (SIGTERM) and waits for it to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child, which has not been waited for yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().expect("wait for xdpgate run")
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
