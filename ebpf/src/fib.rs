//! `xdpgate-fib`: the kernel's FIB asked as the dataplane asks it (`bpf_fib_lookup` from
//! XDP, flags 0), for `xdpgate next-hop`. Run with `BPF_PROG_TEST_RUN`: the packet is a
//! `bpf_fib_lookup` followed by 8 bytes; the program answers in place (the parameters as
//! the helper left them, then its return code). A separate object with no maps, so that
//! asking creates nothing and needs no dataplane attached.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{
    EbpfContext,
    bindings::{bpf_fib_lookup, xdp_action},
    helpers::generated::bpf_fib_lookup as fib_lookup,
    macros::xdp,
    programs::XdpContext,
};

#[xdp]
pub fn xdpgate_fib(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    let size = size_of::<bpf_fib_lookup>();
    if start + size + 8 > end {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: the bounds were checked above; test-run packets start 8-byte aligned.
    unsafe {
        let mut p: bpf_fib_lookup = core::ptr::read(start as *const bpf_fib_lookup);
        let rc = fib_lookup(ctx.as_ptr(), &mut p, size as i32, 0);
        core::ptr::write(start as *mut bpf_fib_lookup, p);
        core::ptr::write((start + size) as *mut i64, rc);
    }
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
