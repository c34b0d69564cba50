//! Persisted queries: Apollo's automatic persisted queries (APQ) and, for production, trusted
//! documents only.
//!
//! APQ: a client sends `extensions.persistedQuery {version: 1, sha256Hash}` without the document;
//! a known hash is run, an unknown one answered `PERSISTED_QUERY_NOT_FOUND`, and the client sends
//! the hash with the document, which is checked against the hash and registered. The registry is
//! Redis (`<REDIS_KEY_PREFIX>apq:<hash>`, each entry kept `APQ_TTL_SECS` from its last
//! registration), shared by every api-service replica and gateway; in the embedded mode a bounded
//! map in memory. A document is registered only once it has been checked against its hash, and
//! no larger than a request may be, so the registry holds nothing a client could not send anyway.
//!
//! Trusted documents (`TRUSTED_DOCUMENTS=<manifest>`): only the operations of a manifest (Apollo's
//! persisted query manifest, `{"operations": [{"id": "<sha256>", "body": "<document>"}, …]}`)
//! are run, by hash or by their full text; anything else is refused `PERSISTED_QUERY_NOT_IN_LIST`,
//! and nothing is registered. What GraphQL security guides recommend for first-party clients.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use clap::Args;
use service_kit::error::ErrorCode;

use serde_json::{Map, Value};
use service_kit::redis::RedisPool;
use sha2::Digest as _;

/// Documents kept by the in-memory registry of the embedded mode; the oldest go first.
const MEMORY_ENTRIES: usize = 10_000;

/// Persisted queries (`graphql_schema::persisted`), read by api-service and the gateway.
#[derive(Debug, Clone, Args)]
pub struct PersistedQueryArgs {
    /// How long an automatic persisted query stays registered after its last registration.
    #[arg(long, env = "APQ_TTL_SECS", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(60..=2_592_000))]
    pub apq_ttl_secs: u64,
    /// Run trusted documents only: the operations of this persisted query manifest (Apollo's
    /// format, `{"operations": [{"id": "<sha256>", "body": "<document>"}]}`); anything else is
    /// refused with PERSISTED_QUERY_NOT_IN_LIST.
    #[arg(long, env = "TRUSTED_DOCUMENTS")]
    pub trusted_documents: Option<PathBuf>,
}

/// Why a persisted-query request was refused: the stack's one request-refusal type.
pub use service_kit::error::Refusal;

/// Where persisted documents are looked up and registered.
#[derive(Clone)]
pub struct PersistedQueries {
    registry: Registry,
    /// Trusted documents only: the manifest's documents by hash.
    trusted: Option<Arc<HashMap<String, String>>>,
}

#[derive(Clone)]
enum Registry {
    Redis {
        pool: RedisPool,
        key_prefix: String,
        ttl_secs: u64,
    },
    Memory(Arc<Mutex<Memory>>),
}

#[derive(Default)]
struct Memory {
    documents: HashMap<String, String>,
    order: VecDeque<String>,
}

impl PersistedQueries {
    /// The registry shared through Redis.
    pub fn redis(pool: RedisPool, key_prefix: &str, ttl_secs: u64) -> Self {
        Self {
            registry: Registry::Redis {
                pool,
                key_prefix: key_prefix.to_owned(),
                ttl_secs: ttl_secs.max(1),
            },
            trusted: None,
        }
    }

    /// As the settings say: registered in Redis when given one (else in this process's memory),
    /// trusted documents only when a manifest is named.
    pub fn from_args(
        args: &PersistedQueryArgs,
        redis: Option<(RedisPool, &str)>,
    ) -> Result<Self, service_kit::config::ConfigError> {
        let queries = match redis {
            Some((pool, key_prefix)) => Self::redis(pool, key_prefix, args.apq_ttl_secs),
            None => Self::memory(),
        };
        match &args.trusted_documents {
            Some(path) => queries
                .trusting(path)
                .map_err(|err| service_kit::config::ConfigError::new("TRUSTED_DOCUMENTS", err)),
            None => Ok(queries),
        }
    }

    /// A registry of this process only (the embedded mode).
    pub fn memory() -> Self {
        Self {
            registry: Registry::Memory(Arc::default()),
            trusted: None,
        }
    }

    /// Trusted documents only: those of the manifest at `path`. An error names what is wrong
    /// with the file, for the process to refuse to start.
    pub fn trusting(mut self, path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| format!("TRUSTED_DOCUMENTS {}: {err}", path.display()))?;
        let manifest: Value = serde_json::from_str(&text)
            .map_err(|err| format!("TRUSTED_DOCUMENTS {}: not JSON: {err}", path.display()))?;
        let operations = manifest
            .get("operations")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                format!(
                    "TRUSTED_DOCUMENTS {}: no `operations` list (Apollo's persisted query \
                     manifest format)",
                    path.display()
                )
            })?;
        let mut documents = HashMap::new();
        for (index, operation) in operations.iter().enumerate() {
            let (Some(id), Some(body)) = (
                operation.get("id").and_then(Value::as_str),
                operation.get("body").and_then(Value::as_str),
            ) else {
                return Err(format!(
                    "TRUSTED_DOCUMENTS {}: operation {index} needs an `id` and a `body`",
                    path.display()
                ));
            };
            if sha256_hex(body) != id.to_ascii_lowercase() {
                return Err(format!(
                    "TRUSTED_DOCUMENTS {}: operation {index}'s `id` is not the SHA-256 of its \
                     `body`",
                    path.display()
                ));
            }
            documents.insert(id.to_ascii_lowercase(), body.to_owned());
        }
        self.trusted = Some(Arc::new(documents));
        Ok(self)
    }

    pub fn trusted_only(&self) -> bool {
        self.trusted.is_some()
    }

    /// Fills in `request.query` from `extensions.persistedQuery` (registering a new document),
    /// and in trusted mode refuses any document not in the manifest. A request without
    /// `persistedQuery` is left as it is, unless documents must be trusted.
    pub async fn resolve(&self, request: &mut Map<String, Value>) -> Result<(), Refusal> {
        let hash = match persisted_hash(request)? {
            Some(hash) => hash,
            None => return self.check_trusted(request),
        };
        let sent = match request.get("query") {
            Some(Value::String(query)) => Some(query.clone()),
            None | Some(Value::Null) => None,
            Some(_) => {
                return Err(Refusal::new(
                    "`query` must be a string",
                    ErrorCode::BadRequest,
                ))
            }
        };
        if let Some(trusted) = &self.trusted {
            let Some(document) = trusted.get(&hash) else {
                return Err(not_in_list());
            };
            if sent.as_ref().is_some_and(|query| query != document) {
                return Err(mismatch());
            }
            request.insert("query".into(), Value::String(document.clone()));
            return Ok(());
        }
        match sent {
            Some(query) => {
                if sha256_hex(&query) != hash {
                    return Err(mismatch());
                }
                self.register(&hash, &query).await?;
                Ok(())
            }
            None => match self.lookup(&hash).await? {
                Some(query) => {
                    request.insert("query".into(), Value::String(query));
                    Ok(())
                }
                None => Err(Refusal::new(
                    "PersistedQueryNotFound",
                    ErrorCode::PersistedQueryNotFound,
                )),
            },
        }
    }

    fn check_trusted(&self, request: &Map<String, Value>) -> Result<(), Refusal> {
        let Some(trusted) = &self.trusted else {
            return Ok(());
        };
        match request.get("query").and_then(Value::as_str) {
            Some(query) if trusted.contains_key(&sha256_hex(query)) => Ok(()),
            // No document at all is for the request's own checks to answer.
            None => Ok(()),
            Some(_) => Err(not_in_list()),
        }
    }

    async fn lookup(&self, hash: &str) -> Result<Option<String>, Refusal> {
        match &self.registry {
            Registry::Memory(memory) => Ok(lock(memory).documents.get(hash).cloned()),
            Registry::Redis {
                pool, key_prefix, ..
            } => {
                let mut get = deadpool_redis::redis::cmd("GET");
                get.arg(format!("{key_prefix}apq:{hash}"));
                service_kit::redis::query::<Option<String>>(pool, &get)
                    .await
                    .map_err(unavailable)
            }
        }
    }

    async fn register(&self, hash: &str, query: &str) -> Result<(), Refusal> {
        match &self.registry {
            Registry::Memory(memory) => {
                let mut memory = lock(memory);
                if memory
                    .documents
                    .insert(hash.to_owned(), query.to_owned())
                    .is_none()
                {
                    memory.order.push_back(hash.to_owned());
                }
                while memory.order.len() > MEMORY_ENTRIES {
                    if let Some(oldest) = memory.order.pop_front() {
                        memory.documents.remove(&oldest);
                    }
                }
                Ok(())
            }
            Registry::Redis {
                pool,
                key_prefix,
                ttl_secs,
            } => {
                let mut set = deadpool_redis::redis::cmd("SET");
                set.arg(format!("{key_prefix}apq:{hash}"))
                    .arg(query)
                    .arg("EX")
                    .arg(*ttl_secs);
                service_kit::redis::query::<()>(pool, &set)
                    .await
                    .map_err(unavailable)
            }
        }
    }
}

/// `extensions.persistedQuery.sha256Hash` (lowercase hex), if the request has one.
fn persisted_hash(request: &Map<String, Value>) -> Result<Option<String>, Refusal> {
    let Some(persisted) = request
        .get("extensions")
        .and_then(|extensions| extensions.get("persistedQuery"))
        .filter(|persisted| !persisted.is_null())
    else {
        return Ok(None);
    };
    if persisted.get("version").and_then(Value::as_i64) != Some(1) {
        return Err(Refusal::new(
            "PersistedQueryNotSupported: only `persistedQuery.version` 1 is supported",
            ErrorCode::PersistedQueryNotSupported,
        ));
    }
    let hash = persisted
        .get("sha256Hash")
        .and_then(Value::as_str)
        .map(str::to_ascii_lowercase)
        .filter(|hash| hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| {
            Refusal::new(
                "`persistedQuery.sha256Hash` must be the SHA-256 of the document, in hex",
                ErrorCode::BadRequest,
            )
        })?;
    Ok(Some(hash))
}

fn mismatch() -> Refusal {
    Refusal::new(
        "provided sha256Hash does not match the query",
        ErrorCode::PersistedQueryHashMismatch,
    )
}

fn not_in_list() -> Refusal {
    Refusal::new(
        "this server runs trusted documents only, and this operation is not one of them",
        ErrorCode::PersistedQueryNotInList,
    )
}

fn unavailable(err: service_kit::redis::RedisError) -> Refusal {
    tracing::warn!(%err, "persisted queries unavailable");
    Refusal::new(
        "persisted queries are unavailable right now; send the full query",
        ErrorCode::ServiceUnavailable,
    )
}

/// A poisoned lock only means another thread panicked while holding it; the map is still usable.
fn lock(memory: &Mutex<Memory>) -> std::sync::MutexGuard<'_, Memory> {
    memory
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The SHA-256 of `text`, in lowercase hex, as Apollo's clients hash documents.
pub fn sha256_hex(text: &str) -> String {
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    #[tokio::test]
    async fn a_hash_is_not_found_then_registered_with_its_document_then_found() {
        let queries = PersistedQueries::memory();
        let query = "{ hi }";
        let hash = sha256_hex(query);
        let by_hash = json!({"extensions": {"persistedQuery": {"version": 1, "sha256Hash": hash}}});
        let mut first = request(by_hash.clone());
        let refused = queries.resolve(&mut first).await;
        assert_eq!(
            refused.map_err(|r| r.code),
            Err(ErrorCode::PersistedQueryNotFound)
        );
        let mut wrong =
            request(json!({"query": "{ me { id } }", "extensions": by_hash["extensions"]}));
        assert_eq!(
            queries.resolve(&mut wrong).await.map_err(|r| r.code),
            Err(ErrorCode::PersistedQueryHashMismatch)
        );
        let mut register = request(json!({"query": query, "extensions": by_hash["extensions"]}));
        assert_eq!(queries.resolve(&mut register).await, Ok(()));
        let mut again = request(by_hash);
        assert_eq!(queries.resolve(&mut again).await, Ok(()));
        assert_eq!(again["query"], query);
    }

    #[tokio::test]
    async fn trusted_documents_run_by_hash_or_text_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("gqlws-trusted-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let manifest = dir.join("manifest.json");
        let hi = "{ hi }";
        std::fs::write(
            &manifest,
            json!({"format": "apollo-persisted-query-manifest", "version": 1,
                   "operations": [{"id": sha256_hex(hi), "name": "Hi", "type": "query", "body": hi}]})
            .to_string(),
        )
        .expect("manifest written");
        let queries = PersistedQueries::memory()
            .trusting(&manifest)
            .expect("a valid manifest");
        let mut by_text = request(json!({"query": hi}));
        assert_eq!(queries.resolve(&mut by_text).await, Ok(()));
        let mut by_hash = request(
            json!({"extensions": {"persistedQuery": {"version": 1, "sha256Hash": sha256_hex(hi)}}}),
        );
        assert_eq!(queries.resolve(&mut by_hash).await, Ok(()));
        assert_eq!(by_hash["query"], hi);
        let other = "{ me { id } }";
        for mut refused in [
            request(json!({"query": other})),
            request(json!({"query": other, "extensions": {"persistedQuery":
                {"version": 1, "sha256Hash": sha256_hex(other)}}})),
        ] {
            assert_eq!(
                queries.resolve(&mut refused).await.map_err(|r| r.code),
                Err(ErrorCode::PersistedQueryNotInList)
            );
        }
        std::fs::write(
            &manifest,
            r#"{"operations": [{"id": "00", "body": "{ hi }"}]}"#,
        )
        .expect("manifest written");
        assert!(PersistedQueries::memory().trusting(&manifest).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
