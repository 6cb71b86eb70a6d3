//! No-op programs `connwatch doctor` loads to report whether this kernel allows kprobes and
//! BPF trampolines (fentry). connwatch itself needs neither; they are never attached otherwise.
use aya_ebpf::{
    macros::{fentry, kprobe},
    programs::{FEntryContext, ProbeContext},
};

#[kprobe]
pub fn doctor_kprobe(_ctx: ProbeContext) -> u32 {
    0
}

#[fentry(function = "tcp_close")]
pub fn doctor_fentry(_ctx: FEntryContext) -> u32 {
    0
}
