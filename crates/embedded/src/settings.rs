//! The `gqlws` command line. Its own settings are few (where the database is, where to listen);
//! every other setting of the three services (JWT_*, MAX_*, KEEPALIVE_SECS, …) is read from the
//! environment exactly as the services read it, with demo mode on.

use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand};
use service_kit::config::ConfigError;
use service_kit::telemetry::LogArgs;

/// The default database: a file under `./data/`, created on first start.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://./data/gqlws.db";

#[derive(Debug, Parser)]
#[command(
    name = "gqlws",
    version,
    args_override_self = true,
    about = "The whole stack in one process: auth, GraphQL API and subscription gateway on one \
             port, on SQLite and an in-memory event bus (demo mode)."
)]
pub struct Cli {
    #[command(flatten)]
    pub settings: Settings,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve (the default).
    Serve,
    /// The reference's `trigger_event.py`: give a car a random make. Commits to the database;
    /// the running server's outbox relay publishes the event to its subscribers.
    TriggerEvent {
        /// The car.
        #[arg(long, default_value_t = 1)]
        pk: i64,
    },
    /// Create a user (as auth-service's `create-user`), e.g. a second user to try private cars.
    CreateUser {
        #[arg(long)]
        username: String,
        /// Read the password from the first line of standard input; otherwise a random one is
        /// generated and printed once.
        #[arg(long)]
        password_stdin: bool,
        /// Make the user staff (may read and change any car).
        #[arg(long)]
        staff: bool,
        /// Reset the password (and staff flag) when the user exists instead of failing; its
        /// access tokens are revoked.
        #[arg(long)]
        update: bool,
    },
    /// Deactivate a user: no more logins or refreshes, and every access token already issued is
    /// refused (the running server learns it through its outbox relay, within
    /// OUTBOX_RELAY_INTERVAL_MS).
    DeactivateUser {
        #[arg(long)]
        username: String,
    },
}

#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Database URL: an SQLite file (`sqlite://path`), or a PostgreSQL URL. The directory of an
    /// SQLite file is created when missing.
    #[arg(long, env = "GQLWS_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,
    /// Address to listen on, for every route (as NGINX's :8000 in the distributed stack).
    #[arg(long, env = "GQLWS_LISTEN_ADDR", default_value = "127.0.0.1:8000")]
    pub listen_addr: SocketAddr,
    /// Milliseconds between passes of the outbox relay, which publishes events that another
    /// process (`gqlws trigger-event`) committed.
    #[arg(long, env = "OUTBOX_RELAY_INTERVAL_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..))]
    pub outbox_relay_interval_ms: u64,
    #[command(flatten)]
    pub log: LogArgs,
}

/// The three services' settings, each parsed by the service's own parser (so every environment
/// variable means what it means there), with the database, demo mode and relay timing from here.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    pub auth: auth_service::settings::Settings,
    pub api: api_service::settings::Settings,
    pub gateway: subscription_gateway::settings::Settings,
}

impl Settings {
    pub fn services(&self) -> Result<ServiceSettings, ConfigError> {
        let common_args = [
            format!("--listen-addr={}", self.listen_addr),
            "--demo=true".to_owned(),
        ];
        let database = [
            format!("--database-url={}", self.database_url),
            "--migrate=false".to_owned(),
        ];
        let auth = auth_service::settings::Cli::try_parse_from(
            std::iter::once("auth-service".to_owned())
                .chain(common_args.clone())
                .chain(database.clone()),
        )
        .map_err(|err| clap_error::<auth_service::settings::Cli>("auth-service", &err))?;
        let api = api_service::settings::Cli::try_parse_from(
            std::iter::once("api-service".to_owned())
                .chain(common_args.clone())
                .chain(database)
                .chain([format!(
                    "--outbox-relay-interval-ms={}",
                    self.outbox_relay_interval_ms
                )]),
        )
        .map_err(|err| clap_error::<api_service::settings::Cli>("api-service", &err))?;
        let gateway = subscription_gateway::settings::Cli::try_parse_from(
            std::iter::once("subscription-gateway".to_owned()).chain(common_args),
        )
        .map_err(|err| {
            clap_error::<subscription_gateway::settings::Cli>("subscription-gateway", &err)
        })?;
        Ok(ServiceSettings {
            auth: auth.settings,
            api: api.settings,
            gateway: gateway.settings,
        })
    }
}

/// A bad environment variable of one of the services, as one line that names it.
fn clap_error<T: clap::CommandFactory>(service: &'static str, err: &clap::Error) -> ConfigError {
    ConfigError::new(
        service,
        service_kit::config::one_line_clap_error(err, &T::command()),
    )
}
