//! The gateway driven from a second gRPC stack: Python grpcio, with stubs
//! generated at run time from `proto/` (tests/python/gateway_client.py), over
//! mutual TLS with the cluster's client certificate. The interpreter comes
//! from `STRIFE_TEST_PYTHON`, which `scripts/test` sets to the virtual
//! environment it installs (tests/python/requirements.txt).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Upper bound for the Python program (interpreter start, stub generation
/// and every check).
const PYTHON_RUN_MAX: Duration = Duration::from_secs(300);

fn python() -> PathBuf {
    match std::env::var_os("STRIFE_TEST_PYTHON") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => panic!(
            "STRIFE_TEST_PYTHON is not set. This test runs tests/python/gateway_client.py with a Python \
             that has grpcio and its companions: run `scripts/test`, which installs them into \
             target/tools/venv and sets STRIFE_TEST_PYTHON (or point STRIFE_TEST_PYTHON at a Python with \
             crates/strife/tests/python/requirements.txt installed)"
        ),
    }
}

/// Runs the Python program to its end (within `PYTHON_RUN_MAX`); returns its
/// exit code (None when killed) and its output, stdout and stderr together.
fn run_python(python: &Path, dir: &Path, gateway: &str) -> (Option<i32>, String) {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out_path = dir.join("python.out");
    let out = std::fs::File::create(&out_path).expect("python.out");
    let mut child = Command::new(python)
        .arg(manifest.join("tests/python/gateway_client.py"))
        .arg(dir)
        .arg(gateway)
        .arg("--proto")
        .arg(manifest.join("../../proto"))
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("python.out"))
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run STRIFE_TEST_PYTHON={}: {e}", python.display()));
    let deadline = Instant::now() + PYTHON_RUN_MAX;
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (code, std::fs::read_to_string(&out_path).unwrap_or_default())
}

#[test]
fn python_grpcio_client_drives_the_gateway() {
    let python = python();
    let dir = TempDir::new("python");
    let (child, ready, _lines) = spawn_until(&dir.0, &["up", "--port", "0"], "strife: ready", &[]);
    let up = Up(child);
    let gateway =
        ready.split_whitespace().find_map(|w| w.strip_prefix("gateway=")).expect("gateway=").to_owned();

    let (code, output) = run_python(&python, &dir.0, &gateway);
    drop(up);
    let ended = match code {
        Some(code) => format!("exit {code}"),
        None => format!("killed after {PYTHON_RUN_MAX:?}"),
    };
    assert!(code == Some(0), "gateway_client.py failed ({ended}); its output:\n{output}");
    assert!(output.contains("all checks passed"), "{output}");
}
