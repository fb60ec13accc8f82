//! Process logging: `tracing` to stderr, as text or as JSON lines
//! (`DEADBOLT_LOG_FORMAT=json`, the default in the container image), with
//! no ANSI colour codes unless stderr is a terminal. A job's lines carry its
//! `run_id`, `job_id`, `stage` and `attempt` (the worker's span).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The log format: `text` (default) or `json`.
pub fn format_from_env() -> &'static str {
    match std::env::var("DEADBOLT_LOG_FORMAT").ok().as_deref() {
        Some("json") => "json",
        _ => "text",
    }
}

/// Installs the subscriber; `RUST_LOG` overrides `default_filter`.
pub fn init(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format_from_env() == "json" {
        builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}
