//! System components some tests drive for real (nft, ip, tmux, prlimit, ...). A test that needs
//! one asks [`require`] first: where it is missing the test says which component and how to
//! install it, then returns early (a skip); under CI (`CI=true`) it fails instead, so CI always
//! runs everything. [`require_root`] does the same for tests that only root can run.

use std::io::Write;

/// Whether this is a CI run: `CI` set to anything but empty, `0` or `false` (CI services set
/// `CI=true`; `.ci/run` exports it).
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// Whether the program `component` is on `PATH`. When it is not, says so (with `install`, the
/// way to get it) and returns `false`, for the caller to return early; under CI it panics.
#[must_use = "return from the test when the component is missing"]
pub fn require(component: &str, install: &str) -> bool {
    if on_path(component) {
        return true;
    }
    skip(&format!(
        "needs `{component}`, which is not on PATH nor in an sbin directory (install: {install})"
    ))
}

/// Like [`require`] for root: `why` says what the test does that only root may.
#[must_use = "return from the test when not root"]
pub fn require_root(why: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    skip(&format!("needs root to {why} (run the tests as root)"))
}

/// The test's own name, from its thread (libtest names each test's thread after it).
fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned()
}

/// Panics under CI; elsewhere prints the reason past the test harness's output capture (so it
/// shows in a plain `cargo test`) and returns `false`.
fn skip(reason: &str) -> bool {
    let test = test_name();
    assert!(
        !ci(),
        "{test} {reason}; CI must run every test, so this is a failure under CI=true"
    );
    // Straight to the process's stderr: `eprintln!` would be captured and hidden for a test
    // that passes, and a skip must be seen.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
    false
}

/// Directories searched after `PATH`: system programs (nats-server, nft, ip) live in the sbin
/// directories, which a non-login or non-root `PATH` often lacks.
const SBIN: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// Whether an executable file named `program` is in a `PATH` directory or an sbin directory.
fn on_path(program: &str) -> bool {
    program_path(program).is_some()
}

/// Where the executable `program` is: the first `PATH` directory that has it, else the first
/// sbin directory that has it.
pub fn program_path(program: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN.iter().map(std::path::PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}
