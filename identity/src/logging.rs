//! Logging of the `ca-node` and `agent` processes: to stderr, filtered by the config's
//! `log_level` (or `RUST_LOG`), as text (colour codes only on a terminal) or as one JSON
//! object per line (`--log-format json`, for log shippers). openraft's own INFO lines are
//! demoted to warnings unless the filter names `openraft`.

/// How log lines are written.
pub const LOG_FORMATS: [&str; 2] = ["text", "json"];

/// Installs the process's logger: `filter` (e.g. `info`, `ca_node=debug`) unless `RUST_LOG`
/// is set, in `format` (`text` or `json`). Later calls change nothing.
pub fn init(filter: &str, format: &str) {
    let filter = effective_filter(filter);
    let env = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let base = tracing_subscriber::fmt()
        .with_env_filter(env)
        .with_writer(std::io::stderr);
    let _ = if format == "json" {
        base.json().with_current_span(false).try_init()
    } else {
        base.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init()
    };
}

/// `filter`, with openraft's chatter at warnings unless it says otherwise.
pub fn effective_filter(filter: &str) -> String {
    if filter.contains("openraft") {
        filter.to_owned()
    } else {
        format!("{filter},openraft=warn")
    }
}

#[cfg(test)]
mod tests {
    use super::effective_filter;

    #[test]
    fn openraft_is_demoted_unless_named() {
        assert_eq!(effective_filter("info"), "info,openraft=warn");
        assert_eq!(
            effective_filter("debug,openraft=info"),
            "debug,openraft=info"
        );
    }
}
