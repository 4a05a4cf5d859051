//! Apache in the lab, run by the agents from `configs/lab.toml`'s
//! `[[supervise]]` entry with `configs/apache/farol.conf`. Each lab gets its
//! own copy of both with every path moved under one directory, so labs run
//! side by side, and each node's document root gets an `index.html` naming
//! the node.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::{lab::lab_config, workspace_root};

/// The shipped Apache config, the same for every node.
pub fn apache_config() -> PathBuf {
    workspace_root().join("configs/apache/farol.conf")
}

/// Paths of one lab's Apache set-up under its directory.
#[derive(Debug, Clone)]
pub struct LabApache {
    /// The cluster file to give `agent run`.
    pub cluster_file: PathBuf,
    /// The Apache config every node's Apache reads (tests break it).
    pub apache_conf: PathBuf,
    pub dir: PathBuf,
}

impl LabApache {
    /// Node `node`'s document root.
    pub fn document_root(&self, node: &str) -> PathBuf {
        self.dir.join(node).join("www")
    }

    /// Node `node`'s runtime directory (`apache2.pid` is there).
    pub fn runtime_dir(&self, node: &str) -> PathBuf {
        self.dir.join("run").join(node).join("apache")
    }

    /// The PID of the Apache parent on `node`, from its pid file.
    pub fn pid(&self, node: &str) -> Option<u32> {
        std::fs::read_to_string(self.runtime_dir(node).join("apache2.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

/// Writes `dir/lab.toml` (the lab's cluster file with Apache's paths under
/// `dir`; `edit` may change its text further) and `dir/farol.conf`, and
/// a document root with an `index.html` per node in `nodes`.
pub fn lab_apache(
    dir: &Path,
    nodes: &[String],
    edit: impl FnOnce(String) -> String,
) -> Result<LabApache> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let apache_conf = dir.join("farol.conf");
    std::fs::copy(apache_config(), &apache_conf)
        .with_context(|| format!("copying {}", apache_config().display()))?;
    let text = std::fs::read_to_string(lab_config())?
        .replace(
            "/etc/farol/apache/farol.conf",
            &apache_conf.to_string_lossy(),
        )
        .replace(
            "/run/farol-lab/",
            &format!("{}/", dir.join("run").display()),
        )
        .replace("/var/lib/farol-lab/", &format!("{}/", dir.display()));
    let cluster_file = dir.join("lab.toml");
    std::fs::write(&cluster_file, edit(text))?;
    let setup = LabApache {
        cluster_file,
        apache_conf,
        dir: dir.to_owned(),
    };
    for node in nodes {
        let root = setup.document_root(node);
        std::fs::create_dir_all(&root)?;
        std::fs::write(root.join("index.html"), format!("{node}\n"))?;
    }
    Ok(setup)
}
