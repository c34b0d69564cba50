use std::process::ExitCode;

use api_service::settings::{Cli, Command, Settings};
use api_service::startup::{self, Application, StartupError};
use service_kit::config::parse_or_exit;

#[actix_web::main]
async fn main() -> ExitCode {
    // The schema needs no settings; printing it should not ask for a database URL.
    if std::env::args().nth(1).as_deref() == Some("print-schema") {
        print!("{}", graphql_schema::sdl());
        return ExitCode::SUCCESS;
    }
    let cli: Cli = parse_or_exit();
    if let Err(err) = service_kit::telemetry::init(&cli.settings.log, "api-service") {
        err.exit();
    }
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(cli.settings).await,
        Command::Migrate => startup::migrate(&cli.settings.database.database_url).await,
        Command::TriggerEvent { pk } => trigger_event(&cli.settings, pk).await,
        Command::PrintSchema => {
            print!("{}", graphql_schema::sdl());
            Ok(())
        }
    };
    service_kit::telemetry::shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => err.exit(),
    }
}

async fn serve(settings: Settings) -> Result<(), StartupError> {
    let app = Application::build(settings).await?;
    app.run_until_stopped(service_kit::shutdown::signal())
        .await
        .map_err(|err| StartupError::Other(err.to_string()))
}

async fn trigger_event(settings: &Settings, pk: i64) -> Result<(), StartupError> {
    let pool = store::pool(&settings.database);
    let metrics = service_kit::metrics::Metrics::new("trigger-event");
    let store = match store::Backend::of_url(&settings.database.database_url) {
        // An SQLite file belongs to an embedded server, whose bus lives in its memory: commit,
        // and its outbox relay publishes the event within OUTBOX_RELAY_INTERVAL_MS.
        Ok(store::Backend::Sqlite) => {
            store::repository::Store::commit_only(pool, startup::outbox_config(settings), &metrics)
        }
        _ => {
            let redis = service_kit::redis::pool(&settings.redis)?;
            let bus = std::sync::Arc::new(startup::event_log(settings, redis)?);
            startup::store(settings, pool, bus, &metrics)
        }
    };
    let (before, after) = api_service::trigger::trigger_event(&store, pk)
        .await
        .map_err(StartupError::Other)?;
    println!(
        "car {pk}: make {:?} -> {:?} ({} {} {} {})",
        before.make, after.make, after.make, after.model, after.variant, after.year
    );
    Ok(())
}
