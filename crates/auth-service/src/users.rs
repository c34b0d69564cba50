//! Creating users: the `create-user` command and the demo user of the reference's fixture.

use store::users::{self, NewUser};
use store::DbPool;

pub const DEMO_USERNAME: &str = "admin";
pub const DEMO_PASSWORD: &str = "letmein";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    Created,
    Updated,
    AlreadyExists,
}

/// Creates the user; an existing one is updated when `update` is set, else left alone.
pub async fn create_user(
    pool: &DbPool,
    username: &str,
    password: &str,
    staff: bool,
    update: bool,
) -> Result<Created, String> {
    validate_username(username)?;
    if password.is_empty() {
        return Err("the password must not be empty".into());
    }
    let password_hash = crate::passwords::hash_blocking(password.to_owned()).await?;
    let inserted = users::create(
        pool,
        NewUser {
            username: username.to_owned(),
            password_hash: password_hash.clone(),
            is_active: true,
            is_staff: staff,
        },
    )
    .await
    .map_err(|err| err.to_string())?;
    if inserted.is_some() {
        return Ok(Created::Created);
    }
    if !update {
        return Ok(Created::AlreadyExists);
    }
    users::update_credentials(pool, username.to_owned(), password_hash, staff)
        .await
        .map_err(|err| err.to_string())?;
    Ok(Created::Updated)
}

/// The password of `create-user`: the first line of standard input with `--password-stdin`,
/// else a random one; true when generated (the command prints it once).
pub fn password_for_command(password_stdin: bool) -> Result<(String, bool), String> {
    if !password_stdin {
        return Ok((tokens::jwt::new_jti(), true));
    }
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::stdin().lock(), &mut line)
        .map_err(|err| format!("cannot read the password: {err}"))?;
    Ok((line.trim_end_matches(['\r', '\n']).to_owned(), false))
}

/// The `create-user` command, auth-service's and `gqlws`'s: creates the user (or updates it with
/// `update`), prints what it did and a generated password, and after an update calls `revoke`
/// with the user's id: a new password or a change of staff rights counts at once (the gateway
/// reads private records for staff by the tokens' `is_staff` claim), so the user logs in again.
/// Each binary revokes its own way (Redis, or the embedded server's outbox).
pub async fn create_user_command<F, Fut>(
    pool: &DbPool,
    username: &str,
    password_stdin: bool,
    staff: bool,
    update: bool,
    revoke: F,
) -> Result<(), String>
where
    F: FnOnce(i64) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let (password, generated) = password_for_command(password_stdin)?;
    match create_user(pool, username, &password, staff, update).await? {
        Created::Created => println!("created user {username}"),
        Created::Updated => {
            let user = users::find_by_username(pool, username.to_owned())
                .await
                .map_err(|err| err.to_string())?
                .ok_or_else(|| format!("no user `{username}`"))?;
            revoke(user.id).await.map_err(|err| {
                format!(
                    "user {username} is updated, but its access tokens could not be revoked \
                     ({err}); they keep their old rights until they expire: run create-user \
                     --update again"
                )
            })?;
            println!("updated user {username}; its access tokens are revoked");
        }
        Created::AlreadyExists => {
            return Err(format!(
                "user {username} already exists (pass --update to reset its password)"
            ))
        }
    }
    if generated {
        println!("password: {password}");
    }
    let _ = std::io::Write::flush(&mut std::io::stdout());
    Ok(())
}

/// The demo user `admin`/`letmein` (staff), created only when absent.
pub async fn ensure_demo_user(pool: &DbPool) -> Result<(), String> {
    if users::find_by_username(pool, DEMO_USERNAME.to_owned())
        .await
        .map_err(|err| err.to_string())?
        .is_some()
    {
        return Ok(());
    }
    create_user(pool, DEMO_USERNAME, DEMO_PASSWORD, true, false).await?;
    tracing::warn!(
        username = DEMO_USERNAME,
        "demo mode: created the demo user with the well-known password"
    );
    Ok(())
}

/// Django's rule: at most 150 characters of letters, digits and `@.+-_`.
pub fn validate_username(username: &str) -> Result<(), String> {
    let ok = !username.is_empty()
        && username.chars().count() <= 150
        && username
            .chars()
            .all(|c| c.is_alphanumeric() || "@.+-_".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid username `{username}`: use 1-150 letters, digits and @.+-_"
        ))
    }
}
