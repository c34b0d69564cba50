use std::io::Write as _;
use std::process::ExitCode;

use auth_service::settings::{Cli, Command};
use std::time::Duration;

use auth_service::startup::{Application, StartupError};
use service_kit::config::parse_or_exit;

#[actix_web::main]
async fn main() -> ExitCode {
    let cli: Cli = parse_or_exit();
    if let Err(err) = service_kit::telemetry::init(&cli.settings.log, "auth-service") {
        err.exit();
    }
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(cli.settings).await,
        Command::Migrate => {
            store::migrate_async(&cli.settings.database.database_url, Duration::from_secs(30))
                .await
                .map_err(StartupError::Other)
                .map(|applied| println!("applied {applied} migration(s)"))
        }
        Command::CreateUser {
            username,
            password_stdin,
            staff,
            update,
        } => create_user_command(&cli.settings, &username, password_stdin, staff, update).await,
        Command::DeactivateUser { username } => {
            deactivate_user_command(&cli.settings, &username).await
        }
        Command::GenerateKey { out } => generate_key(&out),
    };
    service_kit::telemetry::shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => err.exit(),
    }
}

async fn serve(settings: auth_service::settings::Settings) -> Result<(), StartupError> {
    let app = Application::build(settings).await?;
    app.run_until_stopped(service_kit::shutdown::signal())
        .await
        .map_err(|err| StartupError::Other(err.to_string()))
}

async fn deactivate_user_command(
    settings: &auth_service::settings::Settings,
    username: &str,
) -> Result<(), StartupError> {
    let pool = store::pool(&settings.database);
    let user = store::users::find_by_username(&pool, username.to_owned())
        .await
        .map_err(|err| StartupError::Other(err.to_string()))?
        .ok_or_else(|| StartupError::Other(format!("no user `{username}`")))?;
    store::users::set_active(&pool, username.to_owned(), false)
        .await
        .map_err(|err| StartupError::Other(err.to_string()))?;
    if let Err(err) = revoke(settings, user.id, "deactivated").await {
        return Err(StartupError::Other(format!(
            "user `{username}` is deactivated, but its access tokens could not be revoked \
             ({err}); they stay valid until they expire: run deactivate-user again"
        )));
    }
    println!("deactivated user `{username}`; its access tokens are revoked");
    Ok(())
}

/// Revokes every access token of `user_id` issued up to now, for every replica and gateway.
async fn revoke(
    settings: &auth_service::settings::Settings,
    user_id: i64,
    why: &str,
) -> Result<(), String> {
    let redis = service_kit::redis::pool(&settings.redis).map_err(|err| err.to_string())?;
    let revocations = auth_service::routes::Revocations {
        log: std::sync::Arc::new(events::RedisLog::new(
            redis.clone(),
            settings.redis.redis_key_prefix.clone(),
        )),
        cutoffs: Some(redis),
        revoked: tokens::revocations::RevokedBefore::new(
            settings.jwt.access_token_lifetime_secs,
            settings.jwt.jwt_leeway_secs,
        ),
    };
    auth_service::routes::revoke_access_tokens(
        &revocations,
        &settings.redis.key_prefix(),
        user_id,
        why,
    )
    .await
    .map_err(|err| err.to_string())
}

async fn create_user_command(
    settings: &auth_service::settings::Settings,
    username: &str,
    password_stdin: bool,
    staff: bool,
    update: bool,
) -> Result<(), StartupError> {
    store::migrate_async(&settings.database.database_url, Duration::from_secs(30))
        .await
        .map_err(StartupError::Other)?;
    let pool = store::pool(&settings.database);
    auth_service::users::create_user_command(&pool, username, password_stdin, staff, update, |id| {
        revoke(settings, id, "credentials updated")
    })
    .await
    .map_err(StartupError::Other)
}

fn generate_key(out: &std::path::Path) -> Result<(), StartupError> {
    let (private, public) = tokens::jwt::generate_ed25519_pem().map_err(StartupError::Other)?;
    let public_path = out.with_extension("pub.pem");
    write_private(out, &private)?;
    std::fs::write(&public_path, public).map_err(|err| {
        StartupError::Other(format!("cannot write {}: {err}", public_path.display()))
    })?;
    println!(
        "wrote {} (private, mode 0600) and {}",
        out.display(),
        public_path.display()
    );
    Ok(())
}

fn write_private(path: &std::path::Path, contents: &str) -> Result<(), StartupError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .map_err(|err| StartupError::Other(format!("cannot create {}: {err}", path.display())))?;
    file.write_all(contents.as_bytes())
        .map_err(|err| StartupError::Other(format!("cannot write {}: {err}", path.display())))
}
