use std::process::ExitCode;

use embedded::server::{banner, Application, StartupError};
use embedded::settings::{Cli, Command, Settings};
use service_kit::config::parse_or_exit;

#[actix_web::main]
async fn main() -> ExitCode {
    let cli: Cli = parse_or_exit();
    if let Err(err) = service_kit::telemetry::init(&cli.settings.log) {
        err.exit();
    }
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(&cli.settings).await,
        Command::TriggerEvent { pk } => trigger_event(&cli.settings, pk).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => err.exit(),
    }
}

async fn serve(settings: &Settings) -> Result<(), StartupError> {
    let app = Application::build(settings).await?;
    println!("{}", banner(settings, app.port()));
    app.run_until_stopped(service_kit::shutdown::signal())
        .await
        .map_err(|err| StartupError::Other(err.to_string()))
}

/// Commits the change and its event; the running server's relay publishes it (this process
/// cannot reach the server's in-memory bus).
async fn trigger_event(settings: &Settings, pk: i64) -> Result<(), StartupError> {
    let services = settings.services()?;
    store::migrate_async(&settings.database_url, std::time::Duration::from_secs(10))
        .await
        .map_err(StartupError::Other)?;
    let pool = store::pool(&services.api.database);
    api_service::startup::seed_demo(&pool).await?;
    let metrics = service_kit::metrics::Metrics::new("trigger-event");
    let store = store::repository::Store::commit_only(
        pool,
        api_service::startup::outbox_config(&services.api),
        &metrics,
    );
    let (before, after) = api_service::trigger::trigger_event(&store, pk)
        .await
        .map_err(StartupError::Other)?;
    println!(
        "car {pk}: make {:?} -> {:?} ({} {} {} {})",
        before.make, after.make, after.make, after.model, after.variant, after.year
    );
    Ok(())
}
