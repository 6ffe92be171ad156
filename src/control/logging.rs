//! Logging: installs the global tracing subscriber per `[log]` and changes its
//! level later (config reload), without a restart.

use crate::config::{LogConfig, LogFormat};
use std::sync::OnceLock;

type LevelSetter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;
static LEVEL: OnceLock<LevelSetter> = OnceLock::new();

/// Installs the global tracing subscriber per `[log]`; its level can later be
/// changed by [`set_log_level`].
pub fn init_logging(log: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::new(&log.level);
    // Colours only on a terminal: log files and collectors get plain text.
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_thread_names(true);
    match log.format {
        LogFormat::Otel => {
            let resource = crate::otel_log::Resource::of(log);
            crate::otel_log::install(resource.clone());
            let b =
                builder.with_ansi(false).event_format(crate::otel_log::OtelFormat { resource }).with_filter_reloading();
            let h = b.reload_handle();
            if b.try_init().is_ok() {
                let _ = LEVEL
                    .set(Box::new(move |l| h.reload(tracing_subscriber::EnvFilter::new(l)).map_err(|e| e.to_string())));
            }
        }
        LogFormat::Json => {
            let b = builder.json().flatten_event(true).with_filter_reloading();
            let h = b.reload_handle();
            if b.try_init().is_ok() {
                let _ = LEVEL
                    .set(Box::new(move |l| h.reload(tracing_subscriber::EnvFilter::new(l)).map_err(|e| e.to_string())));
            }
        }
        LogFormat::Text => {
            let b = builder.with_filter_reloading();
            let h = b.reload_handle();
            if b.try_init().is_ok() {
                let _ = LEVEL
                    .set(Box::new(move |l| h.reload(tracing_subscriber::EnvFilter::new(l)).map_err(|e| e.to_string())));
            }
        }
    }
}

/// Changes the level of the subscriber [`init_logging`] installed (a no-op
/// when none was).
pub(crate) fn set_log_level(level: &str) {
    if let Some(f) = LEVEL.get() {
        if let Err(e) = f(level) {
            tracing::warn!(error = %e, "log level not changed");
        }
    }
}
