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
//!
//! Guessing is made slow and blind: every failed check costs one argon2
//! verification, an unknown user's included (against a dummy hash with the
//! file's parameters), so the time taken does not tell which user names
//! exist; and each address gets a few failures before a backoff refuses its
//! logins unchecked (see [`crate::login_limit`]). The limit is one table in
//! the `Auth` that MQTT and the bridge share: switching doors gains nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params};
use serde::Deserialize;
use tracing::{debug, warn};

use crate::acl::{Denied, DenyList, Permissions, Rule};
use crate::login_limit::{Attempt, Failure, LoginLimiter, LoginLimits, Throttled};

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
    /// Logins whose credentials were checked and found wrong (or missing).
    pub refused_connects: AtomicU64,
    /// Connections refused for their client id: another user's session,
    /// or an id reserved to Axion's own components.
    pub refused_client_ids: AtomicU64,
    /// Logins refused unchecked: their address was in backoff after too
    /// many failures, or had too many checks running.
    pub throttled_logins: AtomicU64,
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
    /// What the auth file says; replaced whole by [`Auth::reload`].
    rules: RwLock<Arc<Rules>>,
    /// The user each heartbeat topic belongs to (see `claim_heartbeat`).
    heartbeat_owners: std::sync::Mutex<HashMap<String, Option<String>>>,
    internal_secret: Option<String>,
    limiter: LoginLimiter,
    pub audit: Audit,
}

/// The contents of one auth file.
struct Rules {
    users: HashMap<String, User>,
    anonymous: Option<Arc<Permissions>>,
    deny: DenyList,
    /// Checked when the user is unknown or has no hash to check.
    dummy_hash: String,
}

/// What a reload changed, for the log line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    pub users_added: Vec<String>,
    pub users_removed: Vec<String>,
    /// Users whose password, tokens or roles changed.
    pub users_changed: Vec<String>,
    pub deny_lists_changed: bool,
    pub anonymous_changed: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("users", &self.rules().users.len())
            .field("anonymous", &self.rules().anonymous.is_some())
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
        Ok(Auth {
            rules: RwLock::new(Arc::new(Rules::parse(text)?)),
            heartbeat_owners: std::sync::Mutex::new(HashMap::new()),
            internal_secret: None,
            limiter: LoginLimiter::new(LoginLimits::default()),
            audit: Audit::default(),
        })
    }

    /// The rules for a check on the hot path: a read lock, no copy.
    fn rules_now(&self) -> std::sync::RwLockReadGuard<'_, Arc<Rules>> {
        self.rules.read().unwrap_or_else(|p| p.into_inner())
    }

    fn rules(&self) -> Arc<Rules> {
        self.rules.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads the auth file at `path` again and puts it in force for every
    /// login and check from now on; a file that does not parse changes
    /// nothing. Connections keep the rights they logged in with; the deny
    /// lists apply to everyone at once.
    pub fn reload(&self, path: &Path) -> Result<Reloaded, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let new = Arc::new(Rules::parse(&text)?);
        let mut slot = self.rules.write().unwrap_or_else(|p| p.into_inner());
        let old = std::mem::replace(&mut *slot, new.clone());
        drop(slot);
        let mut changes = Reloaded::default();
        for (name, user) in &new.users {
            match old.users.get(name) {
                None => changes.users_added.push(name.clone()),
                Some(was) if !was.same_as(user) => changes.users_changed.push(name.clone()),
                Some(_) => {}
            }
        }
        changes.users_removed = old
            .users
            .keys()
            .filter(|name| !new.users.contains_key(*name))
            .cloned()
            .collect();
        for list in [
            &mut changes.users_added,
            &mut changes.users_removed,
            &mut changes.users_changed,
        ] {
            list.sort();
        }
        changes.deny_lists_changed = format!("{:?}", old.deny) != format!("{:?}", new.deny);
        changes.anonymous_changed =
            format!("{:?}", old.anonymous) != format!("{:?}", new.anonymous);
        Ok(changes)
    }
}

impl User {
    fn same_as(&self, other: &User) -> bool {
        self.password == other.password
            && self.tokens == other.tokens
            && format!("{:?}", self.perms) == format!("{:?}", other.perms)
    }
}

impl Rules {
    fn parse(text: &str) -> Result<Rules, AuthError> {
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
        let dummy_hash = dummy_hash(
            users
                .values()
                .flat_map(|u| u.password.iter().chain(&u.tokens))
                .map(String::as_str),
        )?;
        Ok(Rules {
            users,
            anonymous,
            deny: DenyList {
                publish: rules("deny_publish", &file.deny_publish)?,
                subscribe: rules("deny_subscribe", &file.deny_subscribe)?,
            },
            dummy_hash,
        })
    }
}

impl Auth {
    /// Limits failed logins per address with `limits` instead of the defaults.
    pub fn with_login_limits(mut self, limits: LoginLimits) -> Auth {
        self.limiter = LoginLimiter::new(limits);
        self
    }

    /// Call before checking `user`'s credentials from `peer` (not for
    /// [`INTERNAL_USER`], which is never limited): refuses at once, without
    /// argon2, an address in backoff or with too many checks running.
    /// Cheap enough for the async threads. Settle the [`Attempt`] with
    /// [`Auth::login_failed`] or [`Attempt::succeeded`].
    pub fn admit(&self, peer: IpAddr, user: &str) -> Result<Attempt<'_>, Throttled> {
        self.limiter.begin(peer).inspect_err(|throttled| {
            self.audit.throttled_logins.fetch_add(1, Ordering::Relaxed);
            // A flood logs its start (below) at warn; each refusal at debug.
            match throttled {
                Throttled::Backoff { retry_in, failures } => {
                    debug!(%peer, user, failures, retry_in_ms = retry_in.as_millis() as u64, "login refused unchecked: address in backoff")
                }
                Throttled::Busy { in_flight } => {
                    debug!(%peer, user, in_flight, "login refused unchecked: too many checks running for this address")
                }
            }
        })
    }

    /// Counts a failed check against its address; logs the backoff it starts.
    pub fn login_failed(&self, attempt: Attempt<'_>, peer: IpAddr, user: &str) -> Failure {
        let failure = attempt.failed();
        if let Some(backoff) = failure.backoff {
            warn!(%peer, user, failures = failure.failures, backoff_ms = backoff.as_millis() as u64, "too many failed logins from this address: refusing its logins during the backoff");
        }
        failure
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
        let rules = self.rules();
        let Some(name) = username.filter(|u| !u.is_empty()) else {
            return match &rules.anonymous {
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
        let found = rules
            .users
            .get(name)
            .and_then(|u| u.password.as_deref().map(|hash| (u, hash)));
        match found {
            Some((user, hash)) if verify(hash, password) => Ok(Principal {
                user: Some(name.to_string()),
                perms: user.perms.clone(),
            }),
            Some(_) => Err(LoginError::BadCredentials),
            None => {
                // As slow as a wrong password, or timing tells who exists.
                std::hint::black_box(verify(&rules.dummy_hash, password));
                Err(LoginError::BadCredentials)
            }
        }
    }

    /// Checks a bridge bearer token `<user>.<secret>` against the user's
    /// token hashes. Slow on purpose (argon2): an unknown user, one without
    /// tokens and a token without a user name cost one check, as a wrong
    /// token of a user with one token does.
    pub fn token(&self, token: &str) -> Result<Principal, LoginError> {
        let (name, secret) = token.split_once('.').unwrap_or(("", token));
        let rules = self.rules();
        let user = rules.users.get(name).filter(|u| !u.tokens.is_empty());
        let Some(user) = user else {
            std::hint::black_box(verify(&rules.dummy_hash, secret.as_bytes()));
            return Err(LoginError::BadCredentials);
        };
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
        let reserved = client_id.starts_with(axion_wire::ids::OWN_PREFIX);
        if reserved && !(p.perms.superuser || p.perms.components) {
            self.audit
                .refused_client_ids
                .fetch_add(1, Ordering::Relaxed);
            return Err(Denied::ReservedClientId);
        }
        Ok(())
    }

    pub fn may_publish(&self, p: &Principal, client_id: &str, topic: &str) -> Result<(), Denied> {
        let mut r =
            p.perms
                .may_publish(&self.rules_now().deny, client_id, p.user.as_deref(), topic);
        if r.is_ok() && !p.perms.superuser && crate::acl::is_heartbeat_topic(topic) {
            r = self.claim_heartbeat(topic, p.user.as_deref());
        }
        if r.is_err() {
            self.audit.denied_publishes.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// A heartbeat topic belongs to the first user that writes it (its
    /// record, or a will aimed at it) for as long as this broker runs: the
    /// instance's client id alone is not enough, since another user with a
    /// component role could take that id while the instance is away.
    fn claim_heartbeat(&self, topic: &str, user: Option<&str>) -> Result<(), Denied> {
        let mut owners = self
            .heartbeat_owners
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match owners.get(topic) {
            Some(owner) if owner.as_deref() != user => Err(Denied::ForeignHeartbeat),
            Some(_) => Ok(()),
            None => {
                owners.insert(topic.to_string(), user.map(str::to_string));
                Ok(())
            }
        }
    }

    /// Whether a message on `topic` must be withheld from every
    /// subscriber: a subscription is refused only when a deny rule covers
    /// its whole filter, so a wider filter (`#`, `+/…`, `$share/g/…`) that
    /// merely overlaps one is granted and its denied topics are dropped
    /// here, at delivery, live and retained alike. Cheap when the deny
    /// list is empty, as it usually is.
    pub fn withholds(&self, topic: &str) -> bool {
        let rules = self.rules_now();
        if rules.deny.subscribe.is_empty() {
            return false;
        }
        let denied = rules.deny.subscribe.iter().any(|r| r.matches(topic));
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
            .may_subscribe(&self.rules_now().deny, client_id, p.user.as_deref(), filter);
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

/// A hash of a random secret with the argon2 algorithm and parameters most
/// of `hashes` use (`axion passwd`'s if none is argon2), made once per
/// loaded file: checking a login against it costs what checking a real
/// hash costs.
fn dummy_hash<'a>(hashes: impl Iterator<Item = &'a str>) -> Result<String, AuthError> {
    let mut seen: HashMap<String, (usize, PasswordHash<'a>)> = HashMap::new();
    for hash in hashes.filter_map(|h| PasswordHash::new(h).ok()) {
        // Only what argon2 can check: anything else fails fast anyway.
        if Algorithm::try_from(hash.algorithm).is_err() || Params::try_from(&hash).is_err() {
            continue;
        }
        let kind = format!("{}${:?}${}", hash.algorithm, hash.version, hash.params);
        seen.entry(kind).or_insert((0, hash)).0 += 1;
    }
    // Ties go to the smaller key, so the choice does not vary by run.
    let model = seen
        .into_iter()
        .max_by(|(ka, (na, _)), (kb, (nb, _))| na.cmp(nb).then(kb.cmp(ka)))
        .map(|(_, (_, hash))| hash);
    let secret = random_secret();
    let Some(model) = model else {
        return hash_password(&secret);
    };
    let salt = SaltString::generate(&mut OsRng);
    let hashed = Params::try_from(&model).and_then(|params| {
        Argon2::default().hash_password_customized(
            secret.as_bytes(),
            Some(model.algorithm),
            model.version,
            params,
            &salt,
        )
    });
    hashed
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
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

    #[test]
    fn the_dummy_hash_costs_what_the_files_hashes_cost() {
        let params_of = |hash: &str| PasswordHash::new(hash).unwrap().params.to_string();
        let cheap = Argon2::new(
            Algorithm::Argon2id,
            argon2::Version::V0x13,
            Params::new(8 * 1024, 1, 1, None).unwrap(),
        )
        .hash_password(b"pw", &SaltString::generate(&mut OsRng))
        .unwrap()
        .to_string();
        let auth = Auth::parse(&format!("[users.a]\npassword = \"{cheap}\"\n")).unwrap();
        assert_eq!(params_of(&auth.rules().dummy_hash), params_of(&cheap));
        assert!(auth.login(Some("nobody"), Some(b"pw")).is_err());
        // No hash in the file: those `axion passwd` makes.
        let auth = Auth::parse("").unwrap();
        assert_eq!(
            params_of(&auth.rules().dummy_hash),
            params_of(&hash_password("x").unwrap())
        );
    }
}
