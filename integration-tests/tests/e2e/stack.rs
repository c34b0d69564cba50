//! `Stack`: the real native stack, started the way a person starts it (`scripts/stack up`), on
//! free ports, with a database and a Redis key prefix of its own.
//!
//! Nothing is built here: the binaries come from `cargo build --release -p auth-service
//! -p api-service -p subscription-gateway -p embedded` (scripts/test runs it before `cargo test`).
//!
//! Starting and stopping: a watchdog process (`bash`, in its own process group) runs
//! `scripts/stack up`, reports how that went on its stdout, then waits for EOF on its stdin, a
//! pipe whose write end only this process holds, and runs `scripts/stack down` and drops the
//! database. The pipe closes when the `Stack` is dropped (also while a test panics) or when the
//! test process ends in any way, so the shared stack of a `static`, which is never dropped, stops
//! too, and a test process killed while `up` runs leaves nothing behind either: `down` follows
//! `up` in the same script.

use std::io::{BufRead as _, BufReader};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;

use test_support::TestDb;

/// Where the processes of one stack run, and how to reach them.
pub struct Stack {
    /// `http://127.0.0.1:<NGINX port>`, the only address the tests walk through.
    pub url: String,
    /// Each replica's own port, for reading its `/metrics` (observation only).
    pub auth_port: u16,
    pub api_ports: Vec<u16>,
    pub gateway_ports: Vec<u16>,
    pub database_url: String,
    pub redis_url: String,
    pub redis_prefix: String,
    /// The further settings every service of it was started with ([`Stack::start_with`]).
    pub settings: Vec<(String, String)>,
    /// The run directory (STACK_DIR): supervisord's socket, NGINX's prefix, stack.log.
    pub dir: PathBuf,
    // Field order is drop order: the watchdog stops the stack before the database goes.
    watchdog: Watchdog,
    _db: TestDb,
}

/// How many replicas a stack runs.
const API_REPLICAS: usize = 2;
const GATEWAY_REPLICAS: usize = 2;

impl Stack {
    /// A stack of the test's own (for tests that kill processes or count connections).
    pub fn start(label: &str) -> Stack {
        Self::start_on(label, &test_support::redis_url())
    }

    /// [`Stack::start`] with a Redis of the test's own (one it restarts).
    pub fn start_on(label: &str, redis_url: &str) -> Stack {
        Self::start_with(label, redis_url, &[])
    }

    /// [`Stack::start_on`] with further settings for every service (their environment).
    pub fn start_with(label: &str, redis_url: &str, settings: &[(&str, &str)]) -> Stack {
        let mut last_output = String::new();
        // A free port can be taken between our probe and NGINX's bind; try other ports then.
        for _ in 0..3 {
            match Self::try_start(label, redis_url, settings) {
                Ok(stack) => return stack,
                Err(output) if output.contains("is in use") => last_output = output,
                Err(output) => panic!("scripts/stack up failed:\n{output}"),
            }
        }
        panic!("scripts/stack up failed three times:\n{last_output}");
    }

    /// One stack for every test of this run that only reads and writes its own data. It stops
    /// when the test process exits (see the module doc).
    pub fn shared() -> &'static Stack {
        static SHARED: OnceLock<Stack> = OnceLock::new();
        SHARED.get_or_init(|| Stack::start("shared"))
    }

    fn try_start(label: &str, redis_url: &str, settings: &[(&str, &str)]) -> Result<Stack, String> {
        let repo = repo_root();
        let bin_dir = bin_dir();
        for binary in ["auth-service", "api-service", "subscription-gateway"] {
            assert!(
                bin_dir.join(binary).is_file(),
                "{} not found: build the services first with \
                 `cargo build --release -p auth-service -p api-service -p subscription-gateway` \
                 (scripts/test does), or point E2E_BIN_DIR at them",
                bin_dir.join(binary).display()
            );
        }
        let db = TestDb::new();
        let redis_url = redis_url.to_owned();
        let redis_prefix = test_support::unique_prefix(&format!("e2e-{label}"));
        let dir = repo
            .join("target")
            .join("e2e")
            .join(format!("{label}-{}", test_support::random_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        // Six distinct free ports: NGINX, auth, two api and two gateway replicas, laid out as
        // deploy/layout.sh wants them (replica N on PORT + STEP × N).
        let ports = distinct_free_ports(6);
        let (nginx_port, auth_port) = (ports[0], ports[1]);
        let api_ports = sorted_pair(ports[2], ports[3]);
        let gateway_ports = sorted_pair(ports[4], ports[5]);

        let mut up = Command::new("bash");
        up.current_dir(&repo)
            .env("STACK_DIR", &dir)
            .env("STACK_PORT", nginx_port.to_string())
            .env("STACK_BUILD", "0")
            .env("STACK_BIN_DIR", &bin_dir)
            .env("STACK_DATABASE_URL", &db.url)
            .env("STACK_REDIS_URL", &redis_url)
            .env("STACK_READY_TIMEOUT", "120")
            .env("REDIS_KEY_PREFIX", &redis_prefix)
            .env("DEMO", "true")
            .env("AUTH_PORT", auth_port.to_string())
            .env("AUTH_REPLICAS", "1")
            .env("API_PORT", api_ports[0].to_string())
            .env("API_PORT_STEP", (api_ports[1] - api_ports[0]).to_string())
            .env("API_REPLICAS", API_REPLICAS.to_string())
            .env("GATEWAY_PORT", gateway_ports[0].to_string())
            .env(
                "GATEWAY_PORT_STEP",
                (gateway_ports[1] - gateway_ports[0]).to_string(),
            )
            .env("GATEWAY_REPLICAS", GATEWAY_REPLICAS.to_string())
            .env_remove("NGINX_LISTEN")
            .env_remove("DATABASE_URL")
            .env_remove("REDIS_URL")
            .envs(settings.iter().copied());
        let (watchdog, up_succeeded) = Watchdog::spawn(up, &repo, &db.name);
        let text = std::fs::read_to_string(dir.join("up.log")).unwrap_or_default();
        if !up_succeeded {
            return Err(text);
        }
        let url = text
            .lines()
            .find_map(|line| line.strip_prefix("STACK_URL="))
            .unwrap_or_else(|| panic!("scripts/stack up printed no STACK_URL:\n{text}"))
            .to_owned();
        Ok(Stack {
            url,
            auth_port,
            api_ports: api_ports.to_vec(),
            gateway_ports: gateway_ports.to_vec(),
            database_url: db.url.clone(),
            redis_url,
            redis_prefix,
            settings: settings
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                .collect(),
            dir,
            watchdog,
            _db: db,
        })
    }

    pub fn ws_url(&self) -> String {
        format!("{}/graphql/", self.url.replacen("http://", "ws://", 1))
    }

    /// Runs `supervisorctl` against this stack's supervisord (its socket is in the run dir).
    pub fn supervisorctl(&self, args: &[&str]) -> String {
        let output = Command::new("bash")
            .arg("-c")
            .arg(r#"source "$STACK_DIR/stack.env" && supervisorctl -c "$0" "$@""#)
            .arg(repo_root().join("supervisord.conf"))
            .args(args)
            .env("STACK_DIR", &self.dir)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The pid of one supervisord program process, e.g. `subscription-gateway:subscription-gateway-0`.
    pub fn pid_of(&self, process: &str) -> u32 {
        let out = self.supervisorctl(&["pid", process]);
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("supervisorctl pid {process}: `{out}`"))
    }

    /// The last lines every process of the stack wrote, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let Ok(file) = std::fs::File::open(self.dir.join("stack.log")) else {
            return String::new();
        };
        let all: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of {}/stack.log ---\n{}",
                self.dir.display(),
                self.log_tail(60)
            );
        }
        self.watchdog.stop_now();
    }
}

/// Runs `scripts/stack up`, then `scripts/stack down` (and drops the database) when its stdin
/// closes.
struct Watchdog {
    child: Child,
    lifeline: Option<ChildStdin>,
}

impl Watchdog {
    /// Spawns `command` (a `bash` with the stack's environment) as the watchdog; returns once
    /// `up` has finished, with whether it succeeded. Its output is in `$STACK_DIR/up.log`.
    fn spawn(mut command: Command, repo: &Path, database: &str) -> (Watchdog, bool) {
        // `trap '' PIPE`: when the test process is gone, the report cannot be written, and the
        // script must go on to `down` rather than die of SIGPIPE.
        let script = r#"
            trap '' PIPE
            "$0/scripts/stack" up >"$STACK_DIR/up.log" 2>&1 </dev/null
            echo "up-exit $?"
            read -r _ || true
            "$0/scripts/stack" down >>"$STACK_DIR/watchdog.log" 2>&1 </dev/null
            psql "$1" -q -c "DROP DATABASE IF EXISTS \"$2\" WITH (FORCE)" >>"$STACK_DIR/watchdog.log" 2>&1 </dev/null || true
        "#;
        let mut child = command
            .arg("-c")
            .arg(script)
            .arg(repo)
            .arg(test_support::admin_url())
            .arg(database)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            // Its own process group: a Ctrl-C in the terminal must not end it before it has
            // stopped the stack.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start bash: {err}"));
        let mut report = String::new();
        if let Some(stdout) = child.stdout.take() {
            let _ = BufReader::new(stdout).read_line(&mut report);
        }
        let lifeline = child.stdin.take();
        let watchdog = Watchdog { child, lifeline };
        (watchdog, report.trim() == "up-exit 0")
    }

    /// Stops the stack and waits until it is down.
    fn stop_now(&mut self) {
        drop(self.lifeline.take());
        let _ = self.child.wait();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop_now();
    }
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The release binaries: `E2E_BIN_DIR`, else `$CARGO_TARGET_DIR/release`, else `target/release`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("E2E_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let target = if target.is_absolute() {
        target
    } else {
        repo_root().join(target)
    };
    target.join("release")
}

fn distinct_free_ports(count: usize) -> Vec<u16> {
    // Held together, so the kernel hands out different ports.
    let listeners: Vec<std::net::TcpListener> = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|listener| listener.local_addr().unwrap().port())
        .collect()
}

fn sorted_pair(a: u16, b: u16) -> [u16; 2] {
    if a < b {
        [a, b]
    } else {
        [b, a]
    }
}
