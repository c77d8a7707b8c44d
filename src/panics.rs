//! The process's panic hook, and the panic strategy it relies on.
//!
//! Router renewal frees a retired rumqttd router by letting its thread
//! panic and unwind (`axion_broker::router::RouterHandle::retire`): rumqttd
//! offers no other way to stop it. That panic is expected and must not show
//! on stderr as if something broke, so the hook drops it and hands every
//! other panic to the default hook. A panic hook belongs to the whole
//! process, so the binary installs it; the broker only says which panic is
//! the expected one.

// With `panic = "abort"` the first renewal would end the whole process
// instead of one router thread.
#[cfg(not(panic = "unwind"))]
compile_error!(
    "axion must be built with panic = \"unwind\": router renewal ends a retired router by unwinding its thread"
);

/// Installs the hook; call once, before any broker starts.
pub fn install() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if axion_broker::router::is_retired_router_end(info) {
            tracing::debug!("retired router thread ended");
            return;
        }
        previous(info);
    }));
}
