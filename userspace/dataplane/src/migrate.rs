//! Carrying the flow tables over to a build whose `FlowValue` has another layout. The
//! tables' pin names carry the layout's version (`FLOWS_V2`), so the new build pins its own
//! tables beside the old ones, which the old programs go on using until they are replaced:
//! `upgrade` copies the flows over, swaps the programs, copies what the old programs added
//! meanwhile, and then unpins the old tables. The pipelines are versioned alike, so an old
//! entry program never tail-calls a stage that uses the new tables. Every step can be
//! repeated, so an upgrade stopped at any point is finished by running it again.

use anyhow::{Context, Result};
use aya::{
    Pod,
    maps::{HashMap, MapData},
};
use xdpgate_common::{
    flow::{FlowKey, FlowValue, NextHop},
    maps::{
        EGRESS_PIPELINE, EGRESS_PIPELINE_V1, EMBRYOS, EMBRYOS_V1, FLOWS, FLOWS_V1, PIPELINE,
        PIPELINE_V1,
    },
};

use crate::{PinDir, table};

/// The tables of an earlier layout and the tables that replace them.
const TABLES: [(&str, &str); 2] = [(FLOWS_V1, FLOWS), (EMBRYOS_V1, EMBRYOS)];
/// The earlier layout's pipelines and this one's (their stages use their own tables).
const PIPELINES: [(&str, &str); 2] =
    [(PIPELINE_V1, PIPELINE), (EGRESS_PIPELINE_V1, EGRESS_PIPELINE)];

/// `FlowValue` before the next-hop cache.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct FlowValueV1 {
    generation: u64,
    last_seen_ns: u64,
    packets: u64,
    bytes: u64,
    rules: [u16; 2],
    direction: u8,
    reply: u8,
    tcp: u8,
    nat: u8,
    nat_addr: [u32; 4],
    nat_port: u16,
    idle_s: u16,
    service: u32,
    backend: u32,
    ack: u32,
}

// SAFETY: plain data of integers, without padding (72 bytes, as the kernel holds it).
unsafe impl Pod for FlowValueV1 {}

impl From<FlowValueV1> for FlowValue {
    fn from(v: FlowValueV1) -> Self {
        FlowValue {
            generation: v.generation,
            last_seen_ns: v.last_seen_ns,
            packets: v.packets,
            bytes: v.bytes,
            rules: v.rules,
            direction: v.direction,
            reply: v.reply,
            tcp: v.tcp,
            nat: v.nat,
            nat_addr: v.nat_addr,
            nat_port: v.nat_port,
            idle_s: v.idle_s,
            service: v.service,
            backend: v.backend,
            seq: v.ack,
            hop: NextHop::NONE,
        }
    }
}

/// Whether tables of an earlier layout are pinned under `pins`, to be carried over.
pub fn pending(pins: &PinDir) -> bool {
    TABLES.iter().any(|(old, _)| pins.map(old).exists())
}

/// Refuses, while the earlier layout's tables are pinned, a job that would judge flows by
/// the new tables (idle sweeps, NAT expiry): until `upgrade` has carried them over, the
/// new tables do not hold the flows, and a translation would look idle while in use.
pub fn ensure_done(pins: &PinDir) -> Result<()> {
    if pending(pins) {
        anyhow::bail!(
            "flow tables of an earlier build are pinned under {}: run `xdpgate upgrade` to \
             carry them over (flow sweeps and NAT expiry wait until then)",
            pins.path().display()
        );
    }
    Ok(())
}

/// Whether programs of this layout run on any attached interface: an entry program
/// tail-calls through this layout's pipeline. Until then the new tables hold only copies.
pub fn in_use(pins: &PinDir) -> Result<bool> {
    let ids = |name: &str| -> Result<Option<u32>> {
        if !pins.map(name).exists() {
            return Ok(None);
        }
        Ok(Some(aya::maps::MapInfo::from_pin(pins.map(name))?.id()))
    };
    let pipelines = [ids(PIPELINE)?, ids(EGRESS_PIPELINE)?];
    let mut attached = Vec::new();
    for name in pins.attached()? {
        attached.push(crate::link_info(pins, &name)?.prog_id);
        attached.extend(crate::egress_link_info(pins, &name)?.map(|(_, prog)| prog));
    }
    for info in aya::programs::loaded_programs() {
        let info = match info {
            // Freed between its id's listing and its opening: any program of the machine
            // may go at any moment, and an attached one stays loaded, so it was not ours.
            Err(aya::programs::ProgramError::SyscallError(e))
                if e.io_error.kind() == std::io::ErrorKind::NotFound =>
            {
                continue;
            }
            info => info?,
        };
        if attached.contains(&info.id()) {
            let maps = info.map_ids()?.unwrap_or_default();
            if pipelines.iter().flatten().any(|p| maps.contains(p)) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Copies the entries of the earlier layout's tables into the new ones. Before any program
/// of this layout runs, the new tables hold only earlier copies (of an upgrade stopped half
/// way), which are cleared first: the earlier tables are the truth. After, an entry in both
/// is taken from whichever saw a packet last. Returns how many were copied.
pub fn copy(pins: &PinDir) -> Result<u64> {
    let fresh = !in_use(pins)?;
    // This layout's programs run and the earlier ones' pipelines are gone: a `finish` was
    // cut short after its last copy. The earlier tables are then stale: copied again, they
    // would bring back flows the new programs have closed or removed since.
    if !fresh && PIPELINES.iter().all(|(old, _)| !pins.map(old).exists()) {
        return Ok(0);
    }
    let mut copied = 0;
    for (old, new) in TABLES {
        if !pins.map(old).exists() {
            continue;
        }
        let from: HashMap<MapData, FlowKey, FlowValueV1> = pins
            .open_map(old)?
            .try_into()
            .with_context(|| format!("{old}: not a flow table of the earlier layout"))?;
        let mut to: HashMap<MapData, FlowKey, FlowValue> = pins.open_map(new)?.try_into()?;
        if fresh {
            let mut stale = Vec::new();
            table::for_each(&to, |k, _| {
                stale.push(*k);
                Ok(())
            })?;
            for k in stale {
                let _ = to.remove(&k);
            }
        }
        let mut entries = Vec::new();
        table::for_each(&from, |k, v| {
            entries.push((*k, FlowValue::from(*v)));
            Ok(())
        })?;
        for (k, v) in entries {
            if to.get(&k, 0).is_ok_and(|there| there.last_seen_ns >= v.last_seen_ns) {
                continue;
            }
            // A full table (of the same size, so only if flows came meanwhile) refuses the
            // rest: they are decided again on their next packet.
            if to.insert(k, v, 0).is_ok() {
                copied += 1;
            }
        }
    }
    Ok(copied)
}

/// Unpins the tables and pipelines this layout made, when an upgrade fails before any of
/// its programs runs: nothing uses them, and the earlier ones stay the truth.
pub fn abandon(pins: &PinDir) {
    for (_, new) in TABLES.iter().chain(&PIPELINES) {
        let _ = std::fs::remove_file(pins.map(new));
    }
}

/// Unpins the earlier layout's pipelines and tables; the kernel frees them once no program
/// uses them. The tables last: while they are pinned the migration is [`pending`] and is
/// finished again, and pipelines left after them (a kill between) kept the earlier programs
/// and their tables in memory for good.
pub fn finish(pins: &PinDir) -> Result<()> {
    for (old, _) in PIPELINES.iter().chain(&TABLES) {
        let path = pins.map(old);
        if path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A finish cut short (here by an unpin that fails) is still pending, and done again.
    #[test]
    fn a_finish_cut_short_is_still_pending() {
        let dir = std::env::temp_dir().join(format!("xgmigrate{}", std::process::id()));
        let pins = PinDir::new(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (old, _) in PIPELINES.iter().chain(&TABLES) {
            std::fs::write(pins.map(old), "").unwrap();
        }
        // A pipeline that cannot be unpinned (a directory where its pin is).
        let (stuck, _) = PIPELINES[1];
        std::fs::remove_file(pins.map(stuck)).unwrap();
        std::fs::create_dir_all(pins.map(stuck).join("x")).unwrap();
        let cut = finish(&pins);
        let still = pending(&pins);
        std::fs::remove_dir_all(pins.map(stuck)).unwrap();
        finish(&pins).unwrap();
        let done = !pending(&pins) && PIPELINES.iter().all(|(old, _)| !pins.map(old).exists());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(cut.is_err() && still, "cut short: {cut:?}, pending {still}");
        assert!(done);
    }

    /// Loads a program of two instructions (`r0 = 0; exit`) and closes it at once.
    fn load_and_free_a_program() {
        let insns: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
        let license = c"GPL";
        // bpf_attr for BPF_PROG_LOAD: prog_type, insn_cnt, insns, license (the rest zero).
        let mut attr = [0u64; 16];
        attr[0] = 1 /* BPF_PROG_TYPE_SOCKET_FILTER */ | (insns.len() as u64) << 32;
        attr[1] = insns.as_ptr() as u64;
        attr[2] = license.as_ptr() as u64;
        // SAFETY: bpf(2) reads the attribute and the buffers it points to, all alive here.
        let fd = unsafe {
            libc::syscall(libc::SYS_bpf, 5 /* BPF_PROG_LOAD */, attr.as_mut_ptr(), 128)
        };
        assert!(fd >= 0, "BPF_PROG_LOAD: {}", std::io::Error::last_os_error());
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(fd as i32) };
    }

    /// Another process's programs come and go while `attach` or `upgrade` asks which run
    /// (seen failing: `No such file or directory` when one was freed between its id's
    /// listing and its opening; the suite's other test binaries load and free dataplanes
    /// all the time).
    #[test]
    fn programs_freed_meanwhile_do_not_fail_the_question() {
        let pins = PinDir::new(format!("/sys/fs/bpf/xgmigrate-none-{}", std::process::id()));
        use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
        /// Stops the loader however the question ends (a panic included): the scope waits.
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Relaxed);
            }
        }
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Relaxed) {
                    load_and_free_a_program();
                }
            });
            let _stop = Stop(&stop);
            let asked = (0..3_000).map(|_| in_use(&pins)).find(Result::is_err);
            assert!(asked.is_none(), "{asked:?}");
        });
    }

    #[test]
    fn the_earlier_layout_is_the_current_one_without_the_next_hop() {
        assert_eq!(size_of::<FlowValueV1>(), 72);
        assert_eq!(size_of::<FlowValue>(), 72 + size_of::<NextHop>());
    }
}
