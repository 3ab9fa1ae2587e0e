//! The seccomp filters of a sandboxed agent: the system calls no agent needs, refused (and
//! logged, for `audit.rs`), and `clone3` answered `ENOSYS` in a filter of its own.

use std::io;

use nix::libc;

/// System calls no agent needs, refused with `EPERM`, and their names (for denial events).
const DENIED_SYSCALLS: &[(libc::c_long, &str)] = &[
    (libc::SYS_mount, "mount"),
    (libc::SYS_umount2, "umount2"),
    (libc::SYS_pivot_root, "pivot_root"),
    (libc::SYS_move_mount, "move_mount"),
    (libc::SYS_open_tree, "open_tree"),
    (libc::SYS_fsopen, "fsopen"),
    (libc::SYS_fsconfig, "fsconfig"),
    (libc::SYS_fsmount, "fsmount"),
    (libc::SYS_fspick, "fspick"),
    (libc::SYS_mount_setattr, "mount_setattr"),
    (libc::SYS_swapon, "swapon"),
    (libc::SYS_swapoff, "swapoff"),
    (libc::SYS_reboot, "reboot"),
    (libc::SYS_kexec_load, "kexec_load"),
    (libc::SYS_kexec_file_load, "kexec_file_load"),
    (libc::SYS_init_module, "init_module"),
    (libc::SYS_finit_module, "finit_module"),
    (libc::SYS_delete_module, "delete_module"),
    (libc::SYS_bpf, "bpf"),
    (libc::SYS_perf_event_open, "perf_event_open"),
    (libc::SYS_keyctl, "keyctl"),
    (libc::SYS_add_key, "add_key"),
    (libc::SYS_request_key, "request_key"),
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_process_vm_readv, "process_vm_readv"),
    (libc::SYS_process_vm_writev, "process_vm_writev"),
    (libc::SYS_userfaultfd, "userfaultfd"),
    (libc::SYS_acct, "acct"),
    (libc::SYS_quotactl, "quotactl"),
    (libc::SYS_syslog, "syslog"),
    (libc::SYS_settimeofday, "settimeofday"),
    (libc::SYS_clock_settime, "clock_settime"),
    (libc::SYS_clock_adjtime, "clock_adjtime"),
    (libc::SYS_adjtimex, "adjtimex"),
    (libc::SYS_sethostname, "sethostname"),
    (libc::SYS_setdomainname, "setdomainname"),
    (libc::SYS_open_by_handle_at, "open_by_handle_at"),
    (libc::SYS_name_to_handle_at, "name_to_handle_at"),
    (libc::SYS_fanotify_init, "fanotify_init"),
    (libc::SYS_vhangup, "vhangup"),
    (libc::SYS_io_uring_setup, "io_uring_setup"),
    (libc::SYS_io_uring_enter, "io_uring_enter"),
    (libc::SYS_io_uring_register, "io_uring_register"),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_iopl, "iopl"),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_ioperm, "ioperm"),
    #[cfg(target_arch = "x86_64")]
    (libc::SYS_uselib, "uselib"),
];

/// The name of a system call the filter refuses, for a denial the kernel reported.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    let namespaces: &[(libc::c_long, &str)] = &[
        (libc::SYS_unshare, "unshare"),
        (libc::SYS_setns, "setns"),
        (libc::SYS_clone, "clone"),
    ];
    DENIED_SYSCALLS
        .iter()
        .chain(namespaces)
        .find(|&&(number, _)| number == nr)
        .map(|&(_, name)| name)
}

/// The filter for `namespaces`, compiled once per keeper (it is the same for every agent).
pub(super) fn seccomp_cached(namespaces: bool) -> io::Result<Vec<seccompiler::sock_filter>> {
    use std::sync::OnceLock;
    static PROGRAMS: [OnceLock<Vec<seccompiler::sock_filter>>; 2] =
        [OnceLock::new(), OnceLock::new()];
    let slot = &PROGRAMS[usize::from(namespaces)];
    if let Some(program) = slot.get() {
        return Ok(program.clone());
    }
    let program = seccomp_program(namespaces)?;
    Ok(slot.get_or_init(|| program).clone())
}

/// System calls no agent needs, refused with `EPERM`; `namespaces` leaves namespace creation
/// allowed (without it, `clone3` is refused by [`clone3_enosys`]).
fn seccomp_program(namespaces: bool) -> io::Result<Vec<seccompiler::sock_filter>> {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    };
    use std::collections::BTreeMap;
    let fail = |error: seccompiler::BackendError| io::Error::other(format!("seccomp: {error}"));
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = DENIED_SYSCALLS
        .iter()
        .map(|&(nr, _)| (nr, Vec::new()))
        .collect();
    if !namespaces {
        rules.insert(libc::SYS_unshare, Vec::new());
        rules.insert(libc::SYS_setns, Vec::new());
        // A clone with any namespace flag: one rule per flag (a rule matches on equality).
        let flags = [
            libc::CLONE_NEWNS,
            libc::CLONE_NEWUSER,
            libc::CLONE_NEWNET,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWCGROUP,
        ];
        let clone = flags
            .into_iter()
            .map(|flag| {
                let flag = flag as u64;
                SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(flag),
                    flag,
                )
                .and_then(|condition| SeccompRule::new(vec![condition]))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(fail)?;
        rules.insert(libc::SYS_clone, clone);
    }
    let arch: seccompiler::TargetArch =
        std::env::consts::ARCH
            .try_into()
            .map_err(|error: seccompiler::BackendError| {
                io::Error::other(format!("seccomp: {error}"))
            })?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|error| io::Error::other(format!("seccomp: {error}")))?;
    let program: seccompiler::BpfProgram = filter.try_into().map_err(fail)?;
    let mut prefix = prefix();
    prefix.extend(program);
    Ok(prefix)
}

const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const RET_K: u16 = 0x06;
const RET_ERRNO: u32 = 0x0005_0000;

/// `clone3` refused with `ENOSYS` (its flags cannot be read by a filter), which makes the C
/// library fall back to `clone`, whose flags are checked.
pub(super) fn clone3_enosys() -> [seccompiler::sock_filter; 4] {
    const RET_ALLOW: u32 = 0x7fff_0000;
    let op = |code, k, jt, jf| seccompiler::sock_filter { code, jt, jf, k };
    [
        op(LD_W_ABS, 0, 0, 0),
        op(JEQ_K, libc::SYS_clone3 as u32, 0, 1),
        op(RET_K, RET_ERRNO | libc::ENOSYS as u32, 0, 0),
        op(RET_K, RET_ALLOW, 0, 0),
    ]
}

/// What the filter checks before seccompiler's rules: the architecture, and on x86_64 no x32
/// system call numbers (they would pass under other numbers).
fn prefix() -> Vec<seccompiler::sock_filter> {
    const JGE_K: u16 = 0x35;
    const RET_KILL_PROCESS: u32 = 0x8000_0000;
    #[cfg(target_arch = "x86_64")]
    const AUDIT_ARCH: u32 = 0xC000_003E;
    #[cfg(target_arch = "aarch64")]
    const AUDIT_ARCH: u32 = 0xC000_00B7;
    let op = |code, k, jt, jf| seccompiler::sock_filter { code, jt, jf, k };
    let mut program = vec![
        op(LD_W_ABS, 4, 0, 0),
        op(JEQ_K, AUDIT_ARCH, 1, 0),
        op(RET_K, RET_KILL_PROCESS, 0, 0),
        op(LD_W_ABS, 0, 0, 0),
    ];
    if cfg!(target_arch = "x86_64") {
        program.push(op(JGE_K, 0x4000_0000, 0, 1));
        program.push(op(RET_K, RET_ERRNO | libc::EPERM as u32, 0, 0));
    }
    program
}
