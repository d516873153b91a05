//! seccomp filters from the OCI spec, compiled by libseccomp (the library runc and youki use).

use std::str::FromStr;

use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};
use oci_spec::runtime::{Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator};

use super::error::{Error, Result};

fn name<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn action(a: &LinuxSeccompAction, errno: Option<u32>, field: &str) -> Result<ScmpAction> {
    let n = name(a);
    Ok(match n.as_str() {
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => ScmpAction::KillThread,
        "SCMP_ACT_KILL_PROCESS" => ScmpAction::KillProcess,
        "SCMP_ACT_TRAP" => ScmpAction::Trap,
        "SCMP_ACT_ERRNO" => ScmpAction::Errno(errno.unwrap_or(libc::EPERM as u32) as i32),
        "SCMP_ACT_TRACE" => ScmpAction::Trace(errno.unwrap_or(libc::EPERM as u32) as u16),
        "SCMP_ACT_ALLOW" => ScmpAction::Allow,
        "SCMP_ACT_LOG" => ScmpAction::Log,
        other => {
            return Err(Error::InvalidSpec(format!(
                "{field}: action {other:?} is not supported"
            )))
        }
    })
}

/// The spec's seccomp actions this runtime translates (for `features`).
pub fn implemented_actions() -> Vec<LinuxSeccompAction> {
    use LinuxSeccompAction as A;
    [
        A::ScmpActKill,
        A::ScmpActKillThread,
        A::ScmpActKillProcess,
        A::ScmpActTrap,
        A::ScmpActErrno,
        A::ScmpActNotify,
        A::ScmpActTrace,
        A::ScmpActLog,
        A::ScmpActAllow,
    ]
    .into_iter()
    .filter(|a| action(a, None, "features").is_ok())
    .collect()
}

/// The spec's seccomp operators this runtime translates, by their spec names.
pub fn implemented_operators() -> Vec<String> {
    use LinuxSeccompOperator as O;
    [
        O::ScmpCmpNe,
        O::ScmpCmpLt,
        O::ScmpCmpLe,
        O::ScmpCmpEq,
        O::ScmpCmpGe,
        O::ScmpCmpGt,
        O::ScmpCmpMaskedEq,
    ]
    .iter()
    .map(name)
    .filter(|o| compare_op(o, 0, None, "features").is_ok())
    .collect()
}

/// The spec's architectures libseccomp resolves here.
pub fn implemented_archs() -> Vec<Arch> {
    use Arch as A;
    [
        A::ScmpArchX86,
        A::ScmpArchX86_64,
        A::ScmpArchX32,
        A::ScmpArchArm,
        A::ScmpArchAarch64,
        A::ScmpArchMips,
        A::ScmpArchMips64,
        A::ScmpArchMips64n32,
        A::ScmpArchMipsel,
        A::ScmpArchMipsel64,
        A::ScmpArchMipsel64n32,
        A::ScmpArchPpc,
        A::ScmpArchPpc64,
        A::ScmpArchPpc64le,
        A::ScmpArchS390,
        A::ScmpArchS390x,
        A::ScmpArchParisc,
        A::ScmpArchParisc64,
    ]
    .into_iter()
    .filter(|a| ScmpArch::from_str(&name(a)).is_ok())
    .collect()
}

fn compare_op(op: &str, value: u64, value_two: Option<u64>, field: &str) -> Result<ScmpCompareOp> {
    Ok(match op {
        "SCMP_CMP_NE" => ScmpCompareOp::NotEqual,
        "SCMP_CMP_LT" => ScmpCompareOp::Less,
        "SCMP_CMP_LE" => ScmpCompareOp::LessOrEqual,
        "SCMP_CMP_EQ" => ScmpCompareOp::Equal,
        "SCMP_CMP_GE" => ScmpCompareOp::GreaterEqual,
        "SCMP_CMP_GT" => ScmpCompareOp::Greater,
        // For a masked compare the OCI `value` is the mask and `valueTwo` the datum.
        "SCMP_CMP_MASKED_EQ" => {
            let _ = value_two;
            ScmpCompareOp::MaskedEqual(value)
        }
        other => {
            return Err(Error::InvalidSpec(format!(
                "{field}: unknown operator {other:?}"
            )))
        }
    })
}

/// Compiles the spec's filter. Unknown syscall names are skipped (the profile may name
/// syscalls this kernel or libseccomp does not know), as runc does.
pub fn build(s: &LinuxSeccomp) -> Result<ScmpFilterContext> {
    let lib =
        |e: libseccomp::error::SeccompError| Error::InvalidSpec(format!("linux.seccomp: {e}"));
    let default = action(
        &s.default_action(),
        s.default_errno_ret(),
        "linux.seccomp.defaultAction",
    )?;
    let mut f = ScmpFilterContext::new(default).map_err(lib)?;
    // The runtime sets no_new_privs itself, from the spec.
    f.set_ctl_nnp(false).map_err(lib)?;
    for a in s.architectures().iter().flatten() {
        let n = name(a);
        let arch = ScmpArch::from_str(&n).map_err(|_| {
            Error::InvalidSpec(format!("linux.seccomp.architectures: unknown {n:?}"))
        })?;
        if arch != ScmpArch::native() {
            f.add_arch(arch).map_err(lib)?;
        }
    }
    for flag in s.flags().iter().flatten() {
        match name(flag).as_str() {
            "SECCOMP_FILTER_FLAG_LOG" => {
                f.set_ctl_log(true).map_err(lib)?;
            }
            "SECCOMP_FILTER_FLAG_SPEC_ALLOW" => {
                f.set_ctl_ssb(true).map_err(lib)?;
            }
            "SECCOMP_FILTER_FLAG_TSYNC" => {}
            other => {
                return Err(Error::InvalidSpec(format!(
                    "linux.seccomp.flags: {other:?} is not supported"
                )))
            }
        }
    }
    for (i, sc) in s.syscalls().iter().flatten().enumerate() {
        let field = format!("linux.seccomp.syscalls[{i}]");
        let act = action(&sc.action(), sc.errno_ret(), &field)?;
        if act == default {
            continue;
        }
        let mut cmps = Vec::new();
        let mut indices = Vec::new();
        for a in sc.args().iter().flatten() {
            indices.push(a.index());
            let op = compare_op(&name(&a.op()), a.value(), a.value_two(), &field)?;
            let datum = if matches!(op, ScmpCompareOp::MaskedEqual(_)) {
                a.value_two().unwrap_or(0)
            } else {
                a.value()
            };
            cmps.push(ScmpArgCompare::new(a.index() as u32, op, datum));
        }
        indices.sort_unstable();
        indices.dedup();
        let unique = indices.len() == cmps.len();
        for n in sc.names() {
            let Ok(call) = ScmpSyscall::from_name(n) else {
                continue;
            };
            let r = if cmps.is_empty() {
                f.add_rule(act, call).map(|_| ())
            } else if unique {
                // All conditions on distinct arguments: one rule, conditions ANDed.
                f.add_rule_conditional(act, call, &cmps).map(|_| ())
            } else {
                // Several conditions on one argument cannot be ANDed: one rule each (ORed).
                cmps.iter().try_for_each(|c| {
                    f.add_rule_conditional(act, call, std::slice::from_ref(c))
                        .map(|_| ())
                })
            };
            r.map_err(|e| Error::InvalidSpec(format!("{field} ({n}): {e}")))?;
        }
    }
    Ok(f)
}

/// Compiles and installs the filter in the calling process.
pub fn load(s: &LinuxSeccomp) -> Result<()> {
    let f = build(s)?;
    f.load()
        .map_err(|e| Error::Child(format!("load seccomp filter: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_profiles_with_conditions() {
        let s: LinuxSeccomp = serde_json::from_str(
            r#"{
            "defaultAction": "SCMP_ACT_ERRNO",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [
              {"names": ["read", "write", "exit_group", "no_such_syscall"], "action": "SCMP_ACT_ALLOW"},
              {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
               "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]},
              {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
               "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}, {"index": 0, "value": 131072, "op": "SCMP_CMP_EQ"}]},
              {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
               "args": [{"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
              {"names": ["kill"], "action": "SCMP_ACT_LOG"},
              {"names": ["ptrace"], "action": "SCMP_ACT_KILL_PROCESS"},
              {"names": ["mount"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
            ]}"#,
        )
        .unwrap();
        build(&s).unwrap();
    }

    #[test]
    fn rejects_unknown_actions_and_ops() {
        let bad_op: std::result::Result<LinuxSeccomp, _> = serde_json::from_str(
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_BOGUS"}]}]}"#,
        );
        // oci-spec itself rejects unknown operators while parsing config.json.
        assert!(bad_op.is_err());
        let notify: LinuxSeccomp =
            serde_json::from_str(r#"{"defaultAction": "SCMP_ACT_NOTIFY"}"#).unwrap();
        assert!(build(&notify).is_err());
    }

    #[test]
    fn filter_really_applies_in_a_child() {
        let s: LinuxSeccomp = serde_json::from_str(
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 95}]}"#,
        )
        .unwrap();
        // SAFETY: the child only makes syscalls and exits.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                // SAFETY: prctl with integer arguments.
                unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
                let code = match load(&s) {
                    Ok(()) => {
                        // SAFETY: a raw getppid(2): no arguments, no memory effects.
                        let r = unsafe { libc::syscall(libc::SYS_getppid) };
                        let e = std::io::Error::last_os_error().raw_os_error();
                        if r == -1 && e == Some(95) {
                            1
                        } else {
                            3
                        }
                    }
                    Err(_) => 2,
                };
                // SAFETY: ending the forked child without running parent destructors.
                unsafe { libc::_exit(code) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                let st = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(st, nix::sys::wait::WaitStatus::Exited(child, 1));
            }
        }
    }
}
