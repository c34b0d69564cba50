use std::process::ExitCode;

use embedded::server::{banner, Application, StartupError};
use embedded::settings::{Cli, Command, Settings};
use service_kit::config::parse_or_exit;

#[actix_web::main]
async fn main() -> ExitCode {
    let cli: Cli = parse_or_exit();
    if let Err(err) = service_kit::telemetry::init(&cli.settings.log, "gqlws") {
        err.exit();
    }
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(&cli.settings).await,
        Command::TriggerEvent { pk } => trigger_event(&cli.settings, pk).await,
        Command::CreateUser {
            username,
            password_stdin,
            staff,
            update,
        } => create_user(&cli.settings, &username, password_stdin, staff, update).await,
        Command::DeactivateUser { username } => deactivate_user(&cli.settings, &username).await,
    };
    service_kit::telemetry::shutdown();
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
/// cannot reach the server's in-memory log).
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

/// The database, migrated, as the server opens it.
async fn database(settings: &Settings) -> Result<store::DbPool, StartupError> {
    let services = settings.services()?;
    store::migrate_async(&settings.database_url, std::time::Duration::from_secs(10))
        .await
        .map_err(StartupError::Other)?;
    Ok(store::pool(&services.api.database))
}

async fn create_user(
    settings: &Settings,
    username: &str,
    password_stdin: bool,
    staff: bool,
    update: bool,
) -> Result<(), StartupError> {
    let pool = database(settings).await?;
    auth_service::users::create_user_command(&pool, username, password_stdin, staff, update, |id| {
        revoke(&pool, id, "credentials updated")
    })
    .await
    .map_err(StartupError::Other)
}

async fn deactivate_user(settings: &Settings, username: &str) -> Result<(), StartupError> {
    let pool = database(settings).await?;
    let user = store::users::find_by_username(&pool, username.to_owned())
        .await
        .map_err(|err| StartupError::Other(err.to_string()))?
        .ok_or_else(|| StartupError::Other(format!("no user `{username}`")))?;
    store::users::set_active(&pool, username.to_owned(), false)
        .await
        .map_err(|err| StartupError::Other(err.to_string()))?;
    revoke(&pool, user.id, "deactivated")
        .await
        .map_err(StartupError::Other)?;
    println!("deactivated user `{username}`; its access tokens are revoked");
    Ok(())
}

/// Revokes the access tokens of `user_id` issued up to now. This process cannot reach the
/// server's memory, where the embedded mode keeps the cutoffs, so the revocation is committed to
/// the outbox, as `trigger-event` commits a write, and the server's relay announces it on its
/// bus: its hub records the cutoff (which its auth and API parts read too) and closes the user's
/// sockets. A server started later relays it at start.
async fn revoke(pool: &store::DbPool, user_id: i64, why: &str) -> Result<(), String> {
    let revocation = events::Revocation {
        user_id,
        jti: why.to_owned(),
        cutoff_ms: tokens::revocations::now_ms(),
    };
    let payload = serde_json::to_string(&revocation).map_err(|err| err.to_string())?;
    store::outbox::commit(pool, events::REVOCATION_EVENT, payload)
        .await
        .map_err(|err| format!("cannot revoke the access tokens ({err}): run the command again"))
}
