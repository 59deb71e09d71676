//! End-user tokens: a JWT whose `sub` is a user may read and change that user's configuration,
//! and nothing else.
//!
//! Keys: an HS256 shared secret (`--jwt-secret-file`), and RS256 / ES256 public keys from a
//! JWKS file (`--jwks-file`, as an identity provider publishes them), chosen by the token's
//! `kid` (a JWKS of one key needs none). A token is accepted only if it is signed with one of
//! those keys by that key's own algorithm (no `none`, no HS256 signed with a public key), its
//! `iss` and `aud` are the configured ones, it has a `sub`, its `exp` has not passed and its
//! `nbf` (if any) has, each within `--jwt-leeway-secs` of clock skew. Verification is
//! `jsonwebtoken`'s.
//!
//! A token once verified is remembered (by its SHA-256, up to [`REMEMBERED`] tokens, least
//! recently used out) with its `sub` and `exp`, and is not verified again until it expires: an
//! ES256 signature costs some 160 us to check in pure Rust, which a client presenting the same
//! token on every request would otherwise pay each time. The keys are read once at start, so a
//! remembered token is exactly as valid as on its first check, until its `exp`.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use clap::Args;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// Verified tokens remembered, at most.
const REMEMBERED: usize = 10_000;

/// The end-user token options of `userconfig serve`.
#[derive(Clone, Debug, Default, Args)]
pub(crate) struct JwtArgs {
    /// A file holding the HS256 shared secret of end-user tokens (at least 32 bytes; a
    /// trailing newline is not part of it).
    #[arg(long, value_name = "PATH", env = "USERCONFIG_JWT_SECRET_FILE")]
    jwt_secret_file: Option<PathBuf>,
    /// A JWKS file of the RS256 and ES256 keys end-user tokens are signed with.
    #[arg(long, value_name = "PATH", env = "USERCONFIG_JWKS_FILE")]
    jwks_file: Option<PathBuf>,
    /// The `iss` end-user tokens must carry (required with a key).
    #[arg(long, value_name = "ISSUER", env = "USERCONFIG_JWT_ISSUER")]
    jwt_issuer: Option<String>,
    /// The `aud` end-user tokens must carry (required with a key).
    #[arg(long, value_name = "AUDIENCE", env = "USERCONFIG_JWT_AUDIENCE")]
    jwt_audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds (at most 300).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    jwt_leeway_secs: u64,
}

/// A key end-user tokens may be signed with.
struct Key {
    id: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// How end-user tokens are checked.
pub(crate) struct Jwt {
    keys: Vec<Key>,
    issuer: String,
    audience: String,
    leeway: u64,
    /// Tokens verified: their SHA-256, `sub` and `exp`.
    verified: Mutex<lru::LruCache<[u8; 32], (String, u64)>>,
}

/// The claims read from a token (the rest are `jsonwebtoken`'s to check).
#[derive(Deserialize)]
struct Claims {
    /// Optional here so that a token without one is told so (`exp`, `iss` and `aud` are
    /// required by the validation).
    sub: Option<String>,
    /// Required by the validation (read here to know how long it may be remembered).
    exp: Option<u64>,
}

fn remembered() -> Mutex<lru::LruCache<[u8; 32], (String, u64)>> {
    Mutex::new(lru::LruCache::new(
        NonZeroUsize::new(REMEMBERED).expect("not zero"),
    ))
}

impl Jwt {
    /// The configured checks, `None` with no key; a file that cannot be read or used, or a key
    /// without an issuer and an audience, is an error naming it.
    pub(crate) fn load(args: &JwtArgs) -> Result<Option<Jwt>, String> {
        let secret = match &args.jwt_secret_file {
            Some(path) => {
                let mut secret = std::fs::read(path).map_err(|e| {
                    format!("cannot read the JWT secret file {}: {e}", path.display())
                })?;
                while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    secret.pop();
                }
                Some(secret)
            }
            None => None,
        };
        let jwks = match &args.jwks_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read the JWKS file {}: {e}", path.display()))?,
            ),
            None => None,
        };
        if secret.is_none() && jwks.is_none() {
            return Ok(None);
        }
        let (Some(issuer), Some(audience)) = (&args.jwt_issuer, &args.jwt_audience) else {
            return Err("end-user tokens need --jwt-issuer and --jwt-audience".into());
        };
        Jwt::new(
            secret.as_deref(),
            jwks.as_deref(),
            issuer,
            audience,
            args.jwt_leeway_secs,
        )
        .map(Some)
    }

    /// Checks with an HS256 `secret` and the keys of a JWKS document, for tokens of `issuer`
    /// to `audience`, with `leeway` seconds of clock skew (at most 300).
    pub(crate) fn new(
        secret: Option<&[u8]>,
        jwks: Option<&str>,
        issuer: &str,
        audience: &str,
        leeway: u64,
    ) -> Result<Jwt, String> {
        let mut keys = Vec::new();
        if let Some(secret) = secret {
            keys.push(Jwt::secret(secret).map_err(|e| format!("the JWT secret: {e}"))?);
        }
        if let Some(jwks) = jwks {
            keys.extend(Jwt::jwks(jwks).map_err(|e| format!("the JWKS: {e}"))?);
        }
        if keys.is_empty() {
            return Err("end-user tokens need a secret or a JWKS".into());
        }
        if issuer.is_empty() || audience.is_empty() {
            return Err("end-user tokens need an issuer and an audience".into());
        }
        if leeway > 300 {
            return Err("the JWT leeway is at most 300 seconds".into());
        }
        Ok(Jwt {
            keys,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            leeway,
            verified: remembered(),
        })
    }

    /// Checks with these keys, for `issuer` and `audience`.
    #[cfg(test)]
    fn with_keys(keys: Vec<Key>, issuer: &str, audience: &str) -> Jwt {
        Jwt {
            keys,
            issuer: issuer.into(),
            audience: audience.into(),
            leeway: 30,
            verified: remembered(),
        }
    }

    fn secret(secret: &[u8]) -> Result<Key, String> {
        if secret.len() < 32 {
            return Err("an HS256 secret must be at least 32 bytes".into());
        }
        Ok(Key {
            id: None,
            algorithm: Algorithm::HS256,
            key: DecodingKey::from_secret(secret).map_err(|e| e.to_string())?,
        })
    }

    /// The RS256 and ES256 (P-256) keys of a JWKS; any other key is an error, so a file that
    /// holds a shared secret (`oct`) or another algorithm is refused rather than half used.
    fn jwks(text: &str) -> Result<Vec<Key>, String> {
        let set: JwkSet = serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
        if set.keys.is_empty() {
            return Err("the JWKS has no key".into());
        }
        set.keys
            .iter()
            .enumerate()
            .map(|(n, jwk)| {
                let algorithm = match &jwk.algorithm {
                    AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                        Algorithm::ES256
                    }
                    _ => {
                        return Err(format!(
                            "key {n}: only RSA (RS256) and P-256 (ES256) public keys are taken"
                        ));
                    }
                };
                if let Some(declared) = jwk.common.key_algorithm
                    && format!("{declared:?}") != format!("{algorithm:?}")
                {
                    return Err(format!(
                        "key {n}: `alg` is {declared:?}, but the key is for {algorithm:?}"
                    ));
                }
                Ok(Key {
                    id: jwk.common.key_id.clone(),
                    algorithm,
                    key: DecodingKey::from_jwk(jwk).map_err(|e| format!("key {n}: {e}"))?,
                })
            })
            .collect()
    }

    /// The user a token speaks for, or why it is refused (said to the caller: it is about the
    /// caller's own token).
    pub(crate) fn verify(&self, token: &str) -> Result<String, String> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = jsonwebtoken::get_current_timestamp();
        {
            let mut verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
            match verified.get(&hash) {
                Some((sub, exp)) if now <= exp.saturating_add(self.leeway) => {
                    return Ok(sub.clone());
                }
                Some(_) => {
                    verified.pop(&hash);
                    return Err("the token has expired".into());
                }
                None => {}
            }
        }
        let (sub, exp) = self.check(token)?;
        self.verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .put(hash, (sub.clone(), exp));
        Ok(sub)
    }

    /// The signature and claims of a token not seen before: its `sub` and `exp`.
    fn check(&self, token: &str) -> Result<(String, u64), String> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| "not a JWT".to_owned())?;
        let mut candidates = self.keys.iter().filter(|k| k.algorithm == header.alg);
        let key = match &header.kid {
            Some(kid) => candidates.find(|k| k.id.as_deref() == Some(kid.as_str())),
            None => {
                let first = candidates.next();
                // Without a `kid`, only an unambiguous key.
                if candidates.next().is_some() {
                    return Err("the token names no key (`kid`) and several fit".into());
                }
                first
            }
        }
        .ok_or_else(|| format!("no key of this service signs {:?} tokens so", header.alg))?;
        let mut validation = Validation::new(key.algorithm);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = self.leeway;
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &validation).map_err(|e| {
            match e.kind() {
                ErrorKind::ExpiredSignature => "the token has expired",
                ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)",
                ErrorKind::InvalidIssuer => "the token's issuer is not this service's",
                ErrorKind::InvalidAudience => "the token is not for this service (aud)",
                ErrorKind::InvalidSignature => "the token's signature does not verify",
                ErrorKind::MissingRequiredClaim(_) => "the token lacks exp, sub, iss or aud",
                _ => "the token cannot be read",
            }
            .to_owned()
        })?;
        match (data.claims.sub, data.claims.exp) {
            (Some(sub), Some(exp)) if !sub.is_empty() => Ok((sub, exp)),
            _ => Err("the token lacks exp, sub, iss or aud".into()),
        }
    }
}

/// Whether a bearer credential is a JWT (three base64url parts) rather than a service token.
pub(crate) fn looks_like_jwt(credential: &str) -> bool {
    credential.split('.').count() == 3
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn hs256(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET).unwrap(),
        )
        .unwrap()
    }

    fn checks() -> Jwt {
        Jwt::with_keys(vec![Jwt::secret(SECRET).unwrap()], "idp", "userconfig")
    }

    #[test]
    fn a_good_token_names_its_user_and_each_bad_one_says_why() {
        let jwt = checks();
        let good = json!({"sub":"alice","iss":"idp","aud":"userconfig","exp":now()+60});
        assert_eq!(jwt.verify(&hs256(good.clone())), Ok("alice".into()));
        let mut cases = Vec::new();
        for (field, value, says) in [
            ("exp", json!(now() - 120), "expired"),
            ("nbf", json!(now() + 120), "not valid yet"),
            ("iss", json!("other"), "issuer"),
            ("aud", json!("other"), "aud"),
        ] {
            let mut claims = good.clone();
            claims[field] = value;
            cases.push((hs256(claims), says));
        }
        let mut no_sub = good.clone();
        no_sub.as_object_mut().unwrap().remove("sub");
        cases.push((hs256(no_sub), "lacks"));
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &good,
            &EncodingKey::from_secret(b"another secret of thirty-two bytes!").unwrap(),
        )
        .unwrap();
        cases.push((forged, "signature"));
        cases.push(("uc_not.a.jwt".into(), "not a JWT"));
        for (token, says) in cases {
            let why = jwt.verify(&token).unwrap_err();
            assert!(why.contains(says), "{says}: {why}");
        }
        // Within the leeway, an expired token still passes (clock skew).
        let mut skewed = good;
        skewed["exp"] = json!(now() - 5);
        assert!(jwt.verify(&hs256(skewed)).is_ok());
    }

    #[test]
    fn a_remembered_token_is_refused_once_it_expires() {
        let jwt = checks();
        let claims = json!({"sub":"alice","iss":"idp","aud":"userconfig","exp":now()+60});
        let token = hs256(claims);
        assert_eq!(jwt.verify(&token), Ok("alice".into()));
        // Remembered: the same answer without a check…
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        assert!(jwt.verified.lock().unwrap().contains(&hash));
        assert_eq!(jwt.verify(&token), Ok("alice".into()));
        // …until its exp (past the leeway): then refused, and forgotten.
        jwt.verified
            .lock()
            .unwrap()
            .put(hash, ("alice".into(), now() - 31));
        assert!(jwt.verify(&token).unwrap_err().contains("expired"));
        assert!(!jwt.verified.lock().unwrap().contains(&hash));
        // A refused token is never remembered.
        let mut bad = json!({"sub":"alice","iss":"other","aud":"userconfig","exp":now()+60});
        let refused = hs256(bad.take());
        assert!(jwt.verify(&refused).is_err());
        let hash: [u8; 32] = Sha256::digest(refused.as_bytes()).into();
        assert!(!jwt.verified.lock().unwrap().contains(&hash));
    }

    #[test]
    fn only_the_keys_own_algorithm_is_taken() {
        let jwt = checks();
        let claims = json!({"sub":"alice","iss":"idp","aud":"userconfig","exp":now()+60});
        let hs384 = encode(
            &Header::new(Algorithm::HS384),
            &claims,
            &EncodingKey::from_secret(SECRET).unwrap(),
        )
        .unwrap();
        assert!(jwt.verify(&hs384).unwrap_err().contains("no key"));
        // alg none: refused before any key is tried.
        let none = format!(
            "{}.{}.",
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0", "eyJzdWIiOiJhbGljZSJ9"
        );
        assert!(jwt.verify(&none).is_err());
    }

    #[test]
    fn a_jwks_takes_rsa_and_p256_public_keys_only() {
        let ec = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"e1","alg":"ES256",
            "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;
        let keys = Jwt::jwks(ec).unwrap();
        assert_eq!(
            (keys[0].algorithm, keys[0].id.as_deref()),
            (Algorithm::ES256, Some("e1"))
        );
        let oct = r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#;
        let refused = |text: &str| Jwt::jwks(text).err().unwrap();
        assert!(refused(oct).contains("only RSA"));
        assert!(refused(r#"{"keys":[]}"#).contains("no key"));
        let mismatch = ec.replace("\"ES256\"", "\"RS256\"");
        assert!(refused(&mismatch).contains("`alg`"));
        assert!(Jwt::secret(b"short").is_err());
        let _ = refused;
    }

    #[test]
    fn a_credential_is_a_jwt_by_its_shape() {
        assert!(looks_like_jwt("a.b.c"));
        assert!(!looks_like_jwt("uc_0123abcd"));
    }
}
