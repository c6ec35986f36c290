//! Cleanup on every exit path: a panic hook and SIGINT/SIGTERM handling that remove this
//! process's namespaces, links, rules and processes. (Normal exits clean up through
//! [`crate::net::Network`]'s `Drop`; a SIGKILLed harness leaves names that `jepsen-tests
//! cleanup` finds by prefix.)

use std::sync::Mutex;
use std::sync::Once;

use tokio_util::sync::CancellationToken;

/// Prefixes to remove if the process dies abnormally. Locked only for short, non-async work.
static PREFIXES: Mutex<Vec<String>> = Mutex::new(Vec::new());
static HOOK: Once = Once::new();

/// Remembers `prefix` for the panic hook and signal handler.
pub fn register(prefix: &str) {
    let mut p = PREFIXES.lock().unwrap_or_else(|e| e.into_inner());
    if !p.iter().any(|x| x == prefix) {
        p.push(prefix.to_string());
    }
}

/// Removes everything under every registered prefix.
pub fn cleanup_registered() {
    let prefixes = PREFIXES.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for prefix in prefixes {
        if let Err(e) = crate::net::cleanup_prefix(&prefix) {
            eprintln!("jepsen-tests: cleanup of {prefix}: {e:#}");
        }
    }
}

/// Installs a panic hook that cleans up before the default report.
pub fn install_panic_hook() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            eprintln!("jepsen-tests: panic; removing namespaces and processes");
            cleanup_registered();
            previous(info);
        }));
    });
}

/// Cancels `token` on the first SIGINT or SIGTERM (the run stops, heals and cleans up in
/// order); on a second signal, cleans up at once and exits 130.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::SignalKind;
        use tokio::signal::unix::signal;
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            eprintln!("jepsen-tests: cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        eprintln!(
            "jepsen-tests: signal received; stopping the run and cleaning up (again to force)"
        );
        token.cancel();
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        eprintln!("jepsen-tests: second signal; cleaning up now");
        cleanup_registered();
        std::process::exit(130);
    });
}
