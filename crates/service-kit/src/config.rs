//! How settings are read, for every binary (each concept declares its own beside it: `http::HttpArgs`, `redis::RedisArgs`, `telemetry::LogArgs`, and in their crates the token, event log, database and persisted query settings). Each is a clap argument that can also come from the environment,
//! so `--help` documents every variable. A malformed or missing setting ends the process with one
//! line that names it and exit code 2; nothing here panics.

use std::fmt;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::Parser;

/// A setting that was present but unusable (or absent where it is required), found after clap has
/// parsed the arguments. `setting` is the environment variable name, which is what operators set.
#[derive(Debug)]
pub struct ConfigError {
    pub setting: &'static str,
    pub message: String,
}

impl ConfigError {
    pub fn new(setting: &'static str, message: impl Into<String>) -> Self {
        Self {
            setting,
            message: message.into(),
        }
    }

    /// Prints the one-line error and exits with status 2, the convention for usage errors.
    pub fn exit(&self) -> ! {
        eprintln!("error: {self}");
        std::process::exit(2)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration {}: {}",
            self.setting, self.message
        )
    }
}

impl std::error::Error for ConfigError {}

/// Parses the command line, printing `--help`/`--version` normally but any error as a single line
/// (clap's own format spans several lines and hides which environment variable was at fault).
pub fn parse_or_exit<T: Parser>() -> T {
    match T::try_parse() {
        Ok(parsed) => parsed,
        Err(err) => match err.kind() {
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => err.exit(),
            _ => {
                eprintln!("error: {}", one_line_clap_error(&err, &T::command()));
                std::process::exit(2)
            }
        },
    }
}

/// Clap's error as one line that names the environment variable at fault.
pub fn one_line_clap_error(err: &clap::Error, command: &clap::Command) -> String {
    let rendered = err.render().to_string();
    let first_line = rendered
        .lines()
        .next()
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ")
        .trim_end_matches(':')
        .to_owned();
    match err.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) => match arg_env_name(arg, command) {
            Some(env) => format!("{first_line} (environment variable {env})"),
            None => first_line,
        },
        // Missing required arguments: clap lists them on the following lines.
        Some(ContextValue::Strings(args)) => {
            let named: Vec<String> = args
                .iter()
                .map(|arg| match arg_env_name(arg, command) {
                    Some(env) => format!("{arg} (environment variable {env})"),
                    None => arg.clone(),
                })
                .collect();
            format!("{first_line}: {}", named.join(", "))
        }
        _ => first_line,
    }
}

// Flags are documented with their environment variable in `--help`; the error line repeats it
// because in containers the variable, not the flag, is what an operator set.
fn arg_env_name(arg: &str, command: &clap::Command) -> Option<String> {
    let flag = arg.split_whitespace().next()?.trim_start_matches('-');
    if flag.is_empty() {
        return None;
    }
    // The variable the argument really reads (the embedded binary's differ from the flag's
    // name); by convention the flag's name in capitals otherwise.
    let declared = command
        .get_arguments()
        .find(|candidate| candidate.get_long() == Some(flag))
        .and_then(|candidate| candidate.get_env())
        .map(|env| env.to_string_lossy().into_owned());
    Some(declared.unwrap_or_else(|| flag.replace('-', "_").to_ascii_uppercase()))
}
