//! One function per client message: `connection_init`, `subscribe`, `complete`/`stop`, and
//! `ping` (which renews the token when it carries one).

use serde_json::Value;
use service_kit::error::ErrorCode;
use tokens::auth::AuthError;
use tokens::jwt::TokenError;

use super::closing::Closing;
use super::phase::{Phase, Ready};
use super::Connection;
use crate::operations::{start, Caller};
use crate::protocol::{self, close, ClientMessage, Protocol};

impl Connection<'_> {
    /// One message from the client; an error when the connection has to close.
    pub(super) async fn handle(&mut self, message: ClientMessage) -> Result<(), Closing> {
        match message {
            ClientMessage::Init { payload } => self.init(&payload).await,
            ClientMessage::Subscribe { id, payload } => self.subscribe(id, payload).await,
            ClientMessage::Stop { id } => self.stop(&id),
            ClientMessage::Ping { payload } => self.ping(payload).await,
            ClientMessage::Pong => Ok(()),
            ClientMessage::Terminate => Err(Closing::new(close::NORMAL, "connection terminated")),
        }
    }

    /// `connection_init`: the token checked, the user's place taken, then `connection_ack`.
    async fn init(&mut self, payload: &Value) -> Result<(), Closing> {
        if let Phase::Ready(_) = self.phase {
            return Err(Closing::new(
                close::TOO_MANY_INITS,
                "Too many initialisation requests",
            ));
        }
        let shared = self.shared;
        let token = connection_token(payload, self.header_authorization.as_deref());
        let authorization = token.clone().unwrap_or_default();
        // Boxed: the verifier's future (a JWKS fetch, possibly) is large and rare, and would
        // otherwise make every idle connection's task as large as it.
        let verified = match Box::pin(shared.verifier.authenticate(token.as_deref())).await {
            Ok(verified) => verified,
            Err(err) => return Err(self.refuse_init(close::FORBIDDEN, auth_reason(&err))),
        };
        // Boxed too: the Redis round trip's future is large, and is awaited once.
        let Some(user_slot) = Box::pin(shared.users.enter(verified.user_id)).await else {
            let reason = format!(
                "too many connections for this user (at most {})",
                shared.users.max()
            );
            return Err(self.refuse_init(close::POLICY_VIOLATION, reason));
        };
        let ready = Ready::new(shared, verified, authorization, user_slot);
        // Checked again now that the connection watches the cutoffs: a logout recorded since
        // the token was verified would otherwise wake no one.
        if shared.verifier.is_revoked(&ready.claims) {
            let reason = auth_reason(&AuthError::Token(TokenError::Revoked));
            return Err(self.refuse_init(close::FORBIDDEN, reason));
        }
        self.phase = Phase::Ready(ready);
        self.send(protocol::connection_ack())?;
        // The legacy protocol expects a first `ka` right after the ack.
        if self.protocol == Protocol::LegacyWs {
            self.send(protocol::keepalive(self.protocol))?;
        }
        Ok(())
    }

    /// How a refused `connection_init` closes; the legacy protocol is told first, in a message.
    fn refuse_init(&self, code: u16, reason: String) -> Closing {
        if self.protocol == Protocol::LegacyWs {
            let _ = self.send(protocol::connection_error(&reason));
        }
        Closing::new(code, reason)
    }

    /// `subscribe` (`start`): an operation started, or refused with an `error` message.
    async fn subscribe(&mut self, id: String, payload: Value) -> Result<(), Closing> {
        let shared = self.shared;
        let Phase::Ready(auth) = &self.phase else {
            return Err(Closing::new(
                close::UNAUTHORIZED,
                "Unauthorized: send connection_init with a token first",
            ));
        };
        if self.active.contains_key(&id) {
            return Err(Closing::new(
                close::SUBSCRIBER_EXISTS,
                format!("Subscriber for {id} already exists"),
            ));
        }
        if self.active.len() >= shared.limits.max_subscriptions {
            let errors = protocol::errors(
                &format!(
                    "too many subscriptions on this connection (at most {})",
                    shared.limits.max_subscriptions
                ),
                ErrorCode::TooManySubscriptions,
            );
            return self.send(protocol::operation_error(&id, errors));
        }
        let caller = Caller {
            claims: &auth.claims,
            authorization: &auth.authorization,
            address: self.address,
            replay_slots: &self.replay_slots,
        };
        match start(shared, self.protocol, &self.link, &id, payload, caller).await {
            Ok(started) => {
                self.active.insert(id, started);
                Ok(())
            }
            Err(refusal) => {
                let errors = protocol::errors(&refusal.message, refusal.code);
                self.send(protocol::operation_error(&id, errors))
            }
        }
    }

    /// `complete` (`stop`): the operation ends, if it runs.
    fn stop(&mut self, id: &str) -> Result<(), Closing> {
        // graphql-transport-ws: the client's `complete` needs no answer; the legacy protocol
        // confirms a `stop` with `complete`.
        if self.active.remove(id).is_some() && self.protocol == Protocol::LegacyWs {
            self.send(protocol::complete(id))?;
        }
        Ok(())
    }

    /// `ping`: answered with `pong`; one carrying a token renews the connection's.
    async fn ping(&mut self, payload: Option<Value>) -> Result<(), Closing> {
        let token = payload
            .as_ref()
            .and_then(|payload| connection_token(payload, None));
        match (token, &self.phase) {
            (Some(token), Phase::Ready(_)) => self.renew(token).await,
            _ => {
                // A payload is echoed (the protocol allows it), but never one carrying a token
                // (before `connection_init`, a token renews nothing).
                let echoed = payload.filter(|payload| connection_token(payload, None).is_none());
                self.send(protocol::pong(echoed))
            }
        }
    }

    /// Renewal on the open socket: the new token is checked as at `connection_init`, must be
    /// the same user's, and moves the connection's expiry to its own.
    async fn renew(&mut self, token: String) -> Result<(), Closing> {
        let shared = self.shared;
        let renewed = Box::pin(shared.verifier.authenticate(Some(&token)))
            .await
            .map_err(|err| Closing::new(close::FORBIDDEN, auth_reason(&err)))?;
        let Phase::Ready(auth) = &mut self.phase else {
            return Ok(());
        };
        if renewed.user_id != auth.claims.user_id {
            return Err(Closing::new(
                close::FORBIDDEN,
                "Forbidden: the renewal token belongs to another user",
            ));
        }
        let exp = renewed.exp;
        auth.renew(shared, renewed, token);
        self.send(protocol::pong(Some(serde_json::json!({ "exp": exp }))))
    }
}

/// The token of a connection: `connectionParams.Authorization` (or `authorization`), as GraphQL
/// Playground and Apollo send it; else the upgrade request's header.
fn connection_token(payload: &Value, header: Option<&str>) -> Option<String> {
    let from_params = ["Authorization", "authorization"]
        .into_iter()
        .find_map(|key| payload.get(key))
        .or_else(|| {
            // Some clients nest headers: `{"headers": {"Authorization": …}}`.
            let headers = payload.get("headers")?;
            ["Authorization", "authorization"]
                .into_iter()
                .find_map(|key| headers.get(key))
        })
        .and_then(Value::as_str)
        .map(str::to_owned);
    from_params.or_else(|| header.map(str::to_owned))
}

/// The close reason of a refused `connection_init` (at most 123 bytes, so kept short).
fn auth_reason(err: &AuthError) -> String {
    match err {
        AuthError::MissingHeader => {
            "Forbidden: no token; set connectionParams {\"Authorization\": \"Bearer <access token>\"}"
                .to_owned()
        }
        AuthError::NotBearer => {
            "Forbidden: malformed Authorization; expected \"Bearer <access token>\"".to_owned()
        }
        other => format!("Forbidden: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_token_comes_from_connection_params_before_the_header() {
        let params = json!({"Authorization": "Bearer a"});
        assert_eq!(
            connection_token(&params, Some("Bearer b")).as_deref(),
            Some("Bearer a")
        );
        let lower = json!({"authorization": "Bearer c"});
        assert_eq!(connection_token(&lower, None).as_deref(), Some("Bearer c"));
        assert_eq!(
            connection_token(&Value::Null, Some("Bearer b")).as_deref(),
            Some("Bearer b")
        );
        assert_eq!(connection_token(&json!({"Authorization": 5}), None), None);
    }
}
