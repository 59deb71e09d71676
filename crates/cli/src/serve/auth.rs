//! Who may use `userconfig serve`: service tokens, each with scopes, and end-user tokens (JWT,
//! `jwt.rs`) that reach their own user's configuration only; checked before a request reaches
//! a handler (so before any cache or database is touched).
//!
//! | scope | routes |
//! |---|---|
//! | `read` | `GET /v1/users/{id}/config` and its `/events`, `/history`, `/diff`; `GET /v1/changes` (service tokens only) |
//! | `write` (also) | `POST /v1/users/{id}/config/rollback` |
//! | `write` | `PUT`, `PATCH`, `DELETE /v1/users/{id}/config` |
//! | `admin` | `/stats`, `/metrics`, `/readyz`, `/dashboard/data`, and any route not named above |
//! | none | `/healthz`, `/openapi.json`, and `/`, the dashboard's page (static: it shows nothing without `admin`) |
//!
//! The tokens file holds one token a line, `name scopes sha256`: a name for the logs, the
//! scopes comma-separated, and the SHA-256 of the token in hex (the token itself is never
//! stored; `userconfig token` makes one and prints its line). `#` starts a comment. A request
//! presents `Authorization: Bearer <token>`; its hash is compared with every stored one in
//! constant time. A missing or unknown token is 401 with `WWW-Authenticate`, a token without
//! the route's scope 403, a token past its rate (`--rate-per-token`, `rate.rs`) 429. A bearer
//! credential shaped as a JWT (three dot-separated parts) is an end user's: read and write
//! when the route's `{id}` is its `sub`, 403 otherwise.

use std::sync::Arc;

use axum::extract::{FromRequestParts as _, MatchedPath, RawPathParams, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::jwt::{self, Jwt};
use super::rate::Rate;

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    Read,
    Write,
    Admin,
}

impl Scope {
    fn bit(self) -> u8 {
        match self {
            Scope::Read => 1,
            Scope::Write => 2,
            Scope::Admin => 4,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }

    fn parse(name: &str) -> Option<Scope> {
        match name {
            "read" => Some(Scope::Read),
            "write" => Some(Scope::Write),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

/// One service token, as stored.
struct Token {
    name: String,
    hash: [u8; 32],
    scopes: u8,
}

/// The service tokens `serve` accepts, and the rate each may ask at.
pub(crate) struct Tokens {
    tokens: Vec<Token>,
    rate: Option<Rate>,
}

impl Tokens {
    /// Reads a tokens file's text; an error names the line.
    pub(crate) fn parse(text: &str) -> Result<Tokens, String> {
        let mut tokens = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [name, scopes, hash] = fields[..] else {
                return Err(format!(
                    "line {}: expected `name scopes sha256`, found {} fields",
                    n + 1,
                    fields.len()
                ));
            };
            let mut bits = 0;
            for scope in scopes.split(',') {
                let scope = Scope::parse(scope).ok_or_else(|| {
                    format!(
                        "line {}: unknown scope {scope:?} (read, write, admin)",
                        n + 1
                    )
                })?;
                bits |= scope.bit();
            }
            let hash = unhex(hash).ok_or_else(|| {
                format!(
                    "line {}: the third field must be a SHA-256 in hex (64 characters; \
                     `userconfig token` prints it), not a token",
                    n + 1
                )
            })?;
            if tokens.iter().any(|t: &Token| t.name == name) {
                return Err(format!("line {}: the name {name:?} is given twice", n + 1));
            }
            tokens.push(Token {
                name: name.to_owned(),
                hash,
                scopes: bits,
            });
        }
        if tokens.is_empty() {
            return Err("no token in it".into());
        }
        Ok(Tokens { tokens, rate: None })
    }

    /// At most `per_second` requests a second for each token (0: no limit).
    pub(crate) fn limit_rate(mut self, per_second: u32) -> Tokens {
        self.rate = (per_second > 0).then(|| Rate::new(per_second, self.tokens.len()));
        self
    }

    /// The token whose hash is `presented`'s: every stored hash is compared, in constant time
    /// each, whichever matches.
    fn find(&self, presented: &str) -> Option<(usize, &Token)> {
        let hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for (i, token) in self.tokens.iter().enumerate() {
            if constant_time_eq(&token.hash, &hash) {
                found = Some((i, token));
            }
        }
        found
    }
}

/// Who may do what: service tokens, end-user tokens (JWT), both, or neither (open).
#[derive(Default)]
pub(crate) struct Access {
    pub(crate) tokens: Option<Tokens>,
    pub(crate) jwt: Option<Jwt>,
}

impl Access {
    /// Open to whoever reaches the service.
    pub(crate) fn open() -> Access {
        Access::default()
    }

    pub(crate) fn is_open(&self) -> bool {
        self.tokens.is_none() && self.jwt.is_none()
    }
}

/// The scope a request needs: `None` for a route open to everyone (or no route).
fn needed(route: Option<&str>, method: &Method) -> Option<Scope> {
    match route? {
        "/v1/users/{id}/config" if method == Method::GET || method == Method::HEAD => {
            Some(Scope::Read)
        }
        "/v1/users/{id}/config/events"
        | "/v1/users/{id}/config/history"
        | "/v1/users/{id}/config/diff" => Some(Scope::Read),
        "/v1/users/{id}/config/rollback" => Some(Scope::Write),
        // Names every user: a service's (an end user's token has no `{id}` here: refused).
        "/v1/changes" => Some(Scope::Read),
        "/v1/users/{id}/config" => Some(Scope::Write),
        // Every other route behind this check, today's operator routes and any added later
        // without a line here: nobody gets in by default.
        _ => Some(Scope::Admin),
    }
}

/// Who asks, once let in: a service token's name, or `user:` and an end user's subject (its
/// open streams are counted under it). Absent when the service is open.
#[derive(Clone, Debug)]
pub(crate) struct Caller(pub(crate) String);

/// The middleware: the route's scope, or 401 / 403 / 429 before any handler runs.
pub(crate) async fn check(
    State(access): State<Arc<Access>>,
    request: Request,
    next: Next,
) -> Response {
    if access.is_open() {
        return next.run(request).await;
    }
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    let Some(scope) = needed(route, request.method()) else {
        return next.run(request).await;
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|v| v.trim().to_owned());
    let Some(presented) = presented else {
        return ApiError::unauthorized(
            None,
            "this route needs a token: Authorization: Bearer <token>",
        )
        .into_response();
    };
    let (mut parts, body) = request.into_parts();
    let allowed = if jwt::looks_like_jwt(&presented) {
        // The user the route names, decoded as the handler's `Path` decodes it.
        let user = RawPathParams::from_request_parts(&mut parts, &())
            .await
            .ok()
            .and_then(|p| {
                p.iter()
                    .find(|(k, _)| *k == "id")
                    .map(|(_, v)| v.to_owned())
            });
        end_user(access.jwt.as_ref(), &presented, scope, user.as_deref())
    } else {
        service(access.tokens.as_ref(), &presented, scope)
    };
    match allowed {
        Ok(caller) => {
            parts.extensions.insert(caller);
            next.run(Request::from_parts(parts, body)).await
        }
        Err(refused) => refused.into_response(),
    }
}

/// A service token: known, with the route's scope, within its rate.
fn service(tokens: Option<&Tokens>, presented: &str, scope: Scope) -> Result<Caller, ApiError> {
    let Some((index, token)) = tokens.and_then(|t| t.find(presented)) else {
        return Err(ApiError::unauthorized(
            Some("invalid_token"),
            "the token is not one of this service's",
        ));
    };
    if token.scopes & scope.bit() == 0 {
        tracing::info!(token = %token.name, scope = scope.name(), "refused: scope missing");
        return Err(ApiError::forbidden(format!(
            "the token {:?} lacks the {} scope",
            token.name,
            scope.name()
        )));
    }
    if let Some(rate) = tokens.and_then(|t| t.rate.as_ref())
        && let Err(wait) = rate.admit(index)
    {
        return Err(ApiError::rate_limited(wait.as_secs_f64().ceil() as u64));
    }
    Ok(Caller(token.name.clone()))
}

/// An end-user token: valid, and naming the user the route is about (it may read and change
/// that configuration, and reach nothing else).
fn end_user(
    jwt: Option<&Jwt>,
    presented: &str,
    scope: Scope,
    user: Option<&str>,
) -> Result<Caller, ApiError> {
    let Some(jwt) = jwt else {
        return Err(ApiError::unauthorized(
            Some("invalid_token"),
            "this service takes no end-user tokens (JWT)",
        ));
    };
    let subject = jwt
        .verify(presented)
        .map_err(|why| ApiError::unauthorized(Some("invalid_token"), why))?;
    match (scope, user) {
        (Scope::Read | Scope::Write, Some(user)) if user == subject => {
            Ok(Caller(format!("user:{subject}")))
        }
        (Scope::Admin, _) => Err(ApiError::forbidden(
            "an end-user token reaches its own configuration only",
        )),
        _ => {
            tracing::info!(
                scope = scope.name(),
                "refused: an end-user token for another user"
            );
            Err(ApiError::forbidden(
                "an end-user token reaches its own configuration only",
            ))
        }
    }
}

/// A new token (`uc_` and 32 random bytes in hex) and its line for the tokens file.
pub(crate) fn new_token(name: &str, scopes: &str) -> Result<(String, String), String> {
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c == '#') {
        return Err(format!("the name {name:?} must be one word"));
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness: {e}"))?;
    let token = format!("uc_{}", hex(&bytes));
    let line = format!("{name} {scopes} {}", hex(&Sha256::digest(token.as_bytes())));
    // The line must read back as written (scopes checked).
    Tokens::parse(&line)?;
    Ok((token, line))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Whether `a` and `b` are equal, in a time that does not depend on where they differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tokens_file_reads_back_what_token_prints() {
        let (token, line) = new_token("ci", "read,write").unwrap();
        let tokens = Tokens::parse(&format!("# comment\n\n{line}  # trailing\n")).unwrap();
        let (_, found) = tokens.find(&token).unwrap();
        assert_eq!(found.name, "ci");
        assert_eq!(found.scopes, Scope::Read.bit() | Scope::Write.bit());
        assert!(tokens.find("uc_other").is_none());
        assert!(
            !line.contains(&token),
            "the line holds the hash, not the token"
        );
    }

    #[test]
    fn a_bad_tokens_file_names_the_line() {
        for (text, says) in [
            ("ci read", "line 1: expected"),
            ("ci read,fly 00", "line 1: unknown scope \"fly\""),
            ("ci read uc_abc", "line 1: the third field"),
            ("", "no token"),
        ] {
            let error = Tokens::parse(text).err().unwrap();
            assert!(error.contains(says), "{text:?}: {error}");
        }
        let line = new_token("a", "read").unwrap().1;
        let error = Tokens::parse(&format!("{line}\n{line}")).err().unwrap();
        assert!(
            error.contains("line 2: the name \"a\" is given twice"),
            "{error}"
        );
    }

    #[test]
    fn each_route_needs_its_scope() {
        let config = Some("/v1/users/{id}/config");
        assert_eq!(needed(config, &Method::GET), Some(Scope::Read));
        for method in [Method::PUT, Method::PATCH, Method::DELETE] {
            assert_eq!(needed(config, &method), Some(Scope::Write));
        }
        for route in ["/stats", "/metrics", "/readyz", "/dashboard/data"] {
            assert_eq!(needed(Some(route), &Method::GET), Some(Scope::Admin));
        }
        assert_eq!(
            needed(Some("/v1/users/{id}/config/events"), &Method::GET),
            Some(Scope::Read)
        );
        // A route nobody listed here needs the most.
        assert_eq!(needed(Some("/new"), &Method::GET), Some(Scope::Admin));
        assert_eq!(needed(None, &Method::GET), None);
    }
}
