//! A misconfigured service exits at start with one line naming the setting, and status 2.

#![allow(clippy::unwrap_used)]

use std::process::Command;

fn run(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_api-service"))
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn bad_settings_exit_2_with_one_line_naming_them() {
    let database = ("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none");
    for (env, setting) in [
        (vec![database], "JWT_SECRET"),
        (vec![database, ("JWT_SECRET", "short")], "JWT_SECRET"),
        (vec![database, ("JWKS_URL", "ftp://auth/jwks")], "JWKS_URL"),
        (
            vec![database, ("JWT_ALGORITHM", "EdDSA")],
            "JWT_VERIFY_KEYS",
        ),
        (
            vec![database, ("DEMO", "true"), ("MAX_QUERY_DEPTH", "1")],
            "MAX_QUERY_DEPTH",
        ),
        (vec![], "DATABASE_URL"),
    ] {
        let (code, stderr) = run(&env);
        assert_eq!(code, Some(2), "{env:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{env:?}: {stderr}");
        assert!(stderr.contains(setting), "{env:?}: {stderr}");
    }
}
