//! The xdpgate XDP dataplane: parse -> (classify -> act) -> count.
#![no_std]
#![no_main]

mod headers;
mod maps;
mod parse;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use xdpgate_common::{
    iface::IfaceConfig,
    stats::{DropReason, iface_stat_index},
};

use crate::{
    maps::{DROP_STATS, IFACE_STATS, IFACES},
    parse::{Parsed, parse},
};

/// The dataplane. Every path computes a verdict, which is counted at this single exit.
#[xdp]
pub fn xdpgate(ctx: XdpContext) -> u32 {
    let action = match process(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            count_drop(reason);
            xdp_action::XDP_DROP
        }
    };
    count_verdict(&ctx, action);
    action
}

/// A program that passes everything: the baseline benchmarks divide by.
#[xdp]
pub fn xdp_noop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[inline(always)]
fn process(ctx: &XdpContext) -> Result<u32, DropReason> {
    match parse(ctx)? {
        Parsed::NotIp => Ok(xdp_action::XDP_PASS),
        Parsed::Ip(_meta) => Ok(xdp_action::XDP_PASS),
    }
}

#[inline(always)]
fn iface(ctx: &XdpContext) -> Option<&'static IfaceConfig> {
    unsafe { IFACES.get(ctx.ingress_ifindex() as u32) }
}

#[inline(always)]
fn count_verdict(ctx: &XdpContext, action: u32) {
    let slot = iface(ctx).map_or(0, |c| c.slot);
    if let Some(c) = IFACE_STATS.get_ptr_mut(iface_stat_index(slot, action)) {
        // Per-CPU slot: no other CPU writes it, so plain adds are exact.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += (ctx.data_end() - ctx.data()) as u64;
        }
    }
}

#[inline(always)]
fn count_drop(reason: DropReason) {
    if let Some(c) = DROP_STATS.get_ptr_mut(reason as u32) {
        unsafe { *c += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
