//! The signal that asks a process to stop: SIGTERM (what Kubernetes and
//! systemd send) or SIGINT (Ctrl-C). Not here: what stopping means — the
//! sidecar drains, the control plane closes its listeners.

/// Resolves at the next SIGTERM or SIGINT. When SIGTERM cannot be watched,
/// SIGINT alone.
pub async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn waits_for_sigterm() {
        use tokio::signal::unix::{SignalKind, signal};
        // Installs tokio's SIGTERM handler for the whole test process first,
        // so the signal below can never end it.
        let _handler = signal(SignalKind::terminate()).unwrap();
        let stop = tokio::spawn(stop_signal());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!stop.is_finished(), "no signal was sent yet");
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        tokio::time::timeout(Duration::from_secs(5), stop)
            .await
            .expect("stop_signal returns on SIGTERM")
            .unwrap();
    }
}
