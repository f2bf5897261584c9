//! The identity service: workloads get certificates for their SPIFFE ID and
//! follow the trust bundle.
//!
//! A caller authenticates with a client certificate the mesh CA issued (its
//! SPIFFE ID is who it is; renewals use it), or with a bootstrap credential
//! (`authorization: Bearer …`): a token of `pylon-control token create`,
//! bound to one identity, or — with `--kubernetes-jwks`/`--kubernetes-issuer`
//! — a pod's projected service-account token (audience `pylon`), which
//! names `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`
//! ([`crate::k8s_token`]). A CSR is signed only for the caller's own
//! identity ([`crate::ca::CaState::sign_csr`]).
//!
//! Revocation: a certificate's authority dates from its issuance, a
//! token's from the call. When the caller's identity was revoked at or
//! after that moment (the deny list, [`crate::state::State::is_revoked`]),
//! the certificate is refused — it cannot renew itself, open a policy
//! stream or watch the bundle — and a bearer token sent with it is tried
//! instead; open streams of such a caller end.

use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use futures_util::Stream;
use pylon_proto::v1::identity_server::Identity;
use pylon_proto::v1::{self as pb};
use tonic::{Request, Response, Status};

use crate::ca::{CaState, CsrError, LEAF_BACKDATE_SECS};
use crate::k8s_token::TokenVerifier;
use crate::state::{State, bearer, blocking};
use crate::tls::PeerInfo;

/// How a caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A workload certificate of the mesh CA.
    Certificate,
    /// A bootstrap token of `pylon-control token create`.
    Token,
    /// A Kubernetes service-account token.
    Kubernetes,
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Its SPIFFE ID.
    pub identity: String,
    /// When its credential was granted (Unix seconds): a certificate's
    /// issuance, else the call.
    pub authorized_at: i64,
    pub via: Via,
}

impl Caller {
    /// Whether the caller's identity has been revoked since it was
    /// authorized.
    pub fn is_revoked(&self, state: &State) -> bool {
        state.is_revoked(&self.identity, self.authorized_at)
    }
}

fn now_unix() -> i64 {
    crate::ca::unix(SystemTime::now())
}

/// The caller: from its verified client certificate unless that was
/// revoked, else from its bearer token. `consume` marks a once-only token
/// used (for an issuance).
pub async fn authenticate<T>(
    state: &Arc<State>,
    req: &Request<T>,
    consume: bool,
) -> Result<Caller, Status> {
    // rustls verified the chain against the bundle during the handshake;
    // the handshake may be older than the leaf's expiry, so check that here.
    let mut revoked = None;
    if let Some(leaf) = req
        .extensions()
        .get::<PeerInfo>()
        .and_then(|p| p.certificates.as_ref())
        .and_then(|c| c.first())
    {
        let caller = certificate_caller(leaf.as_ref())?;
        if !caller.is_revoked(state) {
            return Ok(caller);
        }
        state.metrics.credential_refused("certificate", "revoked");
        tracing::info!(identity = %caller.identity, "a revoked certificate was refused");
        revoked = Some(caller.identity);
    }
    let Some(token) = bearer(req).map(str::to_string) else {
        return Err(match revoked {
            Some(identity) => Status::unauthenticated(format!(
                "the client certificate of {identity} was revoked: get a new one with a valid bootstrap credential"
            )),
            None => {
                Status::unauthenticated("a workload certificate or a bootstrap token is required")
            }
        });
    };
    if TokenVerifier::looks_like_jwt(&token) {
        return kubernetes_identity(state, &token)
            .await
            .map(|identity| Caller {
                identity,
                authorized_at: now_unix(),
                via: Via::Kubernetes,
            });
    }
    let store = state.store.clone();
    let info = blocking(move || {
        if consume {
            store.consume_token(&token, SystemTime::now())
        } else {
            store.verify_token(&token, SystemTime::now())
        }
    })
    .await?
    .ok_or_else(|| {
        state.metrics.credential_refused("bootstrap", "invalid");
        Status::unauthenticated(
            "the bootstrap token is not valid (unknown, expired, used or revoked)",
        )
    })?;
    Ok(Caller {
        identity: info.identity,
        authorized_at: now_unix(),
        via: Via::Token,
    })
}

/// The identity a Kubernetes service-account token names, once verified.
async fn kubernetes_identity(state: &Arc<State>, token: &str) -> Result<String, Status> {
    let Some(verifier) = state.k8s_tokens.as_ref() else {
        state
            .metrics
            .credential_refused("kubernetes", "not_configured");
        return Err(Status::unauthenticated(
            "service-account tokens are not accepted here (the control plane runs without --kubernetes-jwks or --kubernetes-issuer)",
        ));
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match verifier.verify(token, now).await {
        Ok(workload) => {
            let trust_domain = state.ca.borrow().trust_domain.clone();
            Ok(workload.spiffe_id(&trust_domain))
        }
        Err(e) => {
            state.metrics.credential_refused("kubernetes", e.reason());
            tracing::info!(error = %e, "service-account token refused");
            Err(Status::unauthenticated(e.to_string()))
        }
    }
}

fn certificate_caller(der: &[u8]) -> Result<Caller, Status> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|_| Status::unauthenticated("unreadable client certificate"))?;
    if !cert.validity().is_valid() {
        return Err(Status::unauthenticated(
            "the client certificate has expired",
        ));
    }
    let id = pylon_proto::spiffe::id_of_certificate(der).map_err(Status::unauthenticated)?;
    if pylon_proto::spiffe::parse(&id).is_none() {
        return Err(Status::unauthenticated(format!(
            "{id} is not a workload identity"
        )));
    }
    Ok(Caller {
        identity: id,
        authorized_at: cert.validity().not_before.timestamp() + LEAF_BACKDATE_SECS,
        via: Via::Certificate,
    })
}

fn bundle(ca: &CaState) -> pb::TrustBundle {
    pb::TrustBundle {
        version: ca.version,
        roots_der: ca.roots_der(),
    }
}

pub struct IdentityApi(pub Arc<State>);

type BundleStream = Pin<Box<dyn Stream<Item = Result<pb::TrustBundle, Status>> + Send>>;

#[tonic::async_trait]
impl Identity for IdentityApi {
    async fn who_am_i(
        &self,
        req: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let identity = authenticate(&self.0, &req, false).await?.identity;
        let ca = self.0.ca.borrow().clone();
        Ok(Response::new(pb::WhoAmIResponse {
            identity,
            trust_bundle: Some(bundle(&ca)),
        }))
    }

    async fn issue_certificate(
        &self,
        req: Request<pb::IssueCertificateRequest>,
    ) -> Result<Response<pb::IssueCertificateResponse>, Status> {
        // The CSR is checked before a once-only token is spent on it.
        let caller = authenticate(&self.0, &req, false).await?;
        let identity = caller.identity.clone();
        let csr = req.get_ref().csr_der.clone();
        let ca = self.0.ca.borrow().clone();
        let domain = pylon_proto::spiffe::parse(&identity).map(|w| w.trust_domain.to_string());
        if domain.as_deref() != Some(ca.trust_domain.as_str()) {
            return Err(Status::permission_denied(format!(
                "{identity} is not in this mesh's trust domain {}",
                ca.trust_domain
            )));
        }
        let ttl = self.0.cert_ttl;
        let (signing_ca, who) = (ca.clone(), identity.clone());
        let signed = tokio::task::spawn_blocking(move || signing_ca.sign_csr(&csr, &who, ttl))
            .await
            .map_err(|e| Status::internal(format!("signing task failed: {e}")))?;
        let leaf = match signed {
            Ok(leaf) => leaf,
            Err(CsrError::Invalid(e)) => return Err(Status::invalid_argument(e)),
            Err(CsrError::Denied(e)) => {
                tracing::warn!(%identity, error = %e, "CSR refused");
                return Err(Status::permission_denied(e));
            }
            Err(CsrError::Internal(e)) => return Err(Status::internal(e)),
        };
        // Spend a once-only bootstrap token now that the request is good
        // (a service-account token is not spent, and was verified above).
        if caller.via == Via::Token {
            authenticate(&self.0, &req, true).await?;
        }
        tracing::info!(%identity, serial = %leaf.serial, not_after = leaf.not_after, "certificate issued");
        Ok(Response::new(pb::IssueCertificateResponse {
            identity,
            chain_der: leaf.chain_der,
            trust_bundle: Some(bundle(&ca)),
            not_before_unix: leaf.not_before,
            not_after_unix: leaf.not_after,
            serial: leaf.serial,
        }))
    }

    type WatchTrustBundleStream = BundleStream;

    async fn watch_trust_bundle(
        &self,
        req: Request<pb::WatchTrustBundleRequest>,
    ) -> Result<Response<BundleStream>, Status> {
        let caller = authenticate(&self.0, &req, false).await?;
        let mut changes = self.0.ca.subscribe();
        let mut revocations = self.0.revocations.subscribe();
        let state = self.0.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            changes.mark_changed();
            let mut sent = None;
            loop {
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() {
                        return;
                    },
                    _ = revocations.changed() => {
                        if caller.is_revoked(&state) {
                            let _ = tx.send(Err(revoked_status(&caller))).await;
                            return;
                        }
                        continue;
                    }
                }
                let ca = changes.borrow_and_update().clone();
                let roots = ca.roots_der();
                // Only bundle changes matter to a watcher, not issuer ones.
                if sent.as_ref() == Some(&roots) {
                    continue;
                }
                if tx.send(Ok(bundle(&ca))).await.is_err() {
                    return;
                }
                sent = Some(roots);
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// What a stream of a caller whose identity was revoked ends with.
pub fn revoked_status(caller: &Caller) -> Status {
    Status::unauthenticated(format!(
        "{} was revoked: get a new certificate with a valid bootstrap credential",
        caller.identity
    ))
}
