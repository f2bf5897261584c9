//! Bootstrap tokens: the credential a workload presents to the control plane
//! to get its first certificate, bound to one SPIFFE identity.
//!
//! A secret is `pylon_` and 64 hex characters (32 bytes from the system
//! random source). Only its SHA-256 is stored, as the key of `tokens`, so
//! the file never holds a secret; looking a secret up means hashing it and
//! finding the hash, so no secret is ever compared byte by byte. A token
//! also has a public `id` (12 hex characters) to list and revoke it by.
//!
//! Not here: the default TTL (the API's), who may create tokens, and removal
//! of expired tokens (they stay listed, and never verify).

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{ReadableTable, TableDefinition, WriteTransaction};
use ring::rand::SecureRandom;

use super::{Store, StoreError, corrupt};

const TOKENS: TableDefinition<'static, &[u8; 32], &str> = TableDefinition::new("tokens");
const TOKEN_IDS: TableDefinition<'static, &str, &[u8; 32]> = TableDefinition::new("token_ids");
/// The deny list: a workload identity and when it was last revoked (Unix
/// seconds). A credential of that identity authorized at or before that
/// moment is refused ([`Store::revocations`]).
const REVOKED_IDENTITIES: TableDefinition<'static, &str, i64> =
    TableDefinition::new("revoked_identities");

const SECRET_PREFIX: &str = "pylon_";
const SECRET_BYTES: usize = 32;
const ID_BYTES: usize = 6;

/// A token as listed: never its secret or hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub id: String,
    /// The SPIFFE ID the token's holder may get a certificate for.
    pub identity: String,
    pub expires_at: SystemTime,
    /// Good for one use ([`Store::consume_token`]) only.
    pub once: bool,
    /// A `once` token has been consumed.
    pub used: bool,
    pub revoked: bool,
}

impl TokenInfo {
    /// Known, not revoked, not expired (`now < expires_at`), and not a
    /// `once` token already used.
    pub fn is_valid(&self, now: SystemTime) -> bool {
        !self.revoked && now < self.expires_at && !(self.once && self.used)
    }
}

pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(TOKENS)?;
    txn.open_table(TOKEN_IDS)?;
    txn.open_table(REVOKED_IDENTITIES)?;
    Ok(())
}

impl Store {
    /// Creates a token for `identity` (`spiffe://<trust domain>/ns/<ns>/sa/<sa>`)
    /// that expires at `now + ttl`; returns it and its secret, which is shown
    /// this once and never stored. `BadRequest` for another identity shape or
    /// a zero TTL.
    pub fn create_token(
        &self,
        identity: &str,
        ttl: Duration,
        once: bool,
        now: SystemTime,
    ) -> Result<(TokenInfo, String), StoreError> {
        check_identity(identity)?;
        if ttl.is_zero() {
            return Err(StoreError::BadRequest(
                "a token's TTL must not be zero".into(),
            ));
        }
        let expires_at = now
            .checked_add(ttl)
            .filter(|t| t.duration_since(UNIX_EPOCH).is_ok())
            .ok_or_else(|| StoreError::BadRequest(format!("TTL {ttl:?} is out of range")))?;
        self.write(|txn| {
            let mut tokens = txn.open_table(TOKENS)?;
            let mut ids = txn.open_table(TOKEN_IDS)?;
            // 48-bit ids and 256-bit secrets: a collision is a freak, retried.
            for _ in 0..8 {
                let secret = format!("{SECRET_PREFIX}{}", hex(&self.random::<SECRET_BYTES>()?));
                let id = hex(&self.random::<ID_BYTES>()?);
                let hash = hash(&secret);
                if ids.get(id.as_str())?.is_some() || tokens.get(&hash)?.is_some() {
                    continue;
                }
                let info = TokenInfo {
                    id,
                    identity: identity.to_string(),
                    expires_at,
                    once,
                    used: false,
                    revoked: false,
                };
                tokens.insert(&hash, encode(&info)?.as_str())?;
                ids.insert(info.id.as_str(), &hash)?;
                tracing::info!(id = %info.id, identity, once, "bootstrap token created");
                return Ok(((info, secret), true));
            }
            Err(StoreError::Db("could not draw an unused token id".into()))
        })
    }

    /// The token whose secret this is, if it is valid now
    /// ([`TokenInfo::is_valid`]).
    pub fn verify_token(
        &self,
        secret: &str,
        now: SystemTime,
    ) -> Result<Option<TokenInfo>, StoreError> {
        if !looks_like_secret(secret) {
            return Ok(None);
        }
        let txn = self.read()?;
        let table = txn.open_table(TOKENS)?;
        let Some(record) = table.get(&hash(secret))? else {
            return Ok(None);
        };
        let info = decode(record.value())?;
        Ok(info.is_valid(now).then_some(info))
    }

    /// Like [`Store::verify_token`], and marks a `once` token used, in one
    /// write transaction: of two concurrent consumers of a `once` token,
    /// exactly one gets it. Returns the token as it is afterwards.
    pub fn consume_token(
        &self,
        secret: &str,
        now: SystemTime,
    ) -> Result<Option<TokenInfo>, StoreError> {
        if !looks_like_secret(secret) {
            return Ok(None);
        }
        let hash = hash(secret);
        self.write(|txn| {
            let mut table = txn.open_table(TOKENS)?;
            let record = table.get(&hash)?.map(|g| g.value().to_string());
            let Some(mut info) = record.as_deref().map(decode).transpose()? else {
                return Ok((None, false));
            };
            if !info.is_valid(now) {
                return Ok((None, false));
            }
            if !info.once {
                return Ok((Some(info), false));
            }
            info.used = true;
            table.insert(&hash, encode(&info)?.as_str())?;
            Ok((Some(info), true))
        })
    }

    /// Every token, expired and revoked ones included, by expiry then id.
    pub fn list_tokens(&self) -> Result<Vec<TokenInfo>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(TOKENS)?;
        let mut tokens = Vec::new();
        for item in table.iter()? {
            let (_, record) = item?;
            tokens.push(decode(record.value())?);
        }
        tokens.sort_by(|a, b| (a.expires_at, &a.id).cmp(&(b.expires_at, &b.id)));
        Ok(tokens)
    }

    /// Revokes the token with this id and puts its identity on the deny
    /// list as of `now`, so that certificates it (or any credential of that
    /// identity) obtained up to now can no longer renew. Returns the
    /// token's identity, `None` when there is no such token. Revoking a
    /// revoked token is fine (the deny entry moves to `now`).
    pub fn revoke_token(&self, id: &str, now: SystemTime) -> Result<Option<String>, StoreError> {
        self.write(|txn| {
            let hash = txn.open_table(TOKEN_IDS)?.get(id)?.map(|g| *g.value());
            let Some(hash) = hash else {
                return Ok((None, false));
            };
            let mut table = txn.open_table(TOKENS)?;
            let record = table.get(&hash)?.map(|g| g.value().to_string());
            let Some(record) = record else {
                return Err(corrupt(format!("token id {id:?} has no token")));
            };
            let mut info = decode(&record)?;
            if !info.revoked {
                info.revoked = true;
                table.insert(&hash, encode(&info)?.as_str())?;
            }
            deny(txn, &info.identity, now)?;
            tracing::info!(id, identity = %info.identity, "bootstrap token revoked");
            Ok((Some(info.identity), true))
        })
    }

    /// Revokes a workload identity: every bootstrap token bound to it, and
    /// every credential of it authorized up to `now` (its certificates
    /// cannot renew). Returns how many tokens this revoked.
    pub fn revoke_identity(&self, identity: &str, now: SystemTime) -> Result<usize, StoreError> {
        check_identity(identity)?;
        self.write(|txn| {
            let mut table = txn.open_table(TOKENS)?;
            let mut revoked = Vec::new();
            for item in table.iter()? {
                let (hash, record) = item?;
                let info = decode(record.value())?;
                if info.identity == identity && !info.revoked {
                    revoked.push((
                        *hash.value(),
                        TokenInfo {
                            revoked: true,
                            ..info
                        },
                    ));
                }
            }
            for (hash, info) in &revoked {
                table.insert(hash, encode(info)?.as_str())?;
            }
            deny(txn, identity, now)?;
            tracing::info!(
                identity,
                tokens = revoked.len(),
                "workload identity revoked"
            );
            Ok((revoked.len(), true))
        })
    }

    /// The deny list: each revoked identity and when it was last revoked
    /// (Unix seconds).
    pub fn revocations(&self) -> Result<HashMap<String, i64>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(REVOKED_IDENTITIES)?;
        let mut out = HashMap::new();
        for item in table.iter()? {
            let (identity, at) = item?;
            out.insert(identity.value().to_string(), at.value());
        }
        Ok(out)
    }

    fn random<const N: usize>(&self) -> Result<[u8; N], StoreError> {
        let mut bytes = [0; N];
        self.rng
            .fill(&mut bytes)
            .map_err(|_| StoreError::Db("the system random source failed".into()))?;
        Ok(bytes)
    }
}

/// Puts `identity` on the deny list as of `now` (never earlier than an
/// entry already there).
fn deny(txn: &WriteTransaction, identity: &str, now: SystemTime) -> Result<(), StoreError> {
    let at = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let mut table = txn.open_table(REVOKED_IDENTITIES)?;
    let previous = table.get(identity)?.map(|g| g.value());
    table.insert(identity, previous.map_or(at, |p| p.max(at)))?;
    Ok(())
}

/// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`, with the
/// characters SPIFFE allows in a trust domain and in path segments.
fn check_identity(identity: &str) -> Result<(), StoreError> {
    match pylon_proto::spiffe::parse(identity) {
        Some(_) => Ok(()),
        _ => Err(StoreError::BadRequest(format!(
            "invalid workload identity {identity:?}: expected spiffe://<trust domain>/ns/<namespace>/sa/<service account>"
        ))),
    }
}

fn looks_like_secret(secret: &str) -> bool {
    secret.strip_prefix(SECRET_PREFIX).is_some_and(|hex| {
        hex.len() == 2 * SECRET_BYTES && hex.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

fn hash(secret: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

fn encode(info: &TokenInfo) -> Result<String, StoreError> {
    let expires = info
        .expires_at
        .duration_since(UNIX_EPOCH)
        .map_err(|_| StoreError::BadRequest("a token cannot expire before 1970".into()))?;
    Ok(serde_json::json!({
        "id": info.id,
        "identity": info.identity,
        "expiresAtSecs": expires.as_secs(),
        "expiresAtNanos": expires.subsec_nanos(),
        "once": info.once,
        "used": info.used,
        "revoked": info.revoked,
    })
    .to_string())
}

fn decode(record: &str) -> Result<TokenInfo, StoreError> {
    let v: serde_json::Value =
        serde_json::from_str(record).map_err(|e| corrupt(format!("token record: {e}")))?;
    let field = |name: &str| {
        v.get(name)
            .ok_or_else(|| corrupt(format!("token record has no {name}")))
    };
    let string = |name: &str| {
        field(name)?
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| corrupt(format!("token {name} is not a string")))
    };
    let number = |name: &str| {
        field(name)?
            .as_u64()
            .ok_or_else(|| corrupt(format!("token {name} is not a number")))
    };
    let flag = |name: &str| {
        field(name)?
            .as_bool()
            .ok_or_else(|| corrupt(format!("token {name} is not a boolean")))
    };
    let nanos = u32::try_from(number("expiresAtNanos")?)
        .map_err(|_| corrupt("token expiresAtNanos is out of range"))?;
    let expires_at = UNIX_EPOCH
        .checked_add(Duration::new(number("expiresAtSecs")?, nanos))
        .ok_or_else(|| corrupt("token expiry is out of range"))?;
    Ok(TokenInfo {
        id: string("id")?,
        identity: string("identity")?,
        expires_at,
        once: flag("once")?,
        used: flag("used")?,
        revoked: flag("revoked")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::TempStore;
    use std::sync::{Arc, Barrier};

    const ID: &str = "spiffe://pylon.local/ns/default/sa/greeter";
    const HOUR: Duration = Duration::from_secs(3600);

    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn create_returns_a_secret_and_stores_only_its_hash() {
        let t = TempStore::new("token-create");
        let store = t.open();
        let (info, secret) = store.create_token(ID, HOUR, false, t0()).unwrap();
        assert!(looks_like_secret(&secret), "{secret}");
        assert_eq!(secret.len(), 6 + 64);
        assert_eq!(info.id.len(), 12);
        assert!(info.id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(info.identity, ID);
        assert_eq!(info.expires_at, t0() + HOUR);
        assert!(!info.once && !info.used && !info.revoked);
        assert_eq!(store.list_tokens().unwrap(), vec![info.clone()]);

        let (other, other_secret) = store.create_token(ID, HOUR, true, t0()).unwrap();
        assert_ne!(other.id, info.id);
        assert_ne!(other_secret, secret);
        drop(store);

        let bytes = std::fs::read(&t.path).unwrap();
        let holds = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(!holds(secret.as_bytes()) && !holds(&secret.as_bytes()[6..]));
        assert!(holds(&hash(&secret)), "the hash is the key");
    }

    #[test]
    fn verify_checks_expiry_revocation_and_the_secret() {
        let t = TempStore::new("token-verify");
        let store = t.open();
        let (info, secret) = store.create_token(ID, HOUR, false, t0()).unwrap();
        let just_before = t0() + HOUR - Duration::from_nanos(1);
        assert_eq!(
            store.verify_token(&secret, just_before).unwrap(),
            Some(info.clone())
        );
        assert_eq!(store.verify_token(&secret, t0() + HOUR).unwrap(), None);
        assert_eq!(store.consume_token(&secret, t0() + HOUR).unwrap(), None);

        // A reusable token stays valid after use, and is not marked used.
        assert_eq!(
            store.consume_token(&secret, t0()).unwrap(),
            Some(info.clone())
        );
        assert_eq!(
            store.verify_token(&secret, t0()).unwrap(),
            Some(info.clone())
        );

        let mut wrong = secret.clone();
        wrong.replace_range(6..7, if &secret[6..7] == "0" { "1" } else { "0" });
        for bad in [
            wrong.as_str(),
            "",
            "pylon_",
            &secret[..secret.len() - 1],
            "x",
        ] {
            assert_eq!(store.verify_token(bad, t0()).unwrap(), None, "{bad:?}");
            assert_eq!(store.consume_token(bad, t0()).unwrap(), None, "{bad:?}");
        }

        assert_eq!(
            store.revoke_token(&info.id, t0()).unwrap().as_deref(),
            Some(ID)
        );
        assert_eq!(
            store.revoke_token(&info.id, t0()).unwrap().as_deref(),
            Some(ID),
            "idempotent"
        );
        assert_eq!(store.revoke_token("000000000000", t0()).unwrap(), None);
        assert_eq!(store.verify_token(&secret, t0()).unwrap(), None);
        assert_eq!(store.consume_token(&secret, t0()).unwrap(), None);
        let listed = store.list_tokens().unwrap();
        assert_eq!(listed.len(), 1);
        assert!(listed[0].revoked);
    }

    #[test]
    fn identities_and_ttls_are_checked() {
        let t = TempStore::new("token-identity");
        let store = t.open();
        for ok in [
            ID,
            "spiffe://example.org/ns/team-a/sa/web_1",
            "spiffe://td/ns/a/sa/B.c",
        ] {
            store.create_token(ok, HOUR, false, t0()).unwrap();
        }
        for bad in [
            "",
            "greeter",
            "spiffe://pylon.local/ns/default",
            "spiffe://pylon.local/ns/default/sa/",
            "spiffe://pylon.local/ns/default/sa/greeter/x",
            "spiffe://pylon.local/sa/greeter/ns/default",
            "spiffe:///ns/default/sa/greeter",
            "spiffe://Pylon.local/ns/default/sa/greeter",
            "spiffe://pylon.local/ns/../sa/greeter",
            "spiffe://pylon.local/ns/a b/sa/greeter",
            "https://pylon.local/ns/default/sa/greeter",
        ] {
            let err = store.create_token(bad, HOUR, false, t0()).unwrap_err();
            assert!(matches!(err, StoreError::BadRequest(_)), "{bad:?}: {err}");
        }
        assert!(matches!(
            store.create_token(ID, Duration::ZERO, false, t0()),
            Err(StoreError::BadRequest(_))
        ));
        assert!(matches!(
            store.create_token(ID, Duration::MAX, false, t0()),
            Err(StoreError::BadRequest(_))
        ));
        assert_eq!(store.list_tokens().unwrap().len(), 3);
    }

    #[test]
    fn a_once_token_is_consumed_exactly_once_under_concurrency() {
        let t = TempStore::new("token-once");
        let store = Arc::new(t.open());
        let (info, secret) = store.create_token(ID, HOUR, true, t0()).unwrap();
        assert_eq!(
            store.verify_token(&secret, t0()).unwrap(),
            Some(info.clone()),
            "verifying does not consume"
        );

        let threads = 8;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (store, barrier, secret) = (store.clone(), barrier.clone(), secret.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    store.consume_token(&secret, t0()).unwrap()
                })
            })
            .collect();
        let won: Vec<TokenInfo> = handles
            .into_iter()
            .filter_map(|h| h.join().unwrap())
            .collect();
        assert_eq!(won.len(), 1, "{won:?}");
        assert!(won[0].used && won[0].once);
        assert_eq!(won[0].id, info.id);

        assert_eq!(store.verify_token(&secret, t0()).unwrap(), None);
        assert_eq!(store.consume_token(&secret, t0()).unwrap(), None);
        assert!(store.list_tokens().unwrap()[0].used);
    }

    #[test]
    fn tokens_survive_reopening() {
        let t = TempStore::new("token-reopen");
        let (info, secret) = {
            let store = t.open();
            let created = store.create_token(ID, HOUR, true, t0()).unwrap();
            store.create_token(ID, 2 * HOUR, false, t0()).unwrap();
            created
        };
        let store = t.open();
        let listed = store.list_tokens().unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0], info, "sorted by expiry");
        assert_eq!(listed[1].expires_at, t0() + 2 * HOUR);
        assert!(store.consume_token(&secret, t0()).unwrap().is_some());
        drop(store);
        let store = t.open();
        assert_eq!(store.verify_token(&secret, t0()).unwrap(), None);
    }

    #[test]
    fn revoking_a_token_or_an_identity_puts_the_identity_on_the_deny_list() {
        const OTHER: &str = "spiffe://pylon.local/ns/default/sa/other";
        let t = TempStore::new("token-deny");
        let store = t.open();
        assert!(store.revocations().unwrap().is_empty());
        let (a, _) = store.create_token(ID, HOUR, false, t0()).unwrap();
        let (_, b_secret) = store.create_token(ID, HOUR, false, t0()).unwrap();
        let (_, other_secret) = store.create_token(OTHER, HOUR, false, t0()).unwrap();

        store.revoke_token(&a.id, t0() + HOUR / 2).unwrap();
        let at = |s: SystemTime| s.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        assert_eq!(
            store.revocations().unwrap(),
            HashMap::from([(ID.to_string(), at(t0() + HOUR / 2))])
        );
        // Another token of the identity stays good (its holder gets new
        // certificates with it).
        assert!(store.verify_token(&b_secret, t0()).unwrap().is_some());

        // An identity revoked: all its tokens go, the entry only moves later.
        assert_eq!(store.revoke_identity(ID, t0()).unwrap(), 1);
        assert_eq!(store.verify_token(&b_secret, t0()).unwrap(), None);
        assert!(store.verify_token(&other_secret, t0()).unwrap().is_some());
        assert_eq!(store.revocations().unwrap()[ID], at(t0() + HOUR / 2));
        assert_eq!(store.revoke_identity(OTHER, t0() + HOUR).unwrap(), 1);
        assert!(matches!(
            store.revoke_identity("greeter", t0()),
            Err(StoreError::BadRequest(_))
        ));
        drop(store);
        let store = t.open();
        assert_eq!(store.revocations().unwrap().len(), 2, "persisted");
    }

    #[test]
    fn records_round_trip() {
        let info = TokenInfo {
            id: "0123456789ab".into(),
            identity: ID.into(),
            expires_at: UNIX_EPOCH + Duration::new(1_800_000_000, 123_456_789),
            once: true,
            used: false,
            revoked: true,
        };
        assert_eq!(decode(&encode(&info).unwrap()).unwrap(), info);
        assert!(decode("{}").is_err());
        assert!(decode("not json").is_err());
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
    }
}
