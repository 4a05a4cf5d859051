//! Shared by the lab tests that run `agent run` with `[postgres]`
//! (`lab_pgha`, `lab_pg_failover`).

use std::{path::Path, process::Stdio};

use xtask::lab::{Lab, LabProcess, CLIENT};

const AGENT: &str = env!("CARGO_BIN_EXE_agent");

/// `agent run` on `node` (no supervised children), its log in `dir`.
pub(crate) fn spawn_agent(lab: &Lab, node: &str, config: &Path, dir: &Path) -> LabProcess {
    let log = std::fs::File::create(dir.join(format!("agent-{node}.log"))).unwrap();
    let mut agent = lab.command(node, AGENT);
    agent
        .args(["run", "--no-supervise", "--node", node, "--config"])
        .arg(config)
        .arg("--pin-dir")
        .arg(lab.pin_dir(node))
        .env("FAROL_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log);
    lab.spawn(node, &mut agent, "agent").unwrap()
}

/// GET from the client within `max_seconds`: the HTTP status (0: no answer).
pub(crate) fn status_code(lab: &Lab, url: &str, max_seconds: u32) -> u16 {
    let out = lab
        .run(
            CLIENT,
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "--max-time",
                &max_seconds.to_string(),
                "-w",
                "%{http_code}",
                url,
            ],
        )
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}
