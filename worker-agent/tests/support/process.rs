//! A `drover-agent` binary under test, signalled by its pid (never by name).

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A `drover-agent` process. Killed (SIGKILL) when dropped; its log is printed when the test
/// is failing.
pub struct AgentProcess {
    pub(super) child: tokio::process::Child,
    pub(super) log: PathBuf,
}

impl AgentProcess {
    fn pid(&self) -> Pid {
        let pid = self.child.id().expect("the agent process is still running");
        Pid::from_raw(i32::try_from(pid).expect("pid fits"))
    }

    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("signal the agent by pid");
    }

    /// `kill -9`, and reap it.
    pub async fn kill9(mut self) {
        self.signal(Signal::SIGKILL);
        let _ = self.child.wait().await;
    }

    /// Waits for it to exit by itself.
    pub async fn exit_status(&mut self, limit: Duration) -> ExitStatus {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status.expect("wait for the agent"),
            Err(_) => {
                self.dump_log();
                panic!("drover-agent did not exit within {limit:?}");
            }
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn dump_log(&self) {
        eprintln!(
            "----- {} -----\n{}\n-----",
            self.log.display(),
            self.log_text()
        );
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_log();
        }
    }
}
