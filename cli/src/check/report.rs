//! The report `janus check` builds: one line per check, as text while it runs (the test boot
//! takes seconds) or as one JSON document at the end (`--json`).

use std::process::ExitCode;

use serde::Serialize;

#[derive(Debug, PartialEq, Eq, Clone, Copy, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

/// One check and its outcome. Every non-ok check carries the fix.
#[derive(Debug, Serialize)]
pub struct Check {
    pub level: Level,
    pub what: String,
    pub detail: String,
    pub fix: Option<String>,
    /// Only VM mode needs what this check is about (namespace readiness ignores it).
    #[serde(skip)]
    pub vm: bool,
}

#[derive(Serialize)]
struct Document<'a> {
    ok: bool,
    namespace_ready: bool,
    vm_ready: bool,
    checks: &'a [Check],
}

pub struct Report {
    checks: Vec<Check>,
    json: bool,
    /// Set while the checks being made are about VM mode only.
    pub vm: bool,
}

impl Report {
    pub fn new(json: bool) -> Report {
        Report {
            checks: Vec::new(),
            json,
            vm: false,
        }
    }

    pub fn ok(&mut self, what: &str, detail: impl Into<String>) {
        self.push(Level::Ok, what, detail.into(), None);
    }

    pub fn warn(&mut self, what: &str, detail: impl Into<String>, fix: impl Into<String>) {
        self.push(Level::Warn, what, detail.into(), Some(fix.into()));
    }

    pub fn fail(&mut self, what: &str, detail: impl Into<String>, fix: impl Into<String>) {
        self.push(Level::Fail, what, detail.into(), Some(fix.into()));
    }

    /// A problem that fails the check where what it concerns is `required`, and is a warning
    /// otherwise (e.g. VM prerequisites on a node that runs no VM pods).
    pub fn problem(
        &mut self,
        required: bool,
        what: &str,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) {
        let level = if required { Level::Fail } else { Level::Warn };
        self.push(level, what, detail.into(), Some(fix.into()));
    }

    fn push(&mut self, level: Level, what: &str, detail: String, fix: Option<String>) {
        let check = Check {
            level,
            what: what.to_string(),
            detail,
            fix,
            vm: self.vm,
        };
        if !self.json {
            println!("{}", text_line(&check));
        }
        self.checks.push(check);
    }

    pub fn failed(&self) -> bool {
        self.checks.iter().any(|c| c.level == Level::Fail)
    }

    /// No failure in what namespace mode needs.
    pub fn namespace_ready(&self) -> bool {
        !self.checks.iter().any(|c| !c.vm && c.level == Level::Fail)
    }

    /// Namespace mode ready, and every VM check ok. `booted`: the test VM came up.
    fn vm_ready(&self, booted: bool) -> bool {
        booted
            && self.namespace_ready()
            && self.checks.iter().all(|c| !c.vm || c.level == Level::Ok)
    }

    /// Prints the summary (text) or the document (JSON); exit code 1 when a check failed.
    pub fn finish(self, booted: bool) -> ExitCode {
        let (ok, vm_ready) = (!self.failed(), self.vm_ready(booted));
        if self.json {
            let doc = Document {
                ok,
                namespace_ready: self.namespace_ready(),
                vm_ready,
                checks: &self.checks,
            };
            match serde_json::to_string_pretty(&doc) {
                Ok(s) => println!("{s}"),
                Err(e) => {
                    // Strings and bools only: this cannot happen, but never print half a
                    // document.
                    eprintln!("janus check: JSON output: {e}");
                    return ExitCode::from(1);
                }
            }
        } else {
            println!();
            println!(
                "janus check: {}",
                summary(ok, self.namespace_ready(), vm_ready)
            );
        }
        if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }
    }
}

fn summary(ok: bool, namespace_ready: bool, vm_ready: bool) -> &'static str {
    match (ok, namespace_ready, vm_ready) {
        (false, true, _) => "problems found (see FAIL lines); namespace mode would work",
        (false, false, _) => "problems found (see FAIL lines)",
        (true, _, true) => "ready for namespace mode and VM mode",
        (true, _, false) => "ready for namespace mode (VM mode: see the warnings)",
    }
}

fn text_line(c: &Check) -> String {
    let tag = match c.level {
        Level::Ok => "ok  ",
        Level::Warn => "warn",
        Level::Fail => "FAIL",
    };
    let mut line = format!("[{tag}] {:<22} {}", c.what, c.detail);
    if let Some(fix) = &c.fix {
        line.push_str("; fix: ");
        line.push_str(fix);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_and_exit() {
        let mut r = Report::new(true);
        r.ok("privileges", "root");
        r.vm = true;
        r.warn("qemu", "not found", "apt-get install qemu-system-x86");
        assert!(!r.failed() && r.namespace_ready() && !r.vm_ready(true));
        r.fail("guest image", "missing", "run hack/build-guest.sh");
        assert!(r.failed() && r.namespace_ready());
        r.vm = false;
        r.fail("config", "bad", "edit it");
        assert!(!r.namespace_ready());
    }

    #[test]
    fn vm_ready_needs_the_boot() {
        let mut r = Report::new(true);
        r.ok("privileges", "root");
        r.vm = true;
        r.ok("qemu", "/usr/bin/qemu-system-x86_64");
        assert!(r.vm_ready(true) && !r.vm_ready(false));
    }

    #[test]
    fn json_shape() {
        let c = Check {
            level: Level::Fail,
            what: "config".into(),
            detail: "x".into(),
            fix: None,
            vm: true,
        };
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"level": "fail", "what": "config", "detail": "x", "fix": null})
        );
        assert_eq!(
            text_line(&Check {
                fix: Some("do y".into()),
                ..c
            }),
            format!("[FAIL] {:<22} x; fix: do y", "config")
        );
    }
}
