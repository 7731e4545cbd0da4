//! Finds the test control plane: reuses the one `scripts/test.sh` started (its kubeconfig path is in
//! `QUANTFLEET_KUBECONFIG`), or starts `tests/controlplane/launch.sh` once for this test process. The launcher
//! watches this process and tears the control plane down within a second or two after it exits, however it exits
//! (a failed test, a panic, a kill), so nothing is left running.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::Error;

/// Environment variable holding the kubeconfig of an already running test control plane.
pub const KUBECONFIG_ENV: &str = "QUANTFLEET_KUBECONFIG";

/// How long a warm start may take (measured around 10 s on 2 busy cores; generous for loaded CI machines).
const START_TIMEOUT: Duration = Duration::from_secs(240);

/// The line the launcher prints on stdout once the control plane is ready.
const READY_PREFIX: &str = "QUANTFLEET_KUBECONFIG=";

/// A running control plane this process can use.
#[derive(Debug)]
pub struct ControlPlane {
    kubeconfig: PathBuf,
    /// The launcher, when this process started it; it lives as long as the process.
    launcher: Option<Mutex<Child>>,
}

impl ControlPlane {
    /// Path of the admin kubeconfig (client certificate in `system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Whether this process started the control plane (rather than reusing one).
    pub fn started_here(&self) -> bool {
        self.launcher.is_some()
    }

    /// A new client for the control plane. Each `#[tokio::test]` has its own runtime, so each test takes its own.
    pub async fn client(&self) -> Result<kube::Client, Error> {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    /// The admin client configuration, for tests that connect as another identity (replace `auth_info`).
    pub async fn config(&self) -> Result<kube::Config, Error> {
        config_from_kubeconfig(&self.kubeconfig).await
    }
}

/// Reads a kubeconfig file into a client configuration (its current context).
pub async fn config_from_kubeconfig(path: &Path) -> Result<kube::Config, Error> {
    let kubeconfig_error = |source| Error::Kubeconfig { path: path.to_path_buf(), source };
    let kubeconfig = Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.map_err(kubeconfig_error)
}

/// Builds a client from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client, Error> {
    let config = config_from_kubeconfig(path).await?;
    kube::Client::try_from(config).map_err(Error::kube("building a client"))
}

/// The control plane of this process: reused from `QUANTFLEET_KUBECONFIG` or started on first use.
/// A failure is remembered, so every test reports it rather than retrying a slow start.
pub fn control_plane() -> Result<&'static ControlPlane, Error> {
    static CONTROL_PLANE: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
    CONTROL_PLANE
        .get_or_init(|| start_or_reuse().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|message| Error::ControlPlane(message.clone()))
}

fn start_or_reuse() -> Result<ControlPlane, Error> {
    if let Some(path) = std::env::var_os(KUBECONFIG_ENV).filter(|p| !p.is_empty()) {
        let kubeconfig = PathBuf::from(path);
        if !kubeconfig.is_file() {
            return Err(Error::ControlPlane(format!(
                "{KUBECONFIG_ENV}={} does not name a file; is the control plane that wrote it still running?",
                kubeconfig.display()
            )));
        }
        return Ok(ControlPlane { kubeconfig, launcher: None });
    }
    start_launcher(&repo_root().join("tests/controlplane/launch.sh"))
}

fn repo_root() -> PathBuf {
    // crates/quantfleet-testsupport -> repository root
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn start_launcher(script: &Path) -> Result<ControlPlane, Error> {
    let hint = "build the binaries once with tests/controlplane/build.sh (scripts/test.sh does this and starts \
                the control plane for the whole run), or export QUANTFLEET_KUBECONFIG with the kubeconfig of a \
                running one";
    let mut child = Command::new("bash")
        .arg(script)
        .arg("--watch-pid")
        .arg(std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| Error::ControlPlane(format!("cannot run {}: {e}; {hint}", script.display())))?;
    let Some(stdout) = child.stdout.take() else {
        let _ = child.kill();
        return Err(Error::ControlPlane("the launcher's stdout was not captured".into()));
    };

    // Read on a helper thread so the wait can time out even if the launcher hangs.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(path) = line.strip_prefix(READY_PREFIX) {
                let _ = tx.send(PathBuf::from(path));
                return;
            }
        }
    });
    match rx.recv_timeout(START_TIMEOUT) {
        Ok(kubeconfig) => Ok(ControlPlane { kubeconfig, launcher: Some(Mutex::new(child)) }),
        Err(error) => {
            let what = match error {
                mpsc::RecvTimeoutError::Timeout => format!("was not ready within {}s", START_TIMEOUT.as_secs()),
                mpsc::RecvTimeoutError::Disconnected => "stopped before the control plane was ready".to_string(),
            };
            let _ = child.kill();
            let status = child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
            Err(Error::ControlPlane(format!(
                "{} {what} (launcher {status}; its log is above); {hint}",
                script.display()
            )))
        }
    }
}
