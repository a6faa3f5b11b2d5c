//! Logging setup shared by the binaries: `tracing` with an `EnvFilter`
//! (`NIXQ_LOG`, else `RUST_LOG`, else the given default) on stderr, as text
//! or as one JSON object per line.

use std::str::FromStr;

use tracing_subscriber::{fmt, EnvFilter};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown log format '{other}' (expected 'text' or 'json')"
            )),
        }
    }
}

/// Install the global subscriber. `default_directive` applies when neither
/// `NIXQ_LOG` nor `RUST_LOG` is set (e.g. `"info"`). Calling it twice is
/// harmless (the second call does nothing).
pub fn init(format: LogFormat, default_directive: &str) {
    let filter = std::env::var("NIXQ_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok()
        .and_then(|s| EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| EnvFilter::new(default_directive));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
    };
}
