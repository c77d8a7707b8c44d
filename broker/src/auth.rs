//! Who may connect: users with argon2 password hashes and roles, from one
//! TOML auth file shared by the MQTT front end and the WebSocket bridge.
//!
//! rumqttd only knows a static user/password map and closes the socket on a
//! bad login; Axion answers with the proper CONNACK code and gives each
//! login the [`Permissions`] of its roles. Format (see the broker README):
//!
//! ```toml
//! deny_subscribe = ["test/nosubscribe"]   # nobody may subscribe here
//! deny_publish = []
//!
//! [roles.service]
//! publish = ["axion/p/#"]
//! subscribe = ["axion/p/#", "$share/+/axion/p/queue/+/tasks"]
//!
//! [roles.admin]
//! superuser = true
//!
//! [users.alice]
//! password = "$argon2id$v=19$..."         # `axion passwd`
//! tokens = ["$argon2id$v=19$..."]         # bridge bearer `alice.<secret>`
//! roles = ["service"]
//!
//! [anonymous]                              # optional: clients without a user name
//! roles = ["service"]
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use serde::Deserialize;

use crate::acl::{Denied, DenyList, Permissions, Rule};

/// The user name of Axion's own components inside `axion serve`.
pub const INTERNAL_USER: &str = "axion-internal";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the auth file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid auth file: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("invalid auth file: {0}")]
    Invalid(String),
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    #[serde(default)]
    deny_subscribe: Vec<String>,
    #[serde(default)]
    deny_publish: Vec<String>,
    #[serde(default)]
    roles: HashMap<String, RoleEntry>,
    #[serde(default)]
    users: HashMap<String, UserEntry>,
    anonymous: Option<AnonymousEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleEntry {
    #[serde(default)]
    superuser: bool,
    /// May connect with the client ids of Axion's own components
    /// (`axion-…`): for a queue owner, bridge, worker or heartbeat
    /// sidecar run on its own against this broker.
    #[serde(default)]
    axion_components: bool,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    password: Option<String>,
    #[serde(default)]
    tokens: Vec<String>,
    #[serde(default)]
    roles: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AnonymousEntry {
    roles: Vec<String>,
}

struct User {
    password: Option<String>,
    tokens: Vec<String>,
    perms: Arc<Permissions>,
}

/// Refusals and denials since start, for logs and tests.
#[derive(Debug, Default)]
pub struct Audit {
    pub refused_connects: AtomicU64,
    /// Connections refused for their client id: another user's session,
    /// or an id reserved to Axion's own components.
    pub refused_client_ids: AtomicU64,
    pub denied_publishes: AtomicU64,
    pub denied_subscribes: AtomicU64,
    /// Messages on a `deny_subscribe` topic withheld from a subscriber
    /// whose wider filter matched them.
    pub withheld_deliveries: AtomicU64,
}

/// An authenticated client: its user name (none if anonymous) and rules.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user: Option<String>,
    pub perms: Arc<Permissions>,
}

/// Why a login failed; maps to CONNACK 0x04/0x86 and 0x05/0x87.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginError {
    /// Unknown user or wrong password (or token).
    BadCredentials,
    /// No credentials and no anonymous access.
    NotAuthorized,
}

impl LoginError {
    pub fn as_str(self) -> &'static str {
        match self {
            LoginError::BadCredentials => "bad user name or password",
            LoginError::NotAuthorized => "credentials required",
        }
    }
}

/// The loaded auth file (plus the internal credential of `axion serve`).
pub struct Auth {
    users: HashMap<String, User>,
    anonymous: Option<Arc<Permissions>>,
    deny: DenyList,
    internal_secret: Option<String>,
    pub audit: Audit,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("users", &self.users.len())
            .field("anonymous", &self.anonymous.is_some())
            .finish_non_exhaustive()
    }
}

fn rules(role: &str, list: &[String]) -> Result<Vec<Rule>, AuthError> {
    list.iter()
        .map(|r| {
            Rule::new(r).map_err(|why| AuthError::Invalid(format!("role {role:?}: {r:?}: {why}")))
        })
        .collect()
}

impl Auth {
    pub fn load(path: &Path) -> Result<Auth, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Auth::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Auth, AuthError> {
        let file: FileFormat = toml::from_str(text)?;
        let mut roles = HashMap::new();
        for (name, role) in &file.roles {
            roles.insert(
                name.clone(),
                Permissions {
                    superuser: role.superuser,
                    components: role.axion_components,
                    publish: rules(name, &role.publish)?,
                    subscribe: rules(name, &role.subscribe)?,
                },
            );
        }
        let union = |who: &str, names: &[String]| -> Result<Arc<Permissions>, AuthError> {
            let mut perms = Permissions::default();
            for name in names {
                let role = roles.get(name).ok_or_else(|| {
                    AuthError::Invalid(format!("{who} has the unknown role {name:?}"))
                })?;
                perms.superuser |= role.superuser;
                perms.components |= role.components;
                perms.publish.extend(role.publish.iter().cloned());
                perms.subscribe.extend(role.subscribe.iter().cloned());
            }
            Ok(Arc::new(perms))
        };
        let mut users = HashMap::new();
        for (name, user) in file.users {
            if name == INTERNAL_USER {
                return Err(AuthError::Invalid(format!(
                    "the user name {INTERNAL_USER:?} is reserved"
                )));
            }
            for hash in user.password.iter().chain(&user.tokens) {
                PasswordHash::new(hash).map_err(|e| {
                    AuthError::Invalid(format!("user {name:?}: not a PHC hash string: {e}"))
                })?;
            }
            let perms = union(&format!("user {name:?}"), &user.roles)?;
            users.insert(
                name,
                User {
                    password: user.password,
                    tokens: user.tokens,
                    perms,
                },
            );
        }
        let anonymous = file
            .anonymous
            .map(|a| union("anonymous", &a.roles))
            .transpose()?;
        Ok(Auth {
            users,
            anonymous,
            deny: DenyList {
                publish: rules("deny_publish", &file.deny_publish)?,
                subscribe: rules("deny_subscribe", &file.deny_subscribe)?,
            },
            internal_secret: None,
            audit: Audit::default(),
        })
    }

    /// Lets [`INTERNAL_USER`] in with `secret` as a superuser: `axion
    /// serve`'s own components (queue owner, bridge, heartbeat, janitor).
    pub fn with_internal_secret(mut self, secret: String) -> Auth {
        self.internal_secret = Some(secret);
        self
    }

    /// Checks an MQTT login. Slow on purpose (argon2): call it off the
    /// async threads.
    pub fn login(
        &self,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<Principal, LoginError> {
        let Some(name) = username.filter(|u| !u.is_empty()) else {
            return match &self.anonymous {
                Some(perms) => Ok(Principal {
                    user: None,
                    perms: perms.clone(),
                }),
                None => Err(LoginError::NotAuthorized),
            };
        };
        let password = password.unwrap_or_default();
        if name == INTERNAL_USER {
            let ok = self
                .internal_secret
                .as_deref()
                .is_some_and(|s| constant_time_eq(s.as_bytes(), password));
            return if ok {
                Ok(Principal {
                    user: Some(name.to_string()),
                    perms: Arc::new(Permissions {
                        superuser: true,
                        ..Permissions::default()
                    }),
                })
            } else {
                Err(LoginError::BadCredentials)
            };
        }
        let user = self.users.get(name).ok_or(LoginError::BadCredentials)?;
        let hash = user.password.as_deref().ok_or(LoginError::BadCredentials)?;
        if verify(hash, password) {
            Ok(Principal {
                user: Some(name.to_string()),
                perms: user.perms.clone(),
            })
        } else {
            Err(LoginError::BadCredentials)
        }
    }

    /// Checks a bridge bearer token `<user>.<secret>` against the user's
    /// token hashes. Slow on purpose (argon2).
    pub fn token(&self, token: &str) -> Result<Principal, LoginError> {
        let (name, secret) = token.split_once('.').ok_or(LoginError::BadCredentials)?;
        let user = self.users.get(name).ok_or(LoginError::BadCredentials)?;
        if user.tokens.iter().any(|h| verify(h, secret.as_bytes())) {
            Ok(Principal {
                user: Some(name.to_string()),
                perms: user.perms.clone(),
            })
        } else {
            Err(LoginError::BadCredentials)
        }
    }

    /// May `p` connect as `client_id`? Ids starting `axion-` name Axion's
    /// own components (the queue owner's outlet, heartbeat records and
    /// wills hang on them): only the internal user, superusers and roles
    /// with `axion_components` may use them.
    pub fn may_use_client_id(&self, p: &Principal, client_id: &str) -> Result<(), Denied> {
        let reserved = client_id.starts_with(crate::names::OWN_CLIENT_PREFIX);
        if reserved && !(p.perms.superuser || p.perms.components) {
            self.audit
                .refused_client_ids
                .fetch_add(1, Ordering::Relaxed);
            return Err(Denied::ReservedClientId);
        }
        Ok(())
    }

    pub fn may_publish(&self, p: &Principal, client_id: &str, topic: &str) -> Result<(), Denied> {
        let r = p
            .perms
            .may_publish(&self.deny, client_id, p.user.as_deref(), topic);
        if r.is_err() {
            self.audit.denied_publishes.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Whether a message on `topic` must be withheld from every
    /// subscriber: a subscription is refused only when a deny rule covers
    /// its whole filter, so a wider filter (`#`, `+/…`, `$share/g/…`) that
    /// merely overlaps one is granted and its denied topics are dropped
    /// here, at delivery, live and retained alike. Cheap when the deny
    /// list is empty, as it usually is.
    pub fn withholds(&self, topic: &str) -> bool {
        if self.deny.subscribe.is_empty() {
            return false;
        }
        let denied = self.deny.subscribe.iter().any(|r| r.matches(topic));
        if denied {
            self.audit
                .withheld_deliveries
                .fetch_add(1, Ordering::Relaxed);
        }
        denied
    }

    pub fn may_subscribe(
        &self,
        p: &Principal,
        client_id: &str,
        filter: &str,
    ) -> Result<(), Denied> {
        let r = p
            .perms
            .may_subscribe(&self.deny, client_id, p.user.as_deref(), filter);
        if r.is_err() {
            self.audit.denied_subscribes.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

fn verify(hash: &str, secret: &[u8]) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| Argon2::default().verify_password(secret, &h).is_ok())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An argon2id PHC hash line for the auth file.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// A random secret (for the internal credential and new bridge tokens).
pub fn random_secret() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logins_and_tokens() {
        let pw = hash_password("s3cret").unwrap();
        let tok = hash_password("t0k").unwrap();
        let file = format!(
            "[roles.r]\npublish = [\"a/#\"]\n[users.alice]\npassword = \"{pw}\"\ntokens = [\"{tok}\"]\nroles = [\"r\"]\n"
        );
        let auth = Auth::parse(&file).unwrap().with_internal_secret("x".into());
        assert!(auth.login(Some("alice"), Some(b"s3cret")).is_ok());
        assert_eq!(
            auth.login(Some("alice"), Some(b"nope")).unwrap_err(),
            LoginError::BadCredentials
        );
        assert_eq!(
            auth.login(None, None).unwrap_err(),
            LoginError::NotAuthorized
        );
        assert!(
            auth.login(Some(INTERNAL_USER), Some(b"x"))
                .unwrap()
                .perms
                .superuser
        );
        assert!(auth.token("alice.t0k").is_ok());
        assert!(auth.token("alice.bad").is_err());
        assert!(Auth::parse("[users.bob]\nroles = [\"missing\"]\n").is_err());
    }
}
