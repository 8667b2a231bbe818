//! Signal handling: the first SIGINT/SIGTERM cancels the root token (graceful shutdown), a
//! second one exits at once.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Spawns the signal watcher. Returns an error if signal handlers cannot be installed.
pub fn cancel_on_signals(token: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::info!("shutdown requested; send the signal again to exit at once");
        token.cancel();
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::warn!("second signal: exiting now");
        #[allow(
            clippy::disallowed_methods,
            reason = "the second signal asks to skip shutdown"
        )]
        std::process::exit(130);
    });
    Ok(())
}
