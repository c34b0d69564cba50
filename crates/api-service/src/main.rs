use std::process::ExitCode;

use api_service::settings::{Cli, Command, Settings};
use api_service::startup::{self, Application, StartupError};
use common::config::parse_or_exit;

#[actix_web::main]
async fn main() -> ExitCode {
    // The schema needs no settings; printing it should not ask for a database URL.
    if std::env::args().nth(1).as_deref() == Some("print-schema") {
        print!("{}", common::graphql::sdl());
        return ExitCode::SUCCESS;
    }
    let cli: Cli = parse_or_exit();
    if let Err(err) = common::telemetry::init(&cli.settings.log) {
        err.exit();
    }
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(cli.settings).await,
        Command::Migrate => startup::migrate(&cli.settings.database.database_url).await,
        Command::TriggerEvent { pk } => trigger_event(&cli.settings, pk).await,
        Command::PrintSchema => {
            print!("{}", common::graphql::sdl());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(StartupError::Config(err)) => err.exit(),
        Err(StartupError::Other(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: Settings) -> Result<(), StartupError> {
    let app = Application::build(settings).await?;
    app.run_until_stopped(common::shutdown::signal())
        .await
        .map_err(|err| StartupError::Other(err.to_string()))
}

async fn trigger_event(settings: &Settings, pk: i64) -> Result<(), StartupError> {
    let pool = common::db::pool(&settings.database);
    let redis = common::redis::pool(&settings.redis)?;
    let metrics = common::metrics::Metrics::new("trigger-event");
    let store = startup::store(settings, pool, redis, &metrics);
    let (before, after) = api_service::trigger::trigger_event(&store, pk)
        .await
        .map_err(StartupError::Other)?;
    println!(
        "car {pk}: make {:?} -> {:?} ({} {} {} {})",
        before.make, after.make, after.make, after.model, after.variant, after.year
    );
    Ok(())
}
