//! Ctrl-C / SIGTERM handling for long-running checks: while an
//! [`InterruptGuard`] lives, SIGINT and SIGTERM only set a flag (so the
//! benchmark can stop between writes and remove its file); dropping the guard
//! restores the previous handlers.

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// True once SIGINT/SIGTERM arrived while a guard was installed (reset by the next install).
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Installs flag-setting handlers for SIGINT and SIGTERM; restores the old ones on drop.
pub struct InterruptGuard {
    old_int: SigAction,
    old_term: SigAction,
}

impl InterruptGuard {
    pub fn install() -> nix::Result<Self> {
        INTERRUPTED.store(false, Ordering::SeqCst);
        let act = SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART, SigSet::empty());
        // SAFETY: the handler only performs an atomic store.
        let old_int = unsafe { sigaction(Signal::SIGINT, &act)? };
        let old_term = match unsafe { sigaction(Signal::SIGTERM, &act) } {
            Ok(o) => o,
            Err(e) => {
                // SAFETY: restoring the action we just replaced.
                let _ = unsafe { sigaction(Signal::SIGINT, &old_int) };
                return Err(e);
            }
        };
        Ok(Self { old_int, old_term })
    }

    /// The flag the handlers set.
    pub fn flag(&self) -> &'static AtomicBool {
        &INTERRUPTED
    }
}

impl Drop for InterruptGuard {
    fn drop(&mut self) {
        // SAFETY: restoring the actions that were installed before us.
        unsafe {
            let _ = sigaction(Signal::SIGINT, &self.old_int);
            let _ = sigaction(Signal::SIGTERM, &self.old_term);
        }
    }
}
