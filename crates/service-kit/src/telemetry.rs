//! Tracing set-up: pretty logs for people, JSON lines for log shippers, both on stderr.

use tracing_subscriber::EnvFilter;

use crate::config::{ConfigError, LogArgs, LogFormat};

/// Installs the global subscriber. Safe to call twice (tests build several apps in one process):
/// the second call keeps the first subscriber.
pub fn init(args: &LogArgs) -> Result<(), ConfigError> {
    let filter = EnvFilter::try_new(&args.log_level)
        .map_err(|err| ConfigError::new("LOG_LEVEL", err.to_string()))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match args.log_format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    Ok(())
}
