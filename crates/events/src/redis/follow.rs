//! Following the logs: one reader per partition, each on a connection of its own to the node
//! that serves the partition's slot, `XREAD BLOCK` over the logs the follower asks for in that
//! partition, each from the last position seen (partition 0 also reads the revocation
//! announcements).
//!
//! A log is added when the follower asks for it (at its tip; the blocked read is interrupted with
//! `CLIENT UNBLOCK`) and left out when it no longer does. In a cluster a reader starts at a seed
//! node and follows `MOVED` to the partition's primary; after a failover its connection fails or
//! is redirected, and it reads on from the promoted replica at the positions it had; while the
//! partition's slot migrates (resharding) it waits on the old node until that says `MOVED`. A lost
//! connection is made again with capped backoff; a changed epoch (Redis lost its data) restarts
//! every log at 0.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::redis;
use deadpool_redis::redis::{ConnectionAddr, Value};

use super::reply::{stream_entries, with_timeout};
use super::{
    epoch_key, events_connection_name, stream_tip, whole_after, RedisLog, READ_COUNT, REDIS_TIMEOUT,
};
use crate::log::{new_epoch, Follower, Revocation};
use crate::position::Position;

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long one `XREAD` blocks: also the health check of the connection, since a Redis that
/// hangs without closing the socket is noticed when a read does not return within this time
/// plus the timeout of a command.
const BLOCK: Duration = Duration::from_secs(5);
/// How long a reader waits before reading a migrating partition again: a slot's keys move in
/// milliseconds, and until they all have, `XREAD` here answers `ASK` or `TRYAGAIN`.
const MIGRATING_PAUSE: Duration = Duration::from_millis(50);

pub(super) async fn follow(log: RedisLog, follower: Arc<dyn Follower>) {
    let up = Arc::new(AtomicUsize::new(0));
    let readers = (0..log.layout.partitions)
        .map(|partition| follow_partition(log.clone(), follower.clone(), partition, up.clone()));
    futures_util::future::join_all(readers).await;
}

/// Why a reader's connection ended.
enum Ended {
    /// The partition is served by another node (`MOVED`): read there.
    Moved(String),
    Failed(String),
}

async fn follow_partition(
    log: RedisLog,
    follower: Arc<dyn Follower>,
    partition: u16,
    up: Arc<AtomicUsize>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut state = ReaderState::default();
    // Where `MOVED` sent the reader last; else the seeds, in turn.
    let mut node: Option<redis::Client> = None;
    let mut seed = partition as usize;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(REDIS_TIMEOUT))
        // Reads block for BLOCK; each is bounded by a timeout of its own.
        .set_response_timeout(None);
    loop {
        let client = node
            .clone()
            .unwrap_or_else(|| log.seeds[seed % log.seeds.len()].clone());
        let connected = tokio::time::timeout(
            REDIS_TIMEOUT,
            client.get_multiplexed_async_connection_with_config(&config),
        )
        .await;
        match connected {
            Ok(Ok(connection)) => {
                let reader = Reader {
                    log: &log,
                    follower: &*follower,
                    partition,
                    connection,
                    node: address(&client),
                    checked: false,
                };
                let (ended, read) = reader.serve(&mut state, &up).await;
                if read {
                    // A connection that worked: the next trouble starts its backoff afresh,
                    // so that a failover after earlier ones is not waited out at the cap.
                    backoff = Duration::from_millis(100);
                }
                match ended {
                    Ended::Moved(to) => match redirected(&client, &to) {
                        Some(moved) => {
                            tracing::info!(partition, node = %to, "the partition moved; reading it there");
                            node = Some(moved);
                            backoff = Duration::from_millis(100);
                            continue;
                        }
                        None => {
                            tracing::warn!(partition, node = %to, "cannot follow a redirection");
                            node = None;
                        }
                    },
                    Ended::Failed(err) => {
                        tracing::warn!(partition, %err, "lost the Redis event connection; reconnecting");
                        node = None;
                        seed += 1;
                    }
                }
            }
            Ok(Err(err)) => {
                tracing::warn!(partition, %err, "cannot connect to Redis; retrying");
                node = None;
                seed += 1;
            }
            Err(_) => {
                tracing::warn!(partition, "connecting to Redis timed out; retrying");
                node = None;
                seed += 1;
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Whether `err` says that the slot being read is migrating between two nodes.
fn migrating(err: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    matches!(
        err.kind(),
        ErrorKind::Server(ServerErrorKind::Ask | ServerErrorKind::TryAgain)
    )
}

/// A client for the node at `to` (`host:port`), with `seed`'s credentials and TLS.
fn redirected(seed: &redis::Client, to: &str) -> Option<redis::Client> {
    let (host, port) = to.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let info = seed.get_connection_info().clone();
    let addr = match info.addr() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host,
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host, port),
    };
    redis::Client::open(info.set_addr(addr)).ok()
}

fn address(client: &redis::Client) -> (String, u16) {
    match client.get_connection_info().addr() {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
            (host.clone(), *port)
        }
        _ => (String::new(), 0),
    }
}

/// What a reader keeps across its connections.
#[derive(Default)]
struct ReaderState {
    /// Where the announcements stand (partition 0).
    revocations: Option<Position>,
    /// The epoch this reader last read from.
    epoch: String,
    /// Whether this reader counts in `up`.
    up: bool,
}

impl ReaderState {
    /// Counts this reader in or out; the follower is connected while every reader is.
    fn set_up(&mut self, now: bool, up: &AtomicUsize, partitions: u16, follower: &dyn Follower) {
        if self.up == now {
            return;
        }
        self.up = now;
        let count = if now {
            up.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            up.fetch_sub(1, Ordering::AcqRel) - 1
        };
        follower.connected(count == usize::from(partitions));
    }
}

/// One connection's reading: set up, then `XREAD BLOCK` until it fails.
struct Reader<'a> {
    log: &'a RedisLog,
    follower: &'a dyn Follower,
    partition: u16,
    connection: redis::aio::MultiplexedConnection,
    /// The node it reads from, where `CLIENT UNBLOCK` must go.
    node: (String, u16),
    /// Whether the logs were checked for what was trimmed while no reader was on them.
    checked: bool,
}

impl Reader<'_> {
    /// Reads until the connection fails or the partition is elsewhere; returns which, and
    /// whether a read succeeded first.
    async fn serve(mut self, state: &mut ReaderState, up: &AtomicUsize) -> (Ended, bool) {
        let partitions = self.log.layout.partitions;
        let client_id = match self.hello(state).await {
            Ok(id) => id,
            Err(err) => return (Ended::Failed(err), false),
        };
        let mut read = false;
        let ended = loop {
            match self.read(client_id, state, up).await {
                Ok(()) => read = true,
                Err(err) => break err,
            }
        };
        state.set_up(false, up, partitions, self.follower);
        (ended, read)
    }

    /// Names the connection, agrees on the epoch and the partitions and finds where the
    /// announcements stand; returns the connection's id, for `CLIENT UNBLOCK`.
    async fn hello(&mut self, state: &mut ReaderState) -> Result<i64, String> {
        let prefix = &self.log.layout.key_prefix;
        // Named, so that an operator (and the tests) can tell it in `CLIENT LIST`.
        let mut hello = redis::pipe();
        hello
            .cmd("CLIENT")
            .arg("SETNAME")
            .arg(events_connection_name(prefix))
            .ignore()
            .cmd("CLIENT")
            .arg("ID");
        let (client_id,): (i64,) = with_timeout(hello.query_async(&mut self.connection)).await?;
        self.log.agree().await?;
        // The epoch: ours if none is set (a new or emptied Redis), else the one every gateway
        // uses. Through the pool: in a cluster its key is on any node.
        let mut epoch_pipe = redis::pipe();
        epoch_pipe
            .cmd("SET")
            .arg(epoch_key(prefix))
            .arg(new_epoch())
            .arg("NX")
            .ignore()
            .cmd("GET")
            .arg(epoch_key(prefix));
        let (epoch,): (String,) = service_kit::redis::query(&self.log.pool, &epoch_pipe)
            .await
            .map_err(|err| err.to_string())?;
        if self.follower.epoch(&epoch) {
            tracing::warn!(
                epoch,
                "the event logs were reset (Redis lost its data); reading them from the start"
            );
        }
        if state.epoch != epoch {
            if !state.epoch.is_empty() && state.revocations.is_some() {
                state.revocations = Some(Position::ZERO);
            }
            state.epoch = epoch;
        }
        if self.partition == 0 && state.revocations.is_none() {
            state.revocations =
                Some(stream_tip(&self.log.pool, &self.log.layout.revocation_key()).await?);
        }
        Ok(client_id)
    }

    /// Starts the logs just asked for, then reads once: until entries come, `BLOCK` passes or
    /// a new log is asked for.
    async fn read(
        &mut self,
        client_id: i64,
        state: &mut ReaderState,
        up: &AtomicUsize,
    ) -> Result<(), Ended> {
        let layout = &self.log.layout;
        let failed = Ended::Failed;
        let mut logs = Vec::new();
        for (event_type, position) in self.follower.logs(self.partition) {
            let key = layout.log_key(event_type.as_str(), self.partition);
            let position = match position {
                Some(position) => position,
                None => {
                    let tip = stream_tip(&self.log.pool, &key).await.map_err(failed)?;
                    self.follower.start(event_type, self.partition, tip);
                    tip
                }
            };
            logs.push((key, position));
        }
        let revocation_key = layout.revocation_key();
        if self.partition == 0 {
            logs.push((
                revocation_key.clone(),
                state.revocations.unwrap_or_default(),
            ));
        }
        if logs.is_empty() {
            // Nothing to read in this partition yet: wait to be asked (an XREAD needs a key).
            state.set_up(true, up, layout.partitions, self.follower);
            let changed = self.follower.changed(self.partition);
            return match tokio::time::timeout(BLOCK, changed).await {
                Ok(()) | Err(_) => self.ping().await,
            };
        }
        state.set_up(true, up, layout.partitions, self.follower);
        if !self.checked {
            // A new connection: what was trimmed while this partition had no reader.
            self.checked = true;
            for (key, position) in &logs {
                if *key != revocation_key {
                    self.check_whole(key, *position).await?;
                }
            }
        }
        let entries = self.read_blocked(&logs, client_id).await?;
        // A full page of a log: this reader is at least a page behind on it, which is when
        // trimming can overtake it. Checked before the page is handed on, so that nothing
        // after a gap reaches a subscriber as if it followed what came before.
        for (key, position) in &logs {
            let read = entries.iter().filter(|(of, _, _)| of == key).count();
            if read == READ_COUNT && *key != revocation_key {
                self.check_whole(key, *position).await?;
            }
        }
        for (key, position, payload) in entries {
            if key == revocation_key {
                state.revocations = Some(state.revocations.unwrap_or_default().max(position));
                self.follower.revoked(Revocation::decode(&payload));
            } else if let Some(event_type) = layout.log_name(&key, self.partition) {
                self.follower
                    .entry(event_type, self.partition, position, &payload);
            }
        }
        Ok(())
    }

    /// One `XREAD BLOCK` of `logs` (key, from where); returns its entries.
    async fn read_blocked(
        &mut self,
        logs: &[(String, Position)],
        client_id: i64,
    ) -> Result<Vec<(String, Position, Vec<u8>)>, Ended> {
        let mut read = redis::cmd("XREAD");
        read.arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS");
        for (key, _) in logs {
            read.arg(key);
        }
        for (_, position) in logs {
            read.arg(position.to_string());
        }
        let mut reading = self.connection.clone();
        let reply = tokio::time::timeout(
            BLOCK + REDIS_TIMEOUT,
            read.query_async::<Value>(&mut reading),
        );
        tokio::pin!(reply);
        let changed = self.follower.changed(self.partition);
        tokio::pin!(changed);
        let mut unblocked = false;
        let reply = loop {
            tokio::select! {
                reply = &mut reply => break reply,
                () = &mut changed, if !unblocked => {
                    // A new log to read: end the blocked read now (from another connection to
                    // the same node, as this one waits for the read) rather than at the end of
                    // BLOCK.
                    unblocked = true;
                    let pool = self.log.pool.clone();
                    let (host, port) = self.node.clone();
                    tokio::spawn(async move {
                        let mut unblock = redis::cmd("CLIENT");
                        unblock.arg("UNBLOCK").arg(client_id);
                        let _ = service_kit::redis::query_node(&pool, &host, port, &unblock).await;
                    });
                }
            }
        };
        match reply {
            Ok(Ok(value)) => Ok(stream_entries(value)),
            Ok(Err(err)) if migrating(&err) => {
                // The partition's slot is moving to another node (`ASK`, or `TRYAGAIN` while
                // its keys are split between the two): read on here once it has moved, when
                // this node answers `MOVED`, at the positions this reader has.
                tracing::debug!(partition = self.partition, %err, "the partition is migrating");
                tokio::time::sleep(MIGRATING_PAUSE).await;
                Ok(Vec::new())
            }
            Ok(Err(err)) => Err(match err.redirect_node() {
                Some((to, _slot)) => Ended::Moved(to.to_owned()),
                None => Ended::Failed(err.to_string()),
            }),
            Err(_) => Err(Ended::Failed("read timed out".into())),
        }
    }

    /// Tells the follower when entries of `key` after `after` (where it stood) are gone
    /// before it read them. Where `after`'s own entry was trimmed too while it was behind,
    /// whatever came right after it may not have been: said lost all the same, as a resume
    /// from there would find (`recovered: false`).
    async fn check_whole(&self, key: &str, after: Position) -> Result<(), Ended> {
        let whole = whole_after(&self.log.pool, key, after)
            .await
            .map_err(Ended::Failed)?;
        if !whole {
            if let Some(event_type) = self.log.layout.log_name(key, self.partition) {
                self.follower.lost(event_type, self.partition);
            }
        }
        Ok(())
    }

    /// Checks the connection while there is nothing to read on it.
    async fn ping(&mut self) -> Result<(), Ended> {
        with_timeout(redis::cmd("PING").query_async::<String>(&mut self.connection))
            .await
            .map(|_| ())
            .map_err(Ended::Failed)
    }
}
