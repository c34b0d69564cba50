//! A misconfigured binary exits at start with status 2 and one line naming the setting.

use std::process::Command;

fn run(envs: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_auth-service"))
        .env_clear()
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn assert_one_line_naming(envs: &[(&str, &str)], setting: &str) {
    let (code, stderr) = run(envs);
    assert_eq!(code, Some(2), "{setting}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(setting), "{setting} not named in: {stderr}");
}

#[test]
fn missing_or_malformed_settings_exit_2_with_one_line() {
    let db = ("DATABASE_URL", "postgres://unused@127.0.0.1:1/x");
    let secret = ("JWT_SECRET", "a-secret-that-is-long-enough-for-hs256-0123");
    assert_one_line_naming(&[], "DATABASE_URL");
    assert_one_line_naming(&[db], "JWT_SECRET");
    assert_one_line_naming(&[db, ("JWT_SECRET", "short")], "JWT_SECRET");
    assert_one_line_naming(&[db, secret, ("LISTEN_ADDR", "nowhere")], "LISTEN_ADDR");
    assert_one_line_naming(&[db, secret, ("JWT_ALGORITHM", "none")], "JWT_ALGORITHM");
    assert_one_line_naming(&[db, secret, ("JWT_ALGORITHM", "RS256")], "JWT_ALGORITHM");
    assert_one_line_naming(&[db, ("JWT_ALGORITHM", "EdDSA")], "JWT_PRIVATE_KEY_FILE");
    assert_one_line_naming(
        &[
            db,
            ("JWT_ALGORITHM", "EdDSA"),
            ("JWT_PRIVATE_KEY_FILE", "/nonexistent.pem"),
        ],
        "JWT_PRIVATE_KEY_FILE",
    );
    assert_one_line_naming(
        &[db, secret, ("JWT_VERIFY_KEYS", "no-equals-sign")],
        "JWT_VERIFY_KEYS",
    );
    assert_one_line_naming(
        &[db, secret, ("ACCESS_TOKEN_LIFETIME_SECS", "-5")],
        "ACCESS_TOKEN_LIFETIME_SECS",
    );
    assert_one_line_naming(&[db, secret, ("DEMO", "maybe")], "DEMO");
    assert_one_line_naming(&[db, secret, ("LOG_LEVEL", "[[[")], "LOG_LEVEL");
    assert_one_line_naming(
        &[db, secret, ("JWT_ACCEPTED_ALGORITHMS", "EdDSA")],
        "JWT_ACCEPTED_ALGORITHMS",
    );
}

#[test]
fn the_secret_never_appears_in_the_output() {
    let secret = "super-secret-value-that-must-not-leak-0123456789";
    let (_, stderr) = run(&[
        ("DATABASE_URL", "postgres://unused@127.0.0.1:1/x"),
        ("JWT_SECRET", secret),
        ("LISTEN_ADDR", "bad"),
    ]);
    assert!(!stderr.contains(secret));
    let help = Command::new(env!("CARGO_BIN_EXE_auth-service"))
        .env("JWT_SECRET", secret)
        .arg("--help")
        .output()
        .unwrap();
    assert!(help.status.success());
    assert!(!String::from_utf8_lossy(&help.stdout).contains(secret));
}
